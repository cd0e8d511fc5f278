"""One cluster's decisions, once per interval: lease -> observe -> decide -> judge -> guard
-> push. Only the lease holder pushes; blind telemetry holds the weights in force (acting blind
is worse than not acting); the rollback monitor picks the policy's or the baseline's proposal;
guardrails come last; unchanged weights are not pushed. Every step leaves a DecisionRecord."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from balanceiq.config import Settings
from balanceiq.control.guardrails import Guardrails, GuardResult
from balanceiq.control.metrics import ClusterMetrics, ControllerMetrics
from balanceiq.control.overrides import OverrideTable
from balanceiq.control.rollback import RollbackMonitor
from balanceiq.exceptions import BalanceIQError, ControlError
from balanceiq.policy.baselines import Decision, PolicyContext, available_mask, make_policy, obs_field
from balanceiq.policy.checkpoint import gumbel_perturb
from balanceiq.policy.decide import CoreDecision, decide, envoy_weights, lp_latency, observe_only
from balanceiq.policy.features import encode
from balanceiq.policy.knobs import Knobs
from balanceiq.policy.lp import objective, traffic_moved, weights_to_shares
from balanceiq.policy.memory import CoreState
from balanceiq.policy.reward import RewardWeights, observed_reward
from balanceiq.sim.calibrate.recording import DecisionRecord
from balanceiq.telemetry.observation import Observation
from balanceiq.xds.client import served

log = logging.getLogger(__name__)
_records_log = logging.getLogger("balanceiq.control.records")  # DecisionLog's logger before it moved here

Scorer = Callable[[np.ndarray], np.ndarray]
"""Encoded observation rows ``[N, F]`` -> one score per endpoint ``[N]`` (may raise)."""


class Observer(Protocol):
    def observe(self, weights: Mapping[str, float] | None = None) -> Observation: ...


class XdsClient(Protocol):
    """The part of the xDS actor the controller uses (see :mod:`balanceiq.xds.client`)."""

    def acquire_lease(self, owner: str, ttl_s: float, cluster: str | None = None) -> dict[str, Any]: ...
    def release_lease(self, owner: str, cluster: str | None = None) -> bool: ...
    def set_assignment(
        self, cluster: str, weights: Mapping[str, int], health: Mapping[str, str], lease_owner: str
    ) -> str: ...
    def wait_for_ack(self, version: str, timeout: float) -> bool: ...
    def status(self) -> dict[str, Any]: ...


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class DecisionLog:
    """The last ``size`` decisions in memory for the API, and optionally every one appended to a JSONL file
    with its full observation (simulator calibration fits against the inputs, not summaries)."""

    def __init__(self, size: int = 500, recording: str | os.PathLike[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._items: deque[DecisionRecord] = deque(maxlen=size)
        self._seq = 0
        self.recording = Path(recording) if recording else None
        self._recording_failed = False
        if self.recording is not None:
            self.recording.parent.mkdir(parents=True, exist_ok=True)

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def append(self, record: DecisionRecord) -> None:
        with self._lock:
            self._items.append(record)
        if self.recording is not None:
            try:
                with self.recording.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record.to_json(with_observation=True)) + "\n")
                self._recording_failed = False
            except OSError as exc:
                # A full disk must not stop the control loop; say so once per outage.
                if not self._recording_failed:
                    _records_log.warning("decision recording to %s failed: %s", self.recording, exc)
                self._recording_failed = True

    def recent(self, limit: int = 20) -> list[DecisionRecord]:
        with self._lock:
            items = list(self._items)
        return items[::-1][: max(0, limit)]

    def last(self) -> DecisionRecord | None:
        with self._lock:
            return self._items[-1] if self._items else None


class PolicySettings:
    """What ``PUT /api/policy`` may change at run time (validated by the API's model)."""

    def __init__(self, settings: Settings, n: int) -> None:
        self.k = settings.control.critical_count(n)
        self.interval_s = float(settings.control.interval_s)
        self.reward = RewardWeights()
        self.cost_weight = float(settings.control.cost_weight)
        self.util_target = float(settings.control.util_target)
        self.latency_weight = float(settings.control.latency_weight)
        self.mode = "greedy"  # how critical endpoints are drawn from the scores (RLPolicy.critical)
        self.control_mode = str(settings.control.mode)  # "active" steers, "shadow" only records

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "interval_s": self.interval_s,
            "slo_ms": self.reward.slo_ms,
            "reward_weights": {k: v for k, v in asdict(self.reward).items() if k != "slo_ms"},
            "cost_weight": self.cost_weight,
            "util_target": self.util_target,
            "latency_weight": self.latency_weight,
            "selection": self.mode,
            "control_mode": self.control_mode,
        }


