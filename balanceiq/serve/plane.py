"""Everything the API reads or changes: :class:`ControlPlane` owns the controllers, their loops,
training runs and the policy client; the routes only validate, check the token and call it."""

from __future__ import annotations

import hmac
import logging
import math
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter

from balanceiq.config import GuardrailConfig, Settings, critical_count, is_loopback
from balanceiq.control.controller import Controller, ControlLoop, Observer, Scorer, XdsClient
from balanceiq.control.metrics import ControllerMetrics, Counted
from balanceiq.exceptions import BalanceIQError, ControlError, GuardrailError, UnknownClusterError
from balanceiq.policy.baselines import PolicyContext, make_policy
from balanceiq.policy.decide import decide, observe_only
from balanceiq.policy.features import encode
from balanceiq.policy.lp import weights_to_shares
from balanceiq.policy.reward import RewardWeights
from balanceiq.serve import health
from balanceiq.serve.timeline import finite
from balanceiq.serve.training import TrainingManager, iso_time, training_metrics
from balanceiq.telemetry.observation import EndpointObservation, Observation

log = logging.getLogger(__name__)

# PUT /api/policy keys set directly on the controller's policy: (attribute, type).
_KNOBS: dict[str, tuple[str, Callable[[Any], Any]]] = {"k": ("k", int), "selection": ("mode", str)}
_KNOBS |= {key: (key, float) for key in ("interval_s", "cost_weight", "util_target", "latency_weight")}
_OBS_FIELDS = ("p50_ms", "p95_ms", "error_rate", "saturation", "inflight", "rps", "cost_per_million", "weight")
_TRAINING_FIELDS = ("buffer_size", "current_reward", "model_accuracy", "recent_rewards", "recent_losses")
_XDS_REQUESTS = {
    "requests_refused": "xDS requests that ended their stream with an error status",
    "requests_ignored": "xDS requests not acted on, as the protocol says",
}
_TELEMETRY_FAILURES = "Telemetry reads that failed, by source (-bug: not a TelemetryError)"


def load_or_create_token(settings: Settings) -> tuple[str, Path | None, bool]:
    """``(token, file, created)``: configured, else in ``state_dir``, else new there (mode 0600); never logged."""
    if settings.api.token:
        return settings.api.token, None, False
    path = Path(settings.state_dir) / "api-token"
    try:
        text = path.read_text().strip()
        if len(text) >= 16:
            return text, path, False
    except OSError:
        pass
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, path, True


class PolicyClient:
    """The Policy deployment (or a local model in tests) and the controller's own copy of
    the model (``local``): a reload swaps both, so the loop and the API score alike."""

    def __init__(
        self, info: Callable[[], dict[str, Any]], reload: Callable[[str], dict[str, Any]], local: Any | None = None
    ) -> None:
        self._info = info
        self._reload = reload
        self.local = local

    def info(self) -> dict[str, Any]:
        out = dict(self._info())
        if self.local is not None:
            mine = str(self.local.checkpoint)
            out["controller_checkpoint"] = mine
            out["controller_forward"] = "numpy" if getattr(self.local, "fast", None) is not None else "torch"
            out["in_sync"] = mine == str(out.get("checkpoint"))
        return out

    def reload(self, checkpoint: str) -> dict[str, Any]:
        """The deployment first (it refuses a bad checkpoint), then the controller's copy;
        if that fails, the deployment goes back to what it served."""
        before = str(self.local.checkpoint) if self.local is not None else None
        out = self._reload(checkpoint)
        if self.local is not None:
            try:
                self.local.reload(checkpoint)
            except Exception:
                self._reload(str(before))
                raise
        return out


def cluster_controllers(
    settings: Settings,
    xds: XdsClient,
    scorer: Scorer | None,
    observer: Callable[[str], Observer],
    *,
    recording: str | os.PathLike[str] | None = None,
) -> list[Controller]:
    """One controller per cluster, sharing the xDS client, the policy and one metrics registry;
    from the second cluster on, a recording path gets the cluster's name before its suffix."""
    metrics = ControllerMetrics()
    out = []
    for i, c in enumerate(settings.clusters):
        rec = recording
        if recording is not None and i > 0:
            path = Path(recording)
            rec = path.with_name(f"{path.stem}.{c.name}{path.suffix}")
        out.append(Controller(settings, observer(c.name), xds, scorer, cluster=c.name, recording=rec, metrics=metrics))
    return out


