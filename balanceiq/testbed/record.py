"""Exploration recordings on the live testbed: varied load per endpoint, for calibration.

A controller that keeps its weights still gives one operating point per endpoint, and a
fit of capacity and the latency-vs-load curve needs many. :class:`Explorer` runs a loop
shaped like :class:`~balanceiq.control.controller.Controller`'s (observe with the real
:class:`~balanceiq.telemetry.observe.Telemetry`, push weights through the xDS server, append
one JSON line per step) but its decisions are an exploration schedule instead of a policy:

* every ``hold_s`` seconds a new split is pushed; it is held long enough for the
  telemetry's rate window to cover it alone (``hold_s >= window_s + a scrape or two``),
  and observations are taken every ``observe_every_s`` in between;
* the splits sweep each endpoint's load from a floor share to ``max_share``: hold ``k``
  puts endpoint ``k mod n`` at a stratified share (a Latin-hypercube draw over
  ``[floor, max_share]``, so each endpoint sees low, middle and high loads) and splits
  the rest with a Dirichlet(1) draw above the floor.

The lines are :class:`~balanceiq.control.records.DecisionRecord`-compatible (mode
``"explore"``; the observation was taken under ``previous``, then ``weights`` pushed), so
``balanceiq calibrate`` reads controller recordings and exploration recordings alike.

:func:`record_exploration` brings up a whole testbed for it (backends, ALS, Envoy,
Prometheus and an in-process :class:`~balanceiq.xds.server.XdsServer`), sends bounded,
paced load to loopback only, explores for ``duration_s`` and stops everything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from balanceiq.config import Settings, SignalQuery
from balanceiq.exceptions import TestbedError
from balanceiq.policy.lp import shares_to_weights, traffic_moved
from balanceiq.telemetry.observation import Observation

__all__ = [
    "ExplorationPlan",
    "Explorer",
    "exploration_settings",
    "exploration_splits",
    "record_exploration",
]

WEIGHT_SCALE = 1000
"""Weights pushed sum to this: shares are realised to 0.1%."""


@dataclass(frozen=True)
class ExplorationPlan:
    """How the explorer moves traffic. Defaults suit a 2-core box at ~100-150 rps."""

    hold_s: float = 4.0
    """Seconds each split is held (>= the telemetry window plus a scrape or two)."""
    observe_every_s: float = 1.0
    """Seconds between observations (one record each)."""
    floor: float = 0.04
    """Least share any endpoint gets: it stays measured (latency needs traffic)."""
    max_share: float = 0.7
    """Most share the swept endpoint gets."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.hold_s > 0 and self.observe_every_s > 0):
            raise ValueError("hold_s and observe_every_s must be > 0")
        if not 0 <= self.floor < self.max_share <= 1:
            raise ValueError(f"need 0 <= floor < max_share <= 1, got floor={self.floor} max_share={self.max_share}")


def exploration_splits(n: int, count: int, *, floor: float = 0.04, max_share: float = 0.7, seed: int = 0) -> np.ndarray:
    """``count`` traffic splits over ``n`` endpoints (rows sum to 1, every share >= floor).

    Row ``k`` sweeps endpoint ``k mod n``: its share is a stratified draw over
    ``[floor, max_share]`` (each endpoint's sweeps cover the range evenly), and the rest
    is spread over the others as ``floor`` plus a Dirichlet(1) part. With one endpoint the
    only split is ``[1]``.
    """
    if n < 1 or count < 0:
        raise ValueError("need n >= 1 and count >= 0")
    if n == 1:
        return np.ones((count, 1))
    floor = min(floor, 1.0 / n)
    top = max(floor, min(max_share, 1.0 - (n - 1) * floor))
    rng = np.random.default_rng(seed)
    rounds = math.ceil(count / n)
    # One stratified permutation per endpoint: its r-th sweep lands in stratum perm[r].
    strata = np.stack([rng.permutation(rounds) for _ in range(n)])
    out = np.empty((count, n))
    for k in range(count):
        i, r = k % n, k // n
        u = (strata[i, r] + rng.uniform()) / rounds
        s_i = floor + u * (top - floor)
        rest = 1.0 - s_i - (n - 1) * floor  # to spread above the others' floors
        d = rng.dirichlet(np.ones(n - 1))
        others = floor + max(rest, 0.0) * d
        row = np.insert(others, i, s_i)
        out[k] = row / row.sum()
    return out


