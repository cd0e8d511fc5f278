"""Exploration recordings for calibration: steady weights give one operating point per endpoint, fitting capacity and
the latency curve needs many. :class:`Explorer` runs the controller's loop (DecisionRecords, mode ``"explore"``) while
sweeping each endpoint's share in turn; ``balanceiq calibrate`` reads these and controller recordings alike."""

from __future__ import annotations

import functools
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

from balanceiq.config import ClusterConfig, Settings, SignalQuery
from balanceiq.exceptions import TestbedError
from balanceiq.policy.lp import shares_to_weights, traffic_moved
from balanceiq.sim.calibrate.recording import DecisionRecord
from balanceiq.telemetry.observation import Observation
from balanceiq.testbed.fleet import FleetProvider, resolve_fleet
from balanceiq.testbed.live_config import with_windows

WEIGHT_SCALE = 1000
"""Weights pushed sum to this: shares are realised to 0.1%."""
WARMUP_BUDGET_S = 40.0


@dataclass(frozen=True)
class ExplorationPlan:
    """How the explorer moves traffic. Defaults suit a 2-core box at ~100-150 rps."""

    hold_s: float = 4.0  # seconds each split is held (>= the telemetry window plus a scrape or two)
    observe_every_s: float = 1.0  # seconds between observations (one record each)
    floor: float = 0.04  # least share any endpoint gets: it stays measured (latency needs traffic)
    max_share: float = 0.7  # most share the swept endpoint gets
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.hold_s > 0 and self.observe_every_s > 0):
            raise ValueError("hold_s and observe_every_s must be > 0")
        if not 0 <= self.floor < self.max_share <= 1:
            raise ValueError(f"need 0 <= floor < max_share <= 1, got floor={self.floor} max_share={self.max_share}")


def exploration_splits(n: int, count: int, *, floor: float = 0.04, max_share: float = 0.7, seed: int = 0) -> np.ndarray:
    """``count`` splits over ``n`` endpoints (rows sum to 1, every share >= floor). Row ``k``
    gives endpoint ``k mod n`` a stratified draw over ``[floor, max_share]`` (its sweeps cover
    the range evenly) and the others ``floor`` plus a Dirichlet(1) part of the rest."""
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
        s_i = floor + (strata[i, r] + rng.uniform()) / rounds * (top - floor)
        rest = 1.0 - s_i - (n - 1) * floor  # to spread above the others' floors
        row = np.insert(floor + max(rest, 0.0) * rng.dirichlet(np.ones(n - 1)), i, s_i)
        out[k] = row / row.sum()
    return out


