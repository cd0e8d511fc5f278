"""A suite fleet as a simulator scenario (its digital twin), and the arms run on it.

The twin has the fleet's backends (capacity, slots, service-time spread, tail, price), its
offered rate and its timeline: each backend's state between two events, as the testbed's
scenario driver leaves it, becomes simulator events over that stretch. ``bench sim
--suite`` runs every suite arm on the twins and, given a ``bench live --suite`` result,
says how well the simulator agrees with the testbed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from balanceiq.policy.baselines import Decision
from balanceiq.sim.scenario import Scenario, scenario_from_dict
from balanceiq_lab.bench.arms import arm, run_pair
from balanceiq_lab.bench.live import DEFAULT_SLO_MS
from balanceiq_lab.bench.suite import DEFAULT_SUITE_WARMUP_S, Fleet
from balanceiq_lab.errors import BenchError
from balanceiq_lab.stability import reversal_events
from balanceiq_lab.testbed.scenario import initial_states, state_truth, states_after

NETWORK_MS = 1.0
"""What loopback, Envoy and the load generator add to every request (ms)."""
CLIENT_TIMEOUT_MS = 10_000.0
"""The suite's load generator gives up on a request after this long."""

# bench live's suite arms, as (simulator arm, Envoy balancer under the controller's weights).
SUITE_SIM_ARMS: dict[str, tuple[str, str]] = {
    "round_robin": ("round_robin", "round_robin"),
    "least_request": ("least_request", "least_request"),
    "cswrr": ("cswrr", "cswrr"),
    "balanceiq_rr": ("cfr_rl", "round_robin"),
    "balanceiq_lr": ("cfr_rl", "least_request"),
    "oracle": ("oracle", "least_request"),
    # Issue #14's ablation, everything else equal: every endpoint re-optimised each
    # decision, and the imitation teacher (the K furthest from that optimum), behind the
    # same controller and decision core over LEAST_REQUEST.
    "full_lp_lr": ("full_lp", "least_request"),
    "teacher_lr": ("teacher", "least_request"),
}
SUITE_DEFAULT_ARMS = ("round_robin", "least_request", "cswrr", "balanceiq_rr", "balanceiq_lr", "oracle")


def _cv(sigma: float) -> float:
    """Coefficient of variation of a lognormal service time."""
    return float(min(1.0, max(0.02, math.sqrt(math.expm1(sigma * sigma)))))


def _segment_events(
    base: dict[str, Any], state: dict[str, Any], target: str, at: float, dur: float
) -> list[dict[str, Any]]:
    """Simulator events that turn ``base`` into ``state`` from ``at`` for ``dur`` seconds."""
    t0, t1 = state_truth(base), state_truth(state)
    out: list[dict[str, Any]] = []
    ev = {"at_s": round(at, 6), "duration_s": round(dur, 6), "target": target}
    if not t1["healthy"]:
        return [{**ev, "kind": "fail"}]
    slots = int(state["concurrency"]) / int(base["concurrency"])
    if slots != 1.0:
        out.append({**ev, "kind": "servers", "value": slots})
    rest = t1["capacity_rps"] / t0["capacity_rps"] / slots
    if abs(rest - 1.0) > 1e-9:
        out.append({**ev, "kind": "capacity", "value": rest})
    if t1["error_rate"] > 0:
        out.append({**ev, "kind": "errors", "value": min(1.0, t1["error_rate"])})
    if (state.get("tail_prob", 0.0), state.get("tail_ms", 0.0)) != (
        base.get("tail_prob", 0.0),
        base.get("tail_ms", 0.0),
    ):
        tp, tm = float(state.get("tail_prob", 0.0)), float(state.get("tail_ms", 0.0))
        if tp > 0 and tm > 0:
            out.append({**ev, "kind": "tail_latency", "value": tm, "fraction": tp})
    if t1["price"] != t0["price"]:
        out.append({**ev, "kind": "cost", "value": t1["price"] / t0["price"]})
    return out