class ApiMetrics:
    """What was refused at the edges, for ``GET /metrics``: API responses by route and status, token
    failures, xDS requests refused or ignored, failed telemetry reads."""

    def __init__(
        self, xds_status: Callable[[], Mapping[str, Any]], telemetry_failures: Callable[[], Mapping[str, int]]
    ) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        # Labelled by route template, not path, so a scan of random URLs adds no series.
        self.responses = PromCounter(
            "balanceiq_api_responses",
            "API responses by method, route and status code",
            ["method", "route", "code"],
            registry=r,
        )
        self.auth_failures = PromCounter(
            "balanceiq_api_auth_failures",
            "Requests refused for a missing or wrong bearer token",
            ["reason"],
            registry=r,
        )
        for reason in ("missing", "invalid"):
            self.auth_failures.labels(reason)
        r.register(Counted(xds_status, [(f"balanceiq_xds_{k}", doc, "reason", k) for k, doc in _XDS_REQUESTS.items()]))
        r.register(Counted(telemetry_failures, [("balanceiq_telemetry_failures", _TELEMETRY_FAILURES, "source", None)]))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ControlPlane:
    """The API's view of every cluster's controller and loop; ``cluster=None`` means the
    first configured cluster, so a one-cluster deployment never has to name it."""

    def __init__(
        self,
        settings: Settings,
        controllers: Controller | Sequence[Controller],
        *,
        policy: PolicyClient | None = None,
        training: TrainingManager | None = None,
        token: str | None = None,
    ) -> None:
        self.settings = settings
        cs = [controllers] if isinstance(controllers, Controller) else list(controllers)
        if not cs:
            raise ControlError("a control plane needs at least one cluster's controller")
        self.controllers: dict[str, Controller] = {c.cluster.name: c for c in cs}
        if len(self.controllers) != len(cs):
            raise ControlError("two controllers for the same cluster")
        self.loops: dict[str, ControlLoop] = {name: ControlLoop(c) for name, c in self.controllers.items()}
        self.controller = cs[0]
        self.loop = self.loops[self.controller.cluster.name]
        self.policy = policy
        self.training = training
        self.api_server: Callable[[], str] | None = None  # the replica's own server's state
        self.api_scorer: Scorer | None = None  # POST /api/policy/score: else the controller's scorer
        self.token = token or load_or_create_token(settings)[0]
        if not is_loopback(settings.api.host):
            # Allowed (set on purpose), but said once: reads are open, the token travels in plaintext.
            log.warning(
                "API binds %s, beyond loopback: reads are unauthenticated and HTTP is not encrypted; "
                "put a TLS-terminating proxy in front (see SECURITY.md)",
                settings.api.host,
            )
        self.started_at = time.time()
        self._http = httpx.Client(timeout=1.0, trust_env=False)
        self._http_lock = threading.Lock()
        self._probe_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self.metrics = ApiMetrics(self._xds_status, self._telemetry_failures)

    def pick(self, cluster: str | None = None) -> Controller:
        """The named cluster's controller; the first configured one for ``None``."""
        if cluster is not None and cluster not in self.controllers:
            raise UnknownClusterError(f"unknown cluster {cluster[:80]!r}; known: {', '.join(self.controllers)}")
        return self.controller if cluster is None else self.controllers[cluster]

    def _for_address(self, address: str, cluster: str | None) -> Controller:
        """The controller of ``cluster``, else of the one cluster that has ``address``."""
        if cluster is not None or len(self.controllers) == 1:
            return self.pick(cluster)
        owners = [c for c in self.controllers.values() if address in c.endpoints]
        if len(owners) > 1:
            raise UnknownClusterError(
                f"{address!r} is in clusters {', '.join(c.cluster.name for c in owners)}: name one with ?cluster="
            )
        return owners[0] if owners else self.controller

    def _loop_states(self) -> dict[str, dict[str, Any]]:
        return {name: health.loop_state(c, self.loops[name]) for name, c in self.controllers.items()}

    def clusters(self, states: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Every steered cluster: name, endpoints, mode and whether its loop holds the lease."""
        states = states or self._loop_states()
        return [
            {
                "cluster": name,
                "endpoints": len(c.addresses),
                **states[name],  # state and reason
                "mode": c.rollback.mode,
                "control_mode": c.policy.control_mode,
                "holds_lease": c.holds_lease,
                "decisions": self.loops[name].steps,
            }
            for name, c in self.controllers.items()
        ]

    def _telemetry_failures(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for c in self.controllers.values():
            total.update({k: int(v) for k, v in (getattr(c.observer, "failures", None) or {}).items()})
        return dict(total)

    def metrics_exposition(self) -> bytes:
        """Every controller's metrics registry, then the API's."""
        parents = {id(c.metrics.parent): c.metrics.parent for c in self.controllers.values()}
        return b"".join(p.exposition() for p in parents.values()) + self.metrics.exposition()

    def start(self) -> None:
        for loop in self.loops.values():
            loop.start()

    def stop(self) -> None:
        for loop in self.loops.values():
            loop.stop()
        if self.training is not None:
            self.training.shutdown()
        self._http.close()

    def authorized(self, presented: str | None) -> bool:
        """Constant-time comparison, so timing does not leak the token; failures counted by kind."""
        ok = bool(presented) and hmac.compare_digest((presented or "").encode(), self.token.encode())
        if not ok:
            self.metrics.auth_failures.labels("invalid" if presented else "missing").inc()
        return ok

    def _get(self, url: str) -> httpx.Response | None:
        with self._http_lock:
            try:
                return self._http.get(url)
            except httpx.HTTPError:
                return None

    def _cached(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``fn()``, at most once a second per ``key``: probes of remote parts are not repeated per request."""
        now = time.monotonic()
        hit = self._probe_cache.get(key)
        if hit and now - hit[0] < 1.0:
            return hit[1]
        value = fn()
        self._probe_cache[key] = (now, value)
        return value

    def _xds_status(self) -> dict[str, Any]:
        """The xDS server's status (maybe a remote actor), at most once a second."""

        def fetch() -> dict[str, Any]:
            try:
                return dict(self.controller.xds.status())
            except BalanceIQError:
                return {}

        return self._cached("xds_status", fetch)

    def total_requests(self, cluster: str | None = None) -> int | None:
        """Envoy's own count of requests sent to the cluster (``upstream_rq_total``)."""
        name = self.pick(cluster).cluster.name

        def probe() -> dict[str, Any]:
            admin = self.settings.envoy.admin_url.rstrip("/")
            r = self._get(f"{admin}/stats?filter=^cluster\\.{name}\\.upstream_rq_total$&format=json")
            try:
                stats = r.json().get("stats", []) if r is not None and r.status_code == 200 else []
            except ValueError:
                stats = []
            value = next((s.get("value") for s in stats if s.get("name") == f"cluster.{name}.upstream_rq_total"), None)
            return {"value": int(value) if isinstance(value, (int, float)) else None}

        return self._cached(f"total_requests:{name}", probe)["value"]

    def efficiency(self, cluster: str | None = None) -> float | None:
        """Jain's fairness index of utilisation (rps / capacity): 1.0 when evenly loaded."""
        c = self.pick(cluster)
        if c.last_observation is None:
            return None
        pairs = zip(c.last_observation.endpoints, c.capacity_hint)
        u = np.array([e.rps / cap for e, cap in pairs if math.isfinite(e.rps) and math.isfinite(cap) and cap > 0])
        if u.size == 0 or float((u**2).sum()) == 0:
            return None
        return round(float(u.sum() ** 2 / (u.size * (u**2).sum())), 4)

    def weights(self, cluster: str | None = None) -> dict[str, Any]:
        c = self.pick(cluster)
        obs = c.last_observation.by_address() if c.last_observation else {}
        overrides = {o["address"]: self._with_state(o, c) for o in c.overrides.to_json()}
        eps = [
            {
                "address": a,
                "cloud": c.endpoints[a].cloud,
                "region": c.endpoints[a].region,
                "weight": c.weights[a],
                "share": round(float(s), 6),
                "health": c.health[a],
                "override": overrides.get(a),
                **{f: finite(getattr(e, f)) if e else None for f in ("p95_ms", "error_rate", "rps")},
                "cost_per_million": finite(c.costs.get(a)),
                "healthy": e.healthy if e else None,
            }
            for a, s, e in zip(c.addresses, c.shares, map(obs.get, c.addresses))
        ]
        last = c.log.last()
        return {
            "cluster": c.cluster.name,
            "version": next((d.version for d in c.log.recent(50) if d.version), None),
            "mode": c.rollback.mode,
            "endpoints": eps,
            "history": list(c.weight_history[-120:]),
            "total_requests": self.total_requests(c.cluster.name),
            "timestamp": last.timestamp if last else None,
        }

    def _with_state(self, override: dict[str, Any], c: Controller) -> dict[str, Any]:
        """The override with ``state``: ``applied`` once a step has included it, else ``pending``."""
        done = c.overrides_applied_at
        created = override.get("created_at")
        applied = done is not None and created is not None and float(created) <= done
        return {**override, "state": "applied" if applied else "pending"}

    def set_override(
        self,
        address: str,
        action: str,
        weight: int | None,
        ttl_s: float | None,
        reason: str,
        cluster: str | None = None,
    ) -> dict[str, Any]:
        """Apply an override; ``cluster`` defaults to the one cluster with ``address``."""
        c = self._for_address(address, cluster)
        if address not in c.endpoints:
            raise GuardrailError(
                f"unknown endpoint {address!r} in cluster {c.cluster.name}; known: {', '.join(c.addresses)}"
            )
        if action == "clear":
            result: dict[str, Any] = {"address": address, "action": "clear", "cleared": c.overrides.clear(address)}
        elif action == "drain":
            result = c.overrides.drain(address, ttl_s, reason).to_json()
        elif action == "pin":
            result = c.overrides.pin(address, float(c.shares[c.addresses.index(address)]), ttl_s, reason).to_json()
        elif action == "set":
            if weight is None:
                raise GuardrailError("action 'set' needs a weight (1..10000, out of 10000)")
            result = c.overrides.set_weight(address, weight, ttl_s, reason).to_json()
        else:
            raise GuardrailError(f"unknown action {action!r}; use pin, drain, set or clear")
        self.loops[c.cluster.name].wake()  # operators expect a drain now, not after the interval
        out = self._with_state(result, c) if "created_at" in result else result
        return {**out, "cluster": c.cluster.name}

    def policy_settings(self, cluster: str | None = None) -> dict[str, Any]:
        c = self.pick(cluster)
        return {
            "cluster": c.cluster.name,
            **c.policy.to_json(),
            "costs": dict(c.costs),
            "guardrails": c.guardrails.config.model_dump(),
            "checkpoint": (self.policy.info().get("checkpoint") if self.policy else None),
        }

    def update_policy(self, changes: dict[str, Any], cluster: str | None = None) -> dict[str, Any]:
        """Apply validated changes to one cluster atomically (all or none); a checkpoint is every cluster's."""
        c = self.pick(cluster)
        n = len(c.addresses)
        if changes.get("k") is not None and not 1 <= changes["k"] <= n:
            raise ControlError(f"k must be in 1..{n} (the cluster has {n} endpoints), got {changes['k']}")
        costs = changes.get("costs") or {}
        if unknown := sorted(set(costs) - set(c.addresses)):
            raise ControlError(f"costs name unknown endpoint(s): {', '.join(unknown)}")
        guard = None
        if changes.get("guardrails"):
            try:
                guard = GuardrailConfig.model_validate({**c.guardrails.config.model_dump(), **changes["guardrails"]})
            except ValueError as exc:
                raise ControlError(f"guardrails: {exc}") from exc
        reward = None
        slo = {"slo_ms": changes["slo_ms"]} if changes.get("slo_ms") is not None else {}
        if changes.get("reward_weights") is not None or slo:
            reward = RewardWeights(**{**asdict(c.policy.reward), **(changes.get("reward_weights") or {}), **slo})
        if changes.get("checkpoint"):
            if self.policy is None:
                raise ControlError("no policy deployment to load a checkpoint into")
            self.policy.reload(str(changes["checkpoint"]))
        with c._lock:
            for key, (attr, kind) in _KNOBS.items():
                if changes.get(key) is not None:
                    setattr(c.policy, attr, kind(changes[key]))
            if changes.get("control_mode") is not None and changes["control_mode"] != c.policy.control_mode:
                c.policy.control_mode = str(changes["control_mode"])
                log.warning("control mode now %s (PUT /api/policy)", c.policy.control_mode)
            if reward is not None:
                c.policy.reward = reward
            c.costs.update({a: float(v) for a, v in costs.items()})
            if guard is not None:
                c.guardrails.config = guard
                c.rollback.reconfigure(guard.rollback_after, guard.rollback_margin, guard.probation_after)
                if guard.baseline != c.baseline.name:
                    c.baseline = make_policy(guard.baseline)
        self.loops[c.cluster.name].wake()
        return self.policy_settings(c.cluster.name)

    def training_metrics(self) -> dict[str, Any]:
        if self.training is None:
            return training_metrics([], None)
        self.training.refresh()
        return self.training.metrics()

    def weight_metrics(self, cluster: str | None = None) -> dict[str, Any]:
        c = self.pick(cluster)
        last = c.log.last()
        return {
            "endpoint_weights": dict(c.weights),
            "total_requests": self.total_requests(c.cluster.name),
            "load_balance_efficiency": self.efficiency(c.cluster.name),
            "last_update": iso_time(last.timestamp if last else None),
        }

    def all_metrics(self, cluster: str | None = None) -> dict[str, Any]:
        t = self.training_metrics()
        w = self.weight_metrics(cluster)
        return {
            "training": {"iterations": t["training_iterations"], **{k: t[k] for k in _TRAINING_FIELDS}},
            "load_balancing": {
                "endpoint_weights": w["endpoint_weights"],
                "total_requests": w["total_requests"],
                "efficiency": w["load_balance_efficiency"],
            },
            "status": {"last_update": w["last_update"], "uptime": round(time.time() - self.started_at, 1)},
        }

    def score(self, endpoints: list[dict[str, Any]], k: int | None, cluster: str | None) -> dict[str, Any]:
        """``POST /api/policy/score``: the policy's scores and greedy critical set, and the decision ``cluster``'s
        knobs make, for an observation given in the request (nothing applied)."""
        c = self.pick(cluster)
        scorer = self.api_scorer or c.scorer
        if scorer is None:
            raise ControlError("no policy configured")
        addresses = [e["address"] for e in endpoints]
        if len(set(addresses)) != len(addresses):
            raise ControlError("duplicate endpoint addresses in the request")
        nan = float("nan")
        eps = tuple(
            EndpointObservation(
                address=e["address"],
                **cast("dict[str, Any]", {f: (nan if e.get(f) is None else float(e[f])) for f in _OBS_FIELDS}),
                healthy=e.get("healthy"),
            )
            for e in endpoints
        )
        obs = Observation(cluster=c.cluster.name, endpoints=eps, source="api")
        hint = np.array([nan if e.get("capacity_rps") is None else float(e["capacity_rps"]) for e in endpoints])
        n = len(eps)
        kk = min(n, k or critical_count(n))
        shares = weights_to_shares([ep.weight for ep in eps])
        rps = np.array([ep.rps for ep in eps], dtype=np.float64)
        ctx = PolicyContext(shares, hint, np.ones(n), float(np.nansum(np.where(np.isfinite(rps), rps, 0.0))), kk)
        # The controller's own decision core, with no memory: this observation as its first.
        knobs = replace(c.knobs(), k=max(1, kk))
        est, _ = observe_only(obs, ctx, knobs)
        rows = encode(obs, est.capacity, n, c.policy.reward.slo_ms)
        t0 = time.perf_counter()
        try:
            scores = np.asarray(scorer(rows), dtype=np.float64).reshape(-1)
        except Exception as exc:  # a remote deployment: anything may come back
            raise ControlError(f"policy unavailable: {type(exc).__name__}: {exc}") from exc
        ms = (time.perf_counter() - t0) * 1000
        if scores.shape[0] != n or not np.all(np.isfinite(scores)):
            raise ControlError(f"policy returned {scores.shape[0]} scores for {n} endpoints, or non-finite ones")
        core = decide(obs, ctx, scores, knobs)
        order = [int(i) for i in np.argsort(-scores, kind="stable")[:kk]]
        return {
            "scores": {a: round(float(x), 6) for a, x in zip(addresses, scores)},
            "critical": [addresses[i] for i in order],
            "k": kk,
            "inference_ms": round(ms, 3),
            "decision": {
                "critical": [addresses[i] for i in core.critical],
                "forced": [addresses[i] for i in core.forced],
                "shares": {a: round(float(x), 6) for a, x in zip(addresses, core.shares)},
                "weights": {a: int(x) for a, x in zip(addresses, core.weights)},
                "capacity_estimate": {a: round(float(x), 3) for a, x in zip(addresses, core.capacity)},
                "lp_status": core.lp_status,
            },
        }