class Explorer:
    """Observe, push the schedule's split when a hold ends, record. ``observe(weights)`` (e.g.
    ``Telemetry.observe``) and ``push(weights) -> (version, acked)`` are injected."""

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
        self.records = self.pushes = self.failed_pushes = 0
        self.sources: dict[str, int] = {}

    def _shares(self, weights: Mapping[str, int]) -> np.ndarray:
        w = np.array([weights[a] for a in self.addresses], dtype=np.float64)
        return w / w.sum()

    def _push(self, new: dict[str, int]) -> dict[str, Any]:
        """Push ``new``; the record's push fields (a failed push is recorded and explored past)."""
        previous = dict(self.weights)
        t_push = time.perf_counter()
        try:
            version, acked = self.push(new)
        except Exception as exc:
            self.failed_pushes += 1
            return {"error": f"push failed: {type(exc).__name__}: {exc}"}
        push_ms = (time.perf_counter() - t_push) * 1000
        self.weights = new
        self.pushes += 1
        return {
            "pushed": True,
            "acked": acked,
            "version": version,
            "push_ms": push_ms,
            "ack_ms": push_ms if acked else None,
            "moved": traffic_moved(self._shares(previous), self._shares(new)),
        }

    def run(self, duration_s: float, stop: threading.Event | None = None) -> dict[str, Any]:
        """Explore for ``duration_s`` seconds (or until ``stop``); returns a summary."""
        plan = self.plan
        holds = max(1, math.ceil(duration_s / plan.hold_s))
        splits = exploration_splits(
            len(self.addresses), holds, floor=plan.floor, max_share=plan.max_share, seed=plan.seed
        )
        start = time.monotonic()
        next_hold = seq = 0
        with self.recording.open("a", encoding="utf-8") as fh:
            tick = start
            while (now := time.monotonic()) - start < duration_s and not (stop is not None and stop.is_set()):
                t0 = time.perf_counter()
                wall = time.time()
                obs = self.observe(dict(self.weights))
                self.sources[obs.source] = self.sources.get(obs.source, 0) + 1
                previous = dict(self.weights)
                fields: dict[str, Any] = {"pushed": False, "moved": 0.0}
                notes: list[str] = []
                if next_hold < holds and now >= start + next_hold * plan.hold_s - 1e-3:
                    shares = shares_to_weights(splits[next_hold], scale=WEIGHT_SCALE)
                    notes.append(f"explore: split {next_hold + 1}/{holds}, held {plan.hold_s:g}s")
                    next_hold += 1
                    fields.update(self._push({a: int(w) for a, w in zip(self.addresses, shares)}))
                step_ms = (time.perf_counter() - t0) * 1000
                seq += 1
                fields.update(seq=seq, timestamp=wall, mode="explore", previous=previous, notes=tuple(notes))
                fields.update(weights=dict(self.weights), source=obs.source, step_ms=step_ms)
                line = DecisionRecord(**fields, observation=obs.to_json())
                fh.write(json.dumps(line.to_json(with_observation=True)) + "\n")
                fh.flush()
                self.records += 1
                tick += plan.observe_every_s
                wait = tick - time.monotonic()
                if wait <= 0:
                    tick = time.monotonic()  # fell behind: do not burst to catch up
                elif stop is not None:
                    stop.wait(wait)
                else:
                    time.sleep(wait)
        return {
            "recording": str(self.recording),
            "records": self.records,
            "pushes": self.pushes,
            "failed_pushes": self.failed_pushes,
            "holds": holds,
            "sources": dict(self.sources),
            "elapsed_s": round(time.monotonic() - start, 2),
        }


# The default saturation and in-flight queries read one scrape (quantised to 1/concurrency);
# averaged over the rate window they cover the record's interval, with a fraction of the noise.
_WINDOWED_QUERIES = {
    "saturation": SignalQuery(
        promql="max by (backend) (avg_over_time(backend_inflight_requests[$window])"
        " / avg_over_time(backend_concurrency_limit[$window]))",
        endpoint_label="backend",
    ),
    "inflight": SignalQuery(
        promql='sum by (envoy_endpoint_address) (avg_over_time(envoy_cluster_endpoint_rq_active{envoy_cluster_name="$cluster"}[$window]))',
        endpoint_label="envoy_endpoint_address",
    ),
}


def _push_and_ack(xds: Any, cluster: str, weights: Mapping[str, int], timeout: float) -> tuple[str, bool]:
    version = xds.set_assignment(cluster, dict(weights))
    return version, xds.wait_for_ack(version, None, timeout)


@dataclass(frozen=True)
class Explored:
    """One exploration run: the fleet and cluster it explores, what it records, and how."""

    provider: FleetProvider
    settings: Settings
    cluster: ClusterConfig
    out: Path | str
    plan: ExplorationPlan
    duration_s: float
    rate_rps: float
    load_concurrency: int
    console: Console