def _record_line(
    seq: int,
    timestamp: float,
    obs: Observation,
    previous: Mapping[str, int],
    weights: Mapping[str, int],
    *,
    pushed: bool,
    acked: bool | None,
    push_ms: float | None,
    ack_ms: float | None,
    version: str | None,
    moved: float,
    notes: Sequence[str],
    step_ms: float,
    error: str | None = None,
) -> dict[str, Any]:
    """The JSON a :class:`~balanceiq.control.records.DecisionRecord` writes with its observation."""

    def num(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else round(float(x), 6)

    return {
        "seq": seq,
        "timestamp": timestamp,
        "mode": "explore",
        "critical": [],
        "weights": dict(weights),
        "previous": dict(previous),
        "reward": None,
        "moved": num(moved),
        "pushed": pushed,
        "acked": acked,
        "push_ms": num(push_ms),
        "ack_ms": num(ack_ms),
        "version": version,
        "notes": list(notes),
        "source": obs.source,
        "error": error,
        "step_ms": num(step_ms),
        "scores": None,
        "observation": obs.to_json(),
    }


class Explorer:
    """The exploration loop: observe, push the schedule's split when a hold ends, record.

    ``observe(weights)`` returns an :class:`Observation` (the real ``Telemetry.observe``);
    ``push(weights)`` applies integer weights and returns ``(version, acked)``. Both are
    injected so the loop runs the same against the testbed or anything else.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        observe: Callable[[Mapping[str, float]], Observation],
        push: Callable[[Mapping[str, int]], tuple[str | None, bool | None]],
        recording: Path | str,
        plan: ExplorationPlan | None = None,
        *,
        initial: Mapping[str, int] | None = None,
    ) -> None:
        self.addresses = list(addresses)
        self.observe = observe
        self.push = push
        self.recording = Path(recording)
        self.recording.parent.mkdir(parents=True, exist_ok=True)
        self.plan = plan or ExplorationPlan()
        self.weights: dict[str, int] = dict(initial) if initial else dict.fromkeys(self.addresses, 1)
        self.records = 0
        self.pushes = 0
        self.failed_pushes = 0
        self.sources: dict[str, int] = {}

    def _shares(self, weights: Mapping[str, int]) -> np.ndarray:
        w = np.array([weights[a] for a in self.addresses], dtype=np.float64)
        return w / w.sum()

    def run(self, duration_s: float, stop: threading.Event | None = None) -> dict[str, Any]:
        """Explore for ``duration_s`` seconds (or until ``stop``); returns a summary."""
        plan = self.plan
        holds = max(1, math.ceil(duration_s / plan.hold_s))
        splits = exploration_splits(
            len(self.addresses), holds, floor=plan.floor, max_share=plan.max_share, seed=plan.seed
        )
        start = time.monotonic()
        next_hold = 0
        seq = 0
        with self.recording.open("a", encoding="utf-8") as fh:
            tick = start
            while True:
                now = time.monotonic()
                if now - start >= duration_s or (stop is not None and stop.is_set()):
                    break
                t0 = time.perf_counter()
                wall = time.time()
                obs = self.observe(dict(self.weights))
                self.sources[obs.source] = self.sources.get(obs.source, 0) + 1
                previous = dict(self.weights)
                pushed, acked, version, push_ms, ack_ms, error = False, None, None, None, None, None
                moved = 0.0
                notes: list[str] = []
                due = start + next_hold * plan.hold_s
                if next_hold < holds and now >= due - 1e-3:
                    new = {
                        a: int(w)
                        for a, w in zip(self.addresses, shares_to_weights(splits[next_hold], scale=WEIGHT_SCALE))
                    }
                    notes.append(f"explore: split {next_hold + 1}/{holds}, held {plan.hold_s:g}s")
                    next_hold += 1
                    t_push = time.perf_counter()
                    try:
                        version, acked = self.push(new)
                    except Exception as exc:  # a failed push is recorded and explored past
                        self.failed_pushes += 1
                        error = f"push failed: {type(exc).__name__}: {exc}"
                    else:
                        push_ms = (time.perf_counter() - t_push) * 1000
                        if acked:
                            ack_ms = push_ms
                        moved = traffic_moved(self._shares(previous), self._shares(new))
                        self.weights = new
                        pushed = True
                        self.pushes += 1
                line = _record_line(
                    seq + 1,
                    wall,
                    obs,
                    previous,
                    self.weights,
                    pushed=pushed,
                    acked=acked,
                    push_ms=push_ms,
                    ack_ms=ack_ms,
                    version=version,
                    moved=moved,
                    notes=notes,
                    step_ms=(time.perf_counter() - t0) * 1000,
                    error=error,
                )
                seq += 1
                fh.write(json.dumps(line) + "\n")
                fh.flush()
                self.records += 1
                tick += plan.observe_every_s
                wait = tick - time.monotonic()
                if wait > 0:
                    if stop is not None:
                        stop.wait(wait)
                    else:
                        time.sleep(wait)
                else:
                    tick = time.monotonic()  # fell behind: do not burst to catch up
        return {
            "recording": str(self.recording),
            "records": self.records,
            "pushes": self.pushes,
            "failed_pushes": self.failed_pushes,
            "holds": holds,
            "sources": dict(self.sources),
            "elapsed_s": round(time.monotonic() - start, 2),
        }


# The default saturation and in-flight queries read gauges at the last scrape: one
# instant, quantised to 1/concurrency. Averaged over the rate window they describe the
# same interval as the record's rps and latency (what the simulator's utilisation and
# Little's-law in-flight mean), with a fraction of the noise.
_WINDOWED_QUERIES = {
    "saturation": (
        "max by (backend) (avg_over_time(backend_inflight_requests[$window])"
        " / avg_over_time(backend_concurrency_limit[$window]))",
        "backend",
    ),
    "inflight": (
        'sum by (envoy_endpoint_address) (avg_over_time(envoy_cluster_endpoint_rq_active{envoy_cluster_name="$cluster"}[$window]))',
        "envoy_endpoint_address",
    ),
}


def exploration_settings(settings: Settings, *, window_s: float = 2.0, scrape_interval_s: float = 0.25) -> Settings:
    """``settings`` with a short telemetry window (so each held split is measured on its
    own) and saturation / in-flight averaged over that window instead of read at one
    scrape."""
    queries = dict(settings.telemetry.queries)
    for signal, (promql, label) in _WINDOWED_QUERIES.items():
        queries[signal] = SignalQuery(promql=promql, endpoint_label=label)
    return settings.model_copy(
        update={
            "prometheus": settings.prometheus.model_copy(update={"scrape_interval_s": scrape_interval_s}),
            "telemetry": settings.telemetry.model_copy(
                update={
                    "window_s": window_s,
                    "stale_after_s": max(settings.telemetry.stale_after_s, 2 * window_s),
                    "queries": queries,
                }
            ),
        }
    )


def record_exploration(
    settings: Settings,
    out: Path | str,
    *,
    duration_s: float = 60.0,
    rate_rps: float = 120.0,
    plan: ExplorationPlan | None = None,
    window_s: float = 2.0,
    scrape_interval_s: float | None = None,
    load_concurrency: int = 64,
    workdir: Path | str | None = None,
    console: Console | None = None,
    cluster: str | None = None,
) -> dict[str, Any]:
    """Start a testbed for ``settings``, explore under load for ``duration_s``, stop it all.

    Appends to ``out`` (JSONL). Load goes to Envoy on loopback only, paced at ``rate_rps``
    and bounded to ``rate_rps * (duration_s + 60)`` requests. The telemetry window is
    shortened to ``window_s`` and Prometheus scrapes every ``scrape_interval_s`` (default
    ``window_s / 8``: saturation is sampled busy slots, and eight samples per window
    instead of four cut its noise, and the capacity error, by about a third at this
    size); ``plan.hold_s`` defaults to ``window_s + 2`` so each split is measured on its
    own. Returns a summary
    with the load's totals and the backends' configured parameters (the ground truth a
    calibration is compared with).
    """
    from balanceiq.telemetry.observe import Telemetry
    from balanceiq.testbed.load import run_load_sync
    from balanceiq.testbed.ports import check_ports_free
    from balanceiq.testbed.testbed import Testbed, backend_specs
    from balanceiq.xds.server import XdsServer

    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise TestbedError(f"duration must be > 0 seconds, got {duration_s}")
    if not (0 < rate_rps <= 2000):
        raise TestbedError(f"rate must be in (0, 2000] requests/s, got {rate_rps}")
    console = console or Console(stderr=True)
    if scrape_interval_s is None:
        scrape_interval_s = window_s / 8
    settings = exploration_settings(settings, window_s=window_s, scrape_interval_s=scrape_interval_s)
    plan = plan or ExplorationPlan(hold_s=window_s + 2.0)
    check_ports_free(settings)
    c = settings.cluster(cluster) if cluster else settings.clusters[0]
    addresses = [ep.address for ep in c.endpoints]
    out = Path(out)
    warmup_budget_s = 40.0
    summary: dict[str, Any] = {"cluster": c.name, "endpoints": addresses}
    with tempfile.TemporaryDirectory(prefix="balanceiq-record-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        xds = XdsServer(settings, state_dir=None)
        xds.start()
        stop = threading.Event()
        loads: list[Any] = []
        loader: threading.Thread | None = None
        telemetry: Telemetry | None = None
        try:
            with console.status(f"starting {len(addresses)} backends, ALS, Envoy and Prometheus"):
                # ROUND_ROBIN: the sweep sets each endpoint's share by its weight exactly.
                tb = Testbed(settings, work / "testbed", health_check_interval_s=60, lb_policy="ROUND_ROBIN").start()
            try:

                def push(weights: Mapping[str, int]) -> tuple[str | None, bool | None]:
                    version = xds.set_assignment(c.name, dict(weights))
                    return version, xds.wait_for_ack(version, None, 2.0)

                with console.status("waiting for Envoy to take the first assignment"):
                    initial = dict.fromkeys(addresses, WEIGHT_SCALE // max(1, len(addresses)))
                    version = xds.set_assignment(c.name, initial)
                    if not xds.wait_for_ack(version, None, 15.0):
                        raise TestbedError("Envoy did not ACK the first assignment within 15 s")
                total = int(rate_rps * (duration_s + warmup_budget_s + 20))
                loader = threading.Thread(
                    target=lambda: loads.append(
                        run_load_sync(
                            tb.envoy.listen_url,
                            total=total,
                            concurrency=load_concurrency,
                            max_seconds=duration_s + warmup_budget_s + 20,
                            rate_rps=rate_rps,
                            stop=stop,
                            timeout_s=10.0,
                        )
                    ),
                    daemon=True,
                    name="balanceiq-record-load",
                )
                loader.start()
                telemetry = Telemetry(settings, c.name, retry_s=0.5)
                with console.status("warming up: waiting for a full telemetry window of every endpoint"):
                    deadline = time.monotonic() + warmup_budget_s
                    time.sleep(window_s + 2 * scrape_interval_s)
                    while True:
                        obs = telemetry.observe(initial)
                        if obs.source == "prometheus" and all(
                            e.usable and math.isfinite(e.p50_ms) for e in obs.endpoints
                        ):
                            break
                        if time.monotonic() > deadline:
                            raise TestbedError(
                                f"telemetry not usable after {warmup_budget_s:.0f}s of load: {obs.errors}"
                            )
                        time.sleep(0.5)
                explorer = Explorer(addresses, telemetry.observe, push, out, plan, initial=initial)
                with console.status(f"exploring for {duration_s:g}s at {rate_rps:g} rps -> {out}"):
                    summary.update(explorer.run(duration_s))
            finally:
                stop.set()
                if loader is not None:
                    loader.join(20)
                if telemetry is not None:
                    telemetry.close()
                tb.stop()
        finally:
            xds.stop()
    if loads:
        lr = loads[0].to_json()
        summary["load"] = {k: lr[k] for k in ("sent", "ok", "failed", "backend_5xx", "rps", "errors")}
    summary["truth"] = truth_from_specs(backend_specs(settings))
    summary["window_s"] = window_s
    summary["scrape_interval_s"] = scrape_interval_s
    summary["hold_s"] = plan.hold_s
    return summary


def truth_from_specs(specs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The backends' configured parameters, keyed by name (= endpoint address), with the
    :class:`~balanceiq.testbed.backend.BackendSettings` defaults for keys a spec leaves out
    (the testbed does not set ``jitter_ms``: every backend adds U(0, 1 ms))."""
    from balanceiq.testbed.backend import BackendSettings

    keys = ("base_latency_ms", "concurrency", "error_rate", "jitter_ms", "extra_latency_ms", "tail_prob", "tail_ms")
    defaults = {f.name: f.default for f in dataclasses.fields(BackendSettings) if f.name in keys}
    return {str(s["name"]): {k: float(s.get(k, defaults.get(k, 0.0))) for k in keys} for s in specs}