def fleet_scenario(fleet: Fleet, warmup_s: float = DEFAULT_SUITE_WARMUP_S) -> Scenario:
    """The twin of ``fleet``: warm-up first, then the measured run with its events."""
    settings, live = fleet.settings, fleet.scenario
    initial = initial_states(settings)
    addresses = [ep.address for ep in settings.clusters[0].endpoints]
    endpoints = []
    for b, address in zip(fleet.backends, addresses, strict=True):
        endpoints.append(
            {
                "name": address,
                "cloud": b.cloud,
                "region": b.region,
                "capacity_rps": b.capacity_rps,
                "base_latency_ms": NETWORK_MS,
                "cost_per_million": b.price,
                "servers": b.concurrency,
                "service_cv": _cv(b.sigma),
                "tail_prob": b.tail_prob,
                "tail_ms": b.tail_ms if b.tail_prob > 0 else 0.0,
            }
        )
    scale = fleet.duration_s / live.duration_s
    times = sorted({e.at_s for e in live.events})
    bounds = [*times, live.duration_s]
    events: list[dict[str, Any]] = []
    for j, at in enumerate(times):
        states = states_after(settings, [e for e in live.events if e.at_s <= at])
        start, end = warmup_s + at * scale, warmup_s + bounds[j + 1] * scale
        for address in addresses:
            if states[address] != initial[address]:
                events += _segment_events(initial[address], states[address], address, start, end - start)
    return scenario_from_dict(
        {
            "name": f"twin-{fleet.seed}",
            "description": f"simulator twin of suite fleet {fleet.seed}",
            "duration_s": warmup_s + fleet.duration_s,
            "timeout_ms": CLIENT_TIMEOUT_MS - NETWORK_MS,
            "endpoints": endpoints,
            "demand": {"base_rps": fleet.rate_rps, "diurnal_amplitude": 0.0, "noise": 0.0},
            "events": [e for e in events if e["duration_s"] > 0],
        }
    )


class _LiveOracle:
    """bench live's oracle arm: the LP on the truth with the controller's knobs, pushed as
    least-request weights from the true service times, at the start and after each event."""

    name = "oracle"

    def __init__(self, fleet: Fleet, warmup_s: float) -> None:
        self.fleet, self.warmup_s = fleet, warmup_s
        self.scale = fleet.duration_s / fleet.scenario.duration_s
        self.reset()

    def reset(self) -> None:
        self._pushed: tuple[int, np.ndarray] | None = None

    def decide(self, obs: Any, ctx: Any) -> Decision:
        from balanceiq_lab.bench.live import oracle_for

        t = float(obs.timestamp) - self.warmup_s
        events = [e for e in self.fleet.scenario.events if e.at_s * self.scale <= t]
        if self._pushed is None or self._pushed[0] != len(events):  # pushed at the start and after each event
            o = oracle_for(self.fleet.settings, events, demand_rps=self.fleet.rate_rps, slo_ms=DEFAULT_SLO_MS)
            addresses = [ep.address for ep in self.fleet.settings.clusters[0].endpoints]
            self._pushed = (len(events), np.array([o["weights"][a] for a in addresses], dtype=np.float64))
        w = self._pushed[1]
        return Decision(w / w.sum(), w, ())