def _explore(run: Explored, listen_url: str, xds: Any, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Load the running fleet and explore it into ``run.out``; returns the load's result."""
    from balanceiq.telemetry.observe import Telemetry

    loads: list[dict[str, Any]] = []
    stop = threading.Event()
    loader: threading.Thread | None = None
    telemetry: Telemetry | None = None
    console, cluster, addresses = run.console, run.cluster.name, [ep.address for ep in run.cluster.endpoints]
    try:
        initial = dict.fromkeys(addresses, WEIGHT_SCALE // max(1, len(addresses)))
        with console.status("waiting for Envoy to take the first assignment"):
            if not _push_and_ack(xds, cluster, initial, 15.0)[1]:
                raise TestbedError("Envoy did not ACK the first assignment within 15 s")
        max_s = run.duration_s + WARMUP_BUDGET_S + 20
        run_load = functools.partial(run.provider.run_load, listen_url, total=int(run.rate_rps * max_s), timeout_s=10.0)
        kw = {"concurrency": run.load_concurrency, "max_seconds": max_s, "rate_rps": run.rate_rps, "stop": stop}
        loader = threading.Thread(
            target=lambda: loads.append(run_load(**kw)), daemon=True, name="balanceiq-record-load"
        )
        loader.start()
        telemetry = Telemetry(run.settings, cluster, retry_s=0.5)
        with console.status("warming up: waiting for a full telemetry window of every endpoint"):
            deadline = time.monotonic() + WARMUP_BUDGET_S
            time.sleep(run.settings.telemetry.window_s + 2 * run.settings.prometheus.scrape_interval_s)
            while True:
                obs = telemetry.observe(initial)
                if obs.source == "prometheus" and all(e.usable and math.isfinite(e.p50_ms) for e in obs.endpoints):
                    break
                if time.monotonic() > deadline:
                    raise TestbedError(f"telemetry not usable after {WARMUP_BUDGET_S:.0f}s of load: {obs.errors}")
                time.sleep(0.5)
        push = functools.partial(_push_and_ack, xds, cluster, timeout=2.0)
        explorer = Explorer(addresses, telemetry.observe, push, run.out, run.plan, initial=initial)
        with console.status(f"exploring for {run.duration_s:g}s at {run.rate_rps:g} rps -> {run.out}"):
            summary.update(explorer.run(run.duration_s))
    finally:
        stop.set()
        if loader is not None:
            loader.join(20)
        if telemetry is not None:
            telemetry.close()
    return loads


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
    fleet: FleetProvider | str | None = None,
) -> dict[str, Any]:
    """Start a sample fleet (:mod:`balanceiq.testbed.fleet`) for ``settings``, explore it under
    paced load for ``duration_s`` into ``out`` (JSONL), stop it all. Prometheus scrapes every
    ``scrape_interval_s`` (default ``window_s / 8``: more saturation samples per window, less
    noise). The summary holds the load's totals and the backends' parameters (ground truth)."""
    from balanceiq.testbed.ports import check_ports_free
    from balanceiq.xds.server import XdsServer

    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise TestbedError(f"duration must be > 0 seconds, got {duration_s}")
    if not (0 < rate_rps <= 2000):
        raise TestbedError(f"rate must be in (0, 2000] requests/s, got {rate_rps}")
    provider = resolve_fleet(fleet, "balanceiq record")
    console = console or Console(stderr=True)
    scrape_interval_s = window_s / 8 if scrape_interval_s is None else scrape_interval_s
    # A short telemetry window (each held split measured on its own), saturation and in-flight averaged over it.
    queries = {**settings.telemetry.queries, **_WINDOWED_QUERIES}
    short = with_windows(settings, window_s, max(settings.telemetry.stale_after_s, 2 * window_s), scrape_interval_s)
    settings = short.model_copy(update={"telemetry": short.telemetry.model_copy(update={"queries": queries})})
    plan = plan or ExplorationPlan(hold_s=window_s + 2.0)
    check_ports_free(settings)
    c = settings.cluster(cluster) if cluster else settings.clusters[0]
    addresses = [ep.address for ep in c.endpoints]
    summary: dict[str, Any] = {"cluster": c.name, "endpoints": addresses}
    run = Explored(provider, settings, c, out, plan, duration_s, rate_rps, load_concurrency, console)
    with tempfile.TemporaryDirectory(prefix="balanceiq-record-") as tmp:
        xds = XdsServer(settings, state_dir=None)
        xds.start()
        try:
            with console.status(f"starting {len(addresses)} backends, ALS, Envoy and Prometheus"):
                # ROUND_ROBIN: the sweep sets each endpoint's share by its weight exactly.
                fl = provider.start(
                    settings,
                    (Path(workdir) if workdir else Path(tmp)) / "testbed",
                    prometheus=True,
                    health_check_interval_s=60,
                    lb_policy="ROUND_ROBIN",
                )
            try:
                loads = _explore(run, fl.listen_url, xds, summary)
            finally:
                fl.stop()
        finally:
            xds.stop()
    if loads:
        summary["load"] = {k: loads[0][k] for k in ("sent", "ok", "failed", "backend_5xx", "rps", "errors")}
    summary["truth"] = provider.truth(settings)
    summary.update(window_s=window_s, scrape_interval_s=scrape_interval_s, hold_s=plan.hold_s)
    return summary