class Controller:
    """The decision logic of one cluster; :class:`ControlLoop` runs it on a clock."""

    def __init__(
        self,
        settings: Settings,
        observer: Observer,
        xds: XdsClient,
        scorer: Scorer | None,
        *,
        cluster: str | None = None,
        recording: str | os.PathLike[str] | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.cluster = settings.cluster(cluster) if cluster else settings.clusters[0]
        eps = self.cluster.endpoints
        self.addresses = [ep.address for ep in eps]
        self.endpoints = {ep.address: ep for ep in eps}
        self.observer = observer
        self.xds = xds
        self.scorer = scorer
        self.policy = PolicySettings(settings, len(eps))
        self.costs = {ep.address: float(ep.cost_per_million_requests) for ep in eps}
        self.capacity_hint = np.array([ep.capacity_rps or math.nan for ep in eps], dtype=np.float64)
        self.static_weights = np.array([ep.weight for ep in eps], dtype=np.float64)
        g = settings.guardrails
        self.guardrails = Guardrails(g)
        self.overrides = OverrideTable(self.addresses)
        self.rollback = RollbackMonitor(g.rollback_after, g.rollback_margin, g.probation_after)
        self.baseline = make_policy(g.baseline)
        self.log = DecisionLog(settings.api.decision_log_size, recording)
        # Shared by every cluster's controller in a process: one /metrics page.
        self.metrics = ClusterMetrics(metrics or ControllerMetrics(), self.cluster.name)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._rng = np.random.default_rng(0)
        self._lock = threading.RLock()  # one step at a time; API reads take it briefly
        self.weights: dict[str, int] = {a: int(w) for a, w in zip(self.addresses, self.static_weights)}
        self.health: dict[str, str] = dict.fromkeys(self.addresses, "HEALTHY")
        self.weight_history: list[dict[str, Any]] = []
        self.last_observation: Observation | None = None
        self.last_guard: GuardResult | None = None
        self.holds_lease = False
        self.lease: dict[str, Any] = {}
        self.policy_state: dict[str, Any] = {"ok": None, "error": None, "latency_ms": None, "at": None}
        self._adopted = False
        self.core_state = CoreState()  # the decision core's memory (baselines, breaches, prices)
        self.last_core: CoreDecision | None = None
        self._intent: tuple[dict[str, int], np.ndarray] | None = None  # weights pushed, split they realise
        # Start of the last step whose weights (pushed, or found unchanged) include every
        # override made before it: a newer override is still pending.
        self.overrides_applied_at: float | None = None

    @property
    def shares(self) -> np.ndarray:
        """The split in force: the one decided, while Envoy holds the weights pushed for
        it (under LEAST_REQUEST they differ from it); else what the weights say."""
        if self._intent is not None and self._intent[0] == self.weights:
            return self._intent[1].copy()
        return weights_to_shares(
            [self.weights[a] for a in self.addresses], [self.health[a] != "DRAINING" for a in self.addresses]
        )

    def envoy_weights(self, guard: GuardResult, routable: np.ndarray, demand: float) -> np.ndarray:
        """Integer weights that give the guarded split under Envoy's ``lb_policy`` (see
        :func:`~balanceiq.policy.decide.envoy_weights`); pinned or set weights kept as given."""
        weights = np.asarray(guard.weights, dtype=np.int64)
        if self.settings.envoy.lb_policy != "LEAST_REQUEST":
            return weights
        active = self.overrides.active()
        idx = np.flatnonzero([not (a in active and active[a].fixed) for a in self.addresses])
        units = int(weights[idx].sum())
        if not routable[idx].any() or units < len(idx):
            return weights
        out = weights.copy()
        out[idx] = envoy_weights(
            np.asarray(guard.shares)[idx],
            [self.addresses[i] for i in idx],
            self.core_state,
            demand,
            "LEAST_REQUEST",
            available=routable[idx],
            scale=units,
        )
        return out

    def _adopt_current(self) -> None:
        """Start from what the xDS server serves (a restored snapshot), not from config."""
        if self._adopted:
            return
        try:
            status = self.xds.status()
        except BalanceIQError as exc:
            log.info("xDS status unavailable at start (%s); starting from config weights", exc)
            return
        weights, health = served(status, self.cluster.name)
        if all(a in weights for a in self.addresses):
            self.weights = {a: weights[a] for a in self.addresses}
            self.health = {a: health[a] for a in self.addresses}
        self._adopted = True

    def _context(self, obs: Observation) -> PolicyContext:
        rps = obs_field(obs, "rps")
        demand = float(np.nansum(np.where(np.isfinite(rps), rps, 0.0)))
        return PolicyContext(self.shares, self.capacity_hint, self.static_weights, demand, self.policy.k)

    def knobs(self) -> Knobs:
        """The decision core's knobs from the run-time policy and the guardrails."""
        p, g = self.policy, self.settings.guardrails
        return Knobs(
            k=max(1, min(p.k, len(self.addresses))),
            slo_ms=p.reward.slo_ms,
            cost_weight=p.cost_weight,
            util_target=p.util_target,
            latency_weight=p.latency_weight,
            breach_error_rate=g.breach_error_rate,
            breach_hold_s=g.breach_hold_s,
        )

    def _scores(self, obs: Observation, capacity: np.ndarray) -> np.ndarray:
        """The policy's scores (Gumbel-perturbed when sampling); raises when it cannot answer."""
        assert self.scorer is not None
        n = len(obs.endpoints)
        rows = encode(obs, capacity, n, self.policy.reward.slo_ms)
        t0 = time.perf_counter()
        s = np.asarray(self.scorer(rows), dtype=np.float64).reshape(-1)[:n]
        self.policy_state.update(ok=True, error=None, latency_ms=round(_ms_since(t0), 3), at=time.time())
        if s.shape[0] != n or not np.all(np.isfinite(s)):
            raise ControlError(f"policy returned {s.shape[0]} scores for {n} endpoints, or non-finite ones")
        return gumbel_perturb(s, self._rng) if self.policy.mode == "sample" else s

    def _record(self, base: dict[str, Any], t0: float, **kw: Any) -> DecisionRecord:
        """Record ``base`` (the decision so far, ``notes`` a list) updated by ``kw``."""
        step_ms = _ms_since(t0)
        rec = DecisionRecord(**{**base, **kw, "notes": tuple(base["notes"]), "step_ms": step_ms})
        self.log.append(rec)
        outcome = "error" if rec.error else ("pushed" if rec.pushed else "unchanged")
        self.metrics.decision(rec.mode, outcome, step_ms / 1000)
        return rec

    def step(self) -> DecisionRecord:
        with self._lock:
            return self._step()

    def _step(self) -> DecisionRecord:
        """lease -> observe -> decide -> judge -> guard -> push; ``base`` collects the record."""
        t0, now = time.perf_counter(), time.time()
        base: dict[str, Any] = {
            "seq": self.log.next_seq(),
            "timestamp": now,
            "previous": dict(self.weights),
            "weights": dict(self.weights),
            "notes": [],
            "shadow": self.policy.control_mode == "shadow",
        }
        if (standby := self._lease(base, t0)) is not None:
            return standby
        obs = self._observe(base)
        if obs.source == "none" or not any(e.usable for e in obs.endpoints):
            return self._hold(base, obs, t0)
        ctx = self._context(obs)
        core, policy_ok = self._decide_core(obs, ctx, base, now)
        decision = self._judge(obs, ctx, core if policy_ok else None, base)
        guard = self._guard(obs, decision, core, base)
        critical = core.critical if policy_ok and base["mode"] == "policy" else ()
        base["critical"] = tuple(self.addresses[i] for i in critical)
        return self._push_guarded(base, guard, obs, ctx.demand_rps, t0)

    def _lease(self, base: dict[str, Any], t0: float) -> DecisionRecord | None:
        """Active: take or renew the lease; a standby record when this controller may not
        push. Shadow: take none (an active controller keeps steering) and push nothing."""
        if base["shadow"]:
            if self.holds_lease:
                self.release()
            self._adopted = False  # going active re-reads what the xDS server serves
            return None
        try:
            self.lease = self.xds.acquire_lease(self.owner, max(3.0 * self.policy.interval_s, 5.0), self.cluster.name)
        except BalanceIQError as exc:
            self.holds_lease = False
            self.metrics.set_active(False)
            self.metrics.error("lease")
            return self._record(base, t0, mode="standby", error=f"xDS unreachable: {exc}")
        self.holds_lease = bool(self.lease.get("granted"))
        self.metrics.set_active(self.holds_lease)
        if not self.holds_lease:
            self._adopted = False  # whoever holds it may change the weights meanwhile
            base["notes"].append(f"lease held by {self.lease.get('holder')}")
            return self._record(base, t0, mode="standby")
        self._adopt_current()  # _observe then records the weights adopted
        return None

    def _observe(self, base: dict[str, Any]) -> Observation:
        raw = self.observer.observe(self.weights)
        eps = tuple(replace(e, cost_per_million=self.costs.get(e.address, e.cost_per_million)) for e in raw.endpoints)
        obs = replace(raw, endpoints=eps)
        if base["shadow"]:
            # The weights in force are those of an Envoy this controller does not steer, as
            # telemetry reports them (else the ones it started from).
            w = obs_field(obs, "weight")
            if len(w) == len(self.addresses) and np.isfinite(w).all() and (w >= 1).all():
                self.weights = {a: round(x) for a, x in zip(self.addresses, w)}
                self._intent = None
        self.last_observation = obs
        reward = observed_reward(obs, self.policy.reward)
        base.update(previous=dict(self.weights), weights=dict(self.weights), source=obs.source, reward=reward)
        base["observation"] = obs.to_json()
        if reward is not None:
            self.metrics.set_reward(reward)
        return obs

    def _hold(self, base: dict[str, Any], obs: Observation, t0: float) -> DecisionRecord:
        """Telemetry blind: hold the weights; overrides (drains come in incidents, when blind) apply over them."""
        why = "; ".join(obs.errors) or "no endpoint has usable data"
        self.metrics.set_mode("hold")
        base["mode"] = "hold"
        base["notes"].append(f"telemetry blind ({why}): holding weights")
        active = self.overrides.active()
        if not active and "DRAINING" not in self.health.values():
            return self._record(base, t0)
        guard = self.guardrails.apply(self.addresses, self.shares, self.shares, available_mask(obs), active)
        self.last_guard = guard
        base["notes"] += ["overrides applied to the held weights", *guard.notes]
        return self._push_guarded(base, guard, obs, 0.0, t0)

    def _decide_core(
        self, obs: Observation, ctx: PolicyContext, base: dict[str, Any], now: float
    ) -> tuple[CoreDecision, bool]:
        """The policy's scores, then the one decision core; ``(decision, policy usable)``. Without a
        policy the core still runs, so what it remembers (baselines, breaches, prices) stays current."""
        knobs = self.knobs()
        scores = None
        if self.scorer is None:
            base["notes"].append("no policy configured: baseline used")
        else:
            try:
                est, _ = observe_only(obs, ctx, knobs, self.core_state, now=now)
                scores = self._scores(obs, est.capacity)
                base["score_ms"] = self.policy_state["latency_ms"]
            except Exception as exc:  # the policy is a remote call: anything may come back
                self.policy_state.update(ok=False, error=f"{type(exc).__name__}: {exc}", at=time.time())
                self.metrics.error("policy")
                base["notes"].append(f"policy unavailable ({type(exc).__name__}: {exc}); baseline used")
        core = decide(obs, ctx, scores, knobs, self.core_state, now=now)
        self.core_state = core.state
        self.last_core = core
        if core.held:
            quiet = ", ".join(self.addresses[i] for i in core.held)
            base["notes"].append(f"breach hold: {quiet} too quiet to measure; kept at the floor")
        base["notes"] += core.notes
        return core, scores is not None

    def _judge(self, obs: Observation, ctx: PolicyContext, core: CoreDecision | None, base: dict[str, Any]) -> Decision:
        """Policy or baseline (``base["mode"]``), both scored on this very observation (see
        RollbackMonitor) by the negated LP objective (worst load/capacity plus the cost term)."""
        fallback = self.baseline.decide(obs, ctx)
        if core is None:
            self.metrics.set_mode("baseline")
            base["mode"] = "baseline"
            return fallback
        proposal = Decision(core.shares, core.weights, core.critical, core.info())
        p, costs = self.policy, obs_field(obs, "cost_per_million")
        lp = partial(objective, cost_weight=p.cost_weight, util_target=p.util_target, latency_weight=p.latency_weight)
        latency = lp_latency(obs_field(obs, "p95_ms"), p.reward.slo_ms)
        score = {
            name: -lp(d.shares, core.capacity, costs, ctx.demand_rps, latency=latency)
            for name, d in (("policy", proposal), ("baseline", fallback))
        }
        self.rollback.record(score["policy"], score["baseline"])
        base["scores"] = score
        base["mode"] = self.rollback.mode
        self.metrics.set_mode(base["mode"])
        return proposal if base["mode"] == "policy" else fallback

    def _guard(self, obs: Observation, decision: Decision, core: CoreDecision, base: dict[str, Any]) -> GuardResult:
        breach = np.isin(np.arange(len(self.addresses)), [*core.breaching, *core.held])
        guard = self.guardrails.apply(
            self.addresses, self.shares, decision.shares, available_mask(obs), self.overrides.active(), breaching=breach
        )
        self.last_guard = guard
        for note in guard.notes:
            self.metrics.guardrail(note.split(":", 1)[0])
        base["notes"] += guard.notes
        return guard

    def _push_guarded(
        self, base: dict[str, Any], guard: GuardResult, obs: Observation, demand: float, t0: float
    ) -> DecisionRecord:
        """Push the guarded weights (unless unchanged), wait briefly for Envoy's ACK, record."""
        routable = available_mask(obs) & np.array([guard.health[a] != "DRAINING" for a in self.addresses])
        new_weights = {a: int(w) for a, w in zip(self.addresses, self.envoy_weights(guard, routable, demand))}
        shares = {a: float(x) for a, x in zip(self.addresses, guard.shares)}
        base.update(weights=new_weights, shares=shares, moved=traffic_moved(self.shares, guard.shares))
        if base["shadow"]:
            base["effect"] = self._effect(obs, guard.shares, demand)
            base["notes"].append("shadow: recorded, not pushed")
            return self._record(base, t0)
        if new_weights == self.weights and guard.health == self.health:
            self.overrides_applied_at = base["timestamp"]
            base["notes"].append("unchanged: nothing pushed")
            return self._record(base, t0)
        t_push = time.perf_counter()
        try:
            version = self.xds.set_assignment(self.cluster.name, new_weights, guard.health, self.owner)
        except BalanceIQError as exc:
            self.metrics.error("push")
            return self._record(base, t0, weights=dict(self.weights), error=f"push failed: {exc}")
        push_ms = _ms_since(t_push)
        self.metrics.push(push_ms / 1000)
        self.weights, self.health = new_weights, dict(guard.health)
        self.overrides_applied_at = base["timestamp"]
        self._intent = (dict(new_weights), np.asarray(guard.shares, dtype=np.float64).copy())
        self.weight_history.append({"timestamp": base["timestamp"], "weights": dict(self.weights)})
        del self.weight_history[:-360]
        for a, s in zip(self.addresses, self.shares):
            self.metrics.endpoint(a, self.weights[a], float(s))
        self._await_ack(version, base)
        return self._record(base, t0, pushed=True, push_ms=push_ms, version=version)

    def _await_ack(self, version: str, base: dict[str, Any]) -> None:
        """Wait briefly for Envoy's ACK of ``version``; ``acked`` stays None when no Envoy is connected."""
        t_ack = time.perf_counter()
        try:
            status = self.xds.status()
            self.metrics.xds_nodes(status.get("nodes", []))
            if any(n.get("connected") for n in status.get("nodes", [])):
                base["acked"] = self.xds.wait_for_ack(version, min(2.0, self.policy.interval_s / 2))
                if base["acked"]:
                    base["ack_ms"] = _ms_since(t_ack)
                    self.metrics.ack(base["ack_ms"] / 1000)
        except BalanceIQError as exc:
            base["notes"].append(f"ACK unknown: {exc}")

    def _effect(self, obs: Observation, proposed: np.ndarray, demand: float) -> dict[str, Any]:
        """Estimated effect of a split vs the one in force: blended $ per million requests, busiest load/capacity."""
        price = obs_field(obs, "cost_per_million")
        cap = self.last_core.capacity if self.last_core is not None else np.full(len(price), math.nan)
        known, ok = np.isfinite(price), np.isfinite(cap) & (cap > 0)
        out: dict[str, Any] = {}
        for name, split in (("current", self.shares), ("proposed", np.asarray(proposed, dtype=np.float64))):
            cost = float((split[known] * price[known]).sum() / max(split[known].sum(), 1e-12)) if known.any() else None
            util = float((split[ok] * demand / cap[ok]).max()) if ok.any() and demand > 0 else None
            out[name] = {
                "cost_per_million": None if cost is None else round(cost, 6),
                "max_utilisation": None if util is None else round(util, 4),
            }
        return out

    def release(self) -> None:
        try:
            self.xds.release_lease(self.owner, self.cluster.name)
        except BalanceIQError as exc:
            log.info("lease release failed (it will expire): %s", exc)
        self.holds_lease = False
        self.metrics.set_active(False)


class ControlLoop:
    """Runs :meth:`Controller.step` every ``interval_s`` on a daemon thread."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_tick: float | None = None
        self.steps = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="balanceiq-control", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Apply a changed interval (or overrides) now rather than after the old interval."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.controller.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.controller.step()
            except Exception:  # the loop must outlive any bug in one step
                log.exception("control step failed")
            self.steps += 1
            self.last_tick = time.time()
            wait = max(0.0, self.controller.policy.interval_s - (time.monotonic() - started))
            self._wake.wait(wait)
            self._wake.clear()