def run_twin(
    fleet: Fleet,
    arms: list[str],
    *,
    seed: int = 0,
    saturation: bool = False,
    warmup_s: float = DEFAULT_SUITE_WARMUP_S,
    checkpoint: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Every arm on the twin of ``fleet``, decided every second like the live controller, with no capacity hints;
    per arm the measured run's p50/p99, error rate and $/M over every request, as bench
    live reports them. Without ``saturation`` nothing reports load (no gauges, no ORCA)."""
    scenario = fleet_scenario(fleet, warmup_s)
    out: dict[str, dict[str, Any]] = {}
    for name in arms:
        sim_arm, balancer = SUITE_SIM_ARMS[name]
        policy, bal, weights = arm(sim_arm, checkpoint, balancer)
        if name == "oracle":  # as bench live pushes it: its own least-request weights
            policy, weights = _LiveOracle(fleet, warmup_s), False
        res = run_pair(
            scenario,
            policy,
            seed=seed,
            decision_steps=1,
            trace=True,
            balancer=bal,
            controller_weights=weights,
            saturation=saturation,
            warmup_s=warmup_s,
            capacity_hints=False,  # a suite fleet has none
        )
        out[name] = {k: res["run"][k] for k in ("p50_ms", "p99_ms", "error_rate", "cost_per_million")}
        # What the controller asked for (Envoy's balancer moves more on its own).
        out[name]["traffic_moved"] = res["traffic_moved"] * res["decisions"]
        shares = [dict(zip(res["names"], p["shares"], strict=True)) for p in res["timeline"]]
        out[name]["reversals"] = len(reversal_events(shares))
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(x: list[float]) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float64)
        order = arr.argsort(kind="stable")
        r = np.empty(arr.size)
        r[order] = np.arange(arr.size, dtype=np.float64)
        for v in np.unique(arr):
            tie = arr == v
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(sim: dict[int, dict[str, dict[str, Any]]], live: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """How well the twins' p99 agrees with the testbed's, fleet by fleet and arm by arm:
    Spearman's rank correlation of the arms within each fleet, and sim / live per arm."""
    per_fleet: dict[str, Any] = {}
    ratios: dict[str, list[float]] = {}
    for seed, arms in sorted(sim.items()):
        measured = live.get(seed, {})
        common = [a for a in arms if isinstance(measured.get(a), dict) and measured[a].get("p99_ms")]
        if not common:
            continue
        s = [float(arms[a]["p99_ms"]) for a in common]
        m = [float(measured[a]["p99_ms"]) for a in common]
        per_fleet[str(seed)] = {
            "arms": common,
            "sim_p99_ms": [round(x, 1) for x in s],
            "live_p99_ms": [round(x, 1) for x in m],
            "spearman": round(spearman(s, m), 3) if len(common) > 2 else None,
        }
        for a, x, y in zip(common, s, m, strict=True):
            ratios.setdefault(a, []).append(x / y)
    every = [r for rs in ratios.values() for r in rs]
    rhos = [f["spearman"] for f in per_fleet.values() if f["spearman"] is not None and math.isfinite(f["spearman"])]
    return {
        "fleets": per_fleet,
        "spearman_median": float(np.median(rhos)) if rhos else None,
        "spearman_ge_0_8_fraction": float(np.mean([r >= 0.8 for r in rhos])) if rhos else None,
        "p99_within_30pct_fraction": float(np.mean([abs(math.log(r)) <= math.log(1.3) for r in every]))
        if every
        else None,
        "p99_sim_over_live_geomean": {a: round(float(np.exp(np.mean(np.log(rs)))), 3) for a, rs in ratios.items()},
        "p99_within_30pct_by_arm": {
            a: round(float(np.mean([abs(math.log(r)) <= math.log(1.3) for r in rs])), 3) for a, rs in ratios.items()
        },
    }


def live_arms(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """``{fleet seed: {arm: its numbers}}`` from a ``bench live --suite --json`` result."""
    fleets = result.get("fleets") if isinstance(result, dict) else None
    if not isinstance(fleets, list):
        raise BenchError("not a `bench live --suite --json` result: no list of fleets")
    return {int(f["seed"]): dict(f.get("arms", {})) for f in fleets if isinstance(f, dict) and "seed" in f}


def run_twin_suite(
    n: int,
    seed: int,
    *,
    arms: list[str] | None = None,
    live: dict[str, Any] | None = None,
    saturation: bool = False,
    checkpoint: Path | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """The suite's fleets (as ``bench live --suite n --seed seed`` draws them) in the
    simulator, every arm; with ``live`` (that command's JSON) how the two agree."""
    from balanceiq_lab.bench.suite import MAX_FLEETS, SEED_STRIDE, draw_fleet
    from balanceiq_lab.progress import progress_bar

    arms = arms or list(SUITE_DEFAULT_ARMS)
    unknown = [a for a in arms if a not in SUITE_SIM_ARMS]
    if unknown:
        raise BenchError(f"unknown suite arms {', '.join(unknown)}; known: {', '.join(SUITE_SIM_ARMS)}")
    if not (isinstance(n, int) and 1 <= n <= MAX_FLEETS and seed >= 0):
        raise BenchError(f"--suite must be 1..{MAX_FLEETS} fleets and --seed >= 0, got {n} and {seed}")
    sim: dict[int, dict[str, dict[str, Any]]] = {}
    with progress_bar(console) as progress:
        task = progress.add_task("twin fleets", total=n)
        for i in range(n):
            fleet = draw_fleet(seed * SEED_STRIDE + i)
            sim[fleet.seed] = run_twin(fleet, arms, saturation=saturation, checkpoint=checkpoint)
            progress.advance(task)
    out: dict[str, Any] = {
        "bench": "sim",
        "suite": n,
        "seed": seed,
        "arms": arms,
        "saturation": saturation,
        "fleets": {str(k): {a: {m: round(x, 4) for m, x in v.items()} for a, v in r.items()} for k, r in sim.items()},
    }
    if live is not None:
        out["agreement"] = agreement(sim, live_arms(live))
    return out
