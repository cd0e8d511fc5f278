"""`balanceiq bench live`: BalanceIQ against Envoy's own balancers, side by side, live.

Every arm gets the same conditions, one arm after the other:

* **the same testbed**, fresh for each arm on free loopback ports: the configured
  endpoints' clouds, prices, capacity hints and testbed profiles (``balanceiq.yaml``),
  the sample backends (delays are ``asyncio`` sleeps, so they cost no CPU; ORCA load
  reports on in every arm, since one arm needs them), the ALS exporter, one Envoy and
  Prometheus (scraping every 0.5 s), and an in-process :class:`~balanceiq.xds.server.XdsServer`;
* **the same open-loop load** (:mod:`balanceiq_lab.openloop`, in its own process):
  one arrival schedule (Poisson from ``seed``, or constant) for every arm, latency from
  the *intended* send time, a bounded number in flight, unsendable requests counted as
  errors;
* **the same scenario timeline** (:class:`~balanceiq_lab.testbed.scenario.ScenarioDriver`,
  as in the demo), scaled uniformly to ``duration_s`` and started after ``warmup_s`` of
  steady traffic that is not measured.

Arms (``ARMS``): Envoy ``ROUND_ROBIN``, ``LEAST_REQUEST`` and
``client_side_weighted_round_robin`` (weights from the backends' ORCA reports) with
equal EDS weights nothing changes; static cost-aware weights
(:class:`~balanceiq.policy.baselines.CostAwareStatic`, pushed once) over round robin;
and BalanceIQ (an in-process :class:`~balanceiq.control.controller.Controller` with the
shipped policy, 1 s interval (CSWRR recomputes its weights every second too), 2 s telemetry window, prices from the scenario through
``ControlPlane.update_policy`` as ``PUT /api/policy`` does) over ``ROUND_ROBIN`` and over
``LEAST_REQUEST``; and the **oracle**: the LP on the truth (each backend's true capacity,
mean service time and price, from the testbed profiles and the scenario's events), pushed
before the load and again right after every event, over the shipped lb_policy
(``DEFAULT_LB_POLICY``). The backends' private gauges (in-flight, concurrency limit: the
``saturation`` signal) are off for every arm unless ``private_gauges``: a real backend
exports neither. ``reversals`` (:mod:`balanceiq_lab.stability`) counts each arm's
weight ping-pong over the measured decisions (the oracle's pushes; 0 for static weights).
``balanceiq bench live --suite N`` runs the arms over random fleets instead
(:mod:`balanceiq_lab.bench.suite`).

Per arm, over the measured requests: p50/p99/p99.9 latency (every request, failures
included, from its intended send time), error rate (anything but 2xx, transport errors
and unsent requests included), ``cost_per_million`` (each request a backend answered
costs that backend's price *at the time it answered*, prices change mid-run; divided by
all measured requests), ``slo_attainment`` (2xx within ``slo_ms``), per phase of the
scenario, and p99 / cost per ``bin_s`` bin for the plot. Before the arms, the rate the
box sustains is measured (a ramp through the same stack with zero-delay backends), and
the generator's own overhead (schedule lag, CPU per request, a zero-delay calibration
directly against one backend).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.progress import Progress

from balanceiq.config import BACKEND_SATURATION, EndpointConfig, EnvoyConfig, Settings, SignalQuery, TelemetryConfig
from balanceiq.exceptions import BalanceIQError
from balanceiq_lab.bench.processes import cores_by_role, cpu_by_role, leftovers
from balanceiq_lab.bench.settings import bench_settings as common_settings
from balanceiq_lab.errors import BenchError
from balanceiq_lab.openloop import ARRIVALS, OpenLoopResult, cli_argv
from balanceiq_lab.progress import progress_bar
from balanceiq_lab.results import error_rate, latency_summary, slo_attainment
from balanceiq_lab.stability import reversal_events
from balanceiq_lab.stack import Stack
from balanceiq_lab.testbed.envoy import CSWRR
from balanceiq_lab.testbed.profiles import behaviour_for
from balanceiq_lab.testbed.scenario import LiveEvent, LiveScenario, state_truth, states_after

# -- the arms ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    lb_policy: str  # Envoy's policy for the cluster
    weights: str  # "equal" (nothing changes them) | "cost_aware" (pushed once) | "controller" | "oracle"
    family: str  # "envoy" (Envoy's own balancer, cost-blind) | "static" | "balanceiq" | "oracle"
    control: tuple[tuple[str, float], ...] = ()  # the controller's settings this arm changes
    default: bool = True  # run when --arms is not given; experiments are named explicitly


DEFAULT_LB_POLICY = EnvoyConfig().lb_policy  # what BalanceIQ ships with
_SHORT = {"ROUND_ROBIN": "rr", "LEAST_REQUEST": "lr", CSWRR: "cswrr"}
_BIQ_RR = Arm("balanceiq_rr", "BalanceIQ over ROUND_ROBIN", "ROUND_ROBIN", "controller", "balanceiq")
_BIQ_LR = Arm("balanceiq_lr", "BalanceIQ over LEAST_REQUEST", "LEAST_REQUEST", "controller", "balanceiq")
# BalanceIQ over the lb_policy it ships with: one of the two above, or its own arm.
DEFAULT_ARM = next(
    (a for a in (_BIQ_RR, _BIQ_LR) if a.lb_policy == DEFAULT_LB_POLICY),
    Arm(
        f"balanceiq_{_SHORT.get(DEFAULT_LB_POLICY, DEFAULT_LB_POLICY.lower())}",
        f"BalanceIQ over {DEFAULT_LB_POLICY}",
        DEFAULT_LB_POLICY,
        "controller",
        "balanceiq",
    ),
)
ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("round_robin", "Envoy ROUND_ROBIN", "ROUND_ROBIN", "equal", "envoy"),
        Arm("least_request", "Envoy LEAST_REQUEST", "LEAST_REQUEST", "equal", "envoy"),
        Arm("cswrr", "Envoy CSWRR (ORCA)", CSWRR, "equal", "envoy"),
        Arm("static_cost_aware", "static cost-aware weights (RR)", "ROUND_ROBIN", "cost_aware", "static"),
        _BIQ_RR,
        _BIQ_LR,
        DEFAULT_ARM,
        # The LP on the true capacity, latency and price, re-pushed at every event (the
        # harness knows them): what a balancer that knew everything would do.
        Arm("oracle", f"oracle: LP on the truth ({DEFAULT_LB_POLICY})", DEFAULT_LB_POLICY, "oracle", "oracle"),
        # A comparison, side by side with balanceiq_lr: the LP's utilisation knee at 0.5, the
        # default until session 18 (BENCHMARKS.md, "A queueing endpoint sheds at once").
        replace(
            _BIQ_LR,
            name="balanceiq_lr_knee50",
            label="BalanceIQ over LEAST_REQUEST, knee 0.5",
            control=(("util_target", 0.5),),
            default=False,
        ),
    )
}

# Defaults sized so every arm plus the capacity ramp fits a short run (see BENCHMARKS.md).
DEFAULT_RATE_RPS = 150.0
DEFAULT_DURATION_S = 60.0
DEFAULT_WARMUP_S = 12.0  # > CSWRR's default 10 s blackout; the controller's first decisions
DEFAULT_SLO_MS = 150.0
CONTROL_INTERVAL_S = 1.0
TELEMETRY_WINDOW_S = 2.0
SCRAPE_INTERVAL_S = 0.5
BIN_S = 2.0
MAX_INFLIGHT = 1000
CLIENT_TIMEOUT_S = 11.0  # Envoy's route timeout is 10 s: its 504 is what a client sees
RAMP_STEP_S = 5.0
RAMP_FACTORS = (1, 2, 4, 8, 12)
SUSTAIN_P99_MS = 20.0  # zero-delay backends: anything above is the pipeline queueing
SUSTAIN_LAG_P99_MS = 10.0
TOKEN = "bench-live-token-0123456789"
TARGETS_TEXT = {
    "p99_vs_least_request": ("p99 <= 0.8 x LEAST_REQUEST", 0.8),
    "p99_vs_round_robin": ("p99 <= 0.5 x ROUND_ROBIN", 0.5),
    "p99_vs_cswrr": ("p99 <= 1.0 x CSWRR", 1.0),
    "cost_vs_best_cost_blind": ("cost <= 0.75 x best cost-blind arm, SLO attainment >= its", 0.75),
    "errors_vs_envoy_arms": ("error rate <= every Envoy arm's", 1.0),
}


def arm_base(arm: Arm, base: Settings) -> Settings:
    """``base`` with the controller settings ``arm`` changes."""
    if not arm.control:
        return base
    return base.model_copy(update={"control": base.control.model_copy(update=dict(arm.control))})


def parse_arms(text: str | None) -> list[Arm]:
    """``a,b,...`` (default all, in ``ARMS`` order); BenchError naming unknown ones."""
    if not text:
        return [a for a in ARMS.values() if a.default]
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        raise BenchError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(ARMS)}")
    if len(set(names)) != len(names):
        raise BenchError(f"--arms names an arm twice: {text}")
    return [ARMS[n] for n in names]


def validate_args(*, rate_rps: float, duration_s: float, warmup_s: float, slo_ms: float, bin_s: float) -> None:
    problems = []
    if not (math.isfinite(rate_rps) and 0 < rate_rps <= 2000):
        problems.append(f"--rate must be in (0, 2000] requests/s (loopback, bounded), got {rate_rps}")
    if not (math.isfinite(duration_s) and 2 <= duration_s <= 3600):
        problems.append(f"--duration must be in 2..3600 seconds, got {duration_s}")
    if not (math.isfinite(warmup_s) and 0 <= warmup_s <= 600):
        problems.append(f"--warmup must be in 0..600 seconds, got {warmup_s}")
    if not (math.isfinite(slo_ms) and slo_ms > 0):
        problems.append(f"--slo-ms must be > 0, got {slo_ms}")
    if not (math.isfinite(bin_s) and 0.1 <= bin_s <= duration_s):
        problems.append(f"bin width must be in 0.1..duration seconds, got {bin_s}")
    if rate_rps * (duration_s + warmup_s) > 1_000_000:
        problems.append("rate x (duration + warm-up) must stay under 1,000,000 requests per arm")
    if problems:
        raise BenchError("; ".join(problems))


# -- settings and scenario on free ports ------------------------------------------------------


# The ``saturation`` signal when the backends' private gauges are off: a metric nothing
# exports, so saturation reads "unmeasured" as it would for a real backend. (The default
# query reads ORCA reports through the ALS exporter; the backends send ORCA in every arm
# because CSWRR needs it, so it is off here too: BalanceIQ's numbers are from latency,
# rates and in-flight requests alone.)
NO_PRIVATE_GAUGES = SignalQuery(promql="max by (backend) (balanceiq_private_gauges_off)", endpoint_label="backend")


def bench_settings(
    base: Settings, state_dir: Path, *, private_gauges: bool = False, orca: bool = False, lb_policy: str | None = None
) -> tuple[Settings, dict[str, str]]:
    """``base``'s first cluster (clouds, prices, capacity hints, weights, testbed
    profiles) with every port free right now, the bench's fast telemetry and control
    interval, and a fresh state dir. Returns it and {configured address: bench address}.

    Unless ``private_gauges``, the ``saturation`` query reads a metric that does not
    exist: the testbed backends' in-flight and concurrency-limit gauges are theirs, not
    something a real backend exports, so no arm may use them. ``orca``: the shipped default
    query instead, the backends' ORCA load reports through the ALS exporter (Envoy's
    standard, what CSWRR reads)."""
    cluster = base.clusters[0]
    saturation = (
        BACKEND_SATURATION if private_gauges else TelemetryConfig().queries["saturation"] if orca else NO_PRIVATE_GAUGES
    )
    free = common_settings(
        len(cluster.endpoints),
        base,
        state_dir=state_dir,
        scrape_interval_s=SCRAPE_INTERVAL_S,
        window_s=TELEMETRY_WINDOW_S,
        stale_after_s=2 * TELEMETRY_WINDOW_S,
        control_interval_s=CONTROL_INTERVAL_S,
    )
    mapping = {ep.address: new.address for ep, new in zip(cluster.endpoints, free.clusters[0].endpoints)}
    endpoints = [ep.model_copy(update={"address": mapping[ep.address]}) for ep in cluster.endpoints]
    overrides = {mapping[a]: p for a, p in base.testbed.overrides.items() if a in mapping}
    s = free.model_copy(
        update={
            "clusters": [cluster.model_copy(update={"endpoints": endpoints})],
            "testbed": base.testbed.model_copy(update={"overrides": overrides}),
            "telemetry": free.telemetry.model_copy(
                update={"queries": {**free.telemetry.queries, "saturation": saturation}}
            ),
            # The controller writes weights for the balancer Envoy runs in this arm.
            "envoy": free.envoy.model_copy(update={"lb_policy": lb_policy})
            if lb_policy in ("LEAST_REQUEST", "ROUND_ROBIN")
            else free.envoy,
        }
    )
    return s, mapping


def remap_scenario(scenario: LiveScenario, mapping: dict[str, str]) -> LiveScenario:
    """Events naming an ``endpoint`` by its configured address, moved to the bench's."""
    events = [
        e.model_copy(update={"endpoint": mapping.get(e.endpoint, e.endpoint)}) if e.endpoint else e
        for e in scenario.events
    ]
    return scenario.model_copy(update={"events": events})


# -- the oracle (pure; unit-tested) ---------------------------------------------------------------

ORACLE_MAX_UTIL_WITHOUT_ERRING = 0.9


def oracle_split(
    truth: dict[str, dict[str, Any]],
    *,
    demand_rps: float,
    slo_ms: float,
    cost_weight: float,
    util_target: float,
    latency_weight: float,
    lb_policy: str = "ROUND_ROBIN",
) -> dict[str, Any]:
    """The LP optimum on the truth (:func:`~balanceiq_lab.testbed.scenario.state_truth` per
    address): every endpoint critical, true capacity, price and mean service time over
    the SLO as the latency term, the controller's knobs. A backend that answers errors is
    left out (weight 1) when the others carry the demand below 90 % utilisation (worst
    error rate first): the LP has no error term, the oracle knows better. Unhealthy
    backends are left out. Returns {"weights", "shares", "excluded", "status"}."""
    from balanceiq.policy.decide import lp_latency
    from balanceiq.policy.lp import least_request_weights, shares_to_weights, solve_critical

    addrs = list(truth)
    n = len(addrs)
    cap = np.array([truth[a]["capacity_rps"] for a in addrs], dtype=np.float64)
    avail = np.array([bool(truth[a]["healthy"]) and cap[i] > 0 for i, a in enumerate(addrs)])
    excluded = [a for i, a in enumerate(addrs) if not avail[i]]
    for i in sorted(
        (i for i in range(n) if truth[addrs[i]]["error_rate"] > 0 and avail[i]),
        key=lambda i: -truth[addrs[i]]["error_rate"],
    ):
        rest = float(cap[avail].sum()) - cap[i]
        if rest * ORACLE_MAX_UTIL_WITHOUT_ERRING >= demand_rps:
            avail[i] = False
            excluded.append(addrs[i])
    lat = lp_latency(np.array([truth[a]["mean_service_ms"] for a in addrs], dtype=np.float64), slo_ms)
    res = solve_critical(
        np.full(n, 1.0 / n),
        list(range(n)),
        cap,
        [truth[a]["price"] for a in addrs],
        demand_rps,
        available=avail,
        cost_weight=cost_weight,
        util_target=util_target,
        latency=lat,
        latency_weight=latency_weight,
    )
    if lb_policy == "LEAST_REQUEST":
        # Under LEAST_REQUEST Envoy picks by weight / (active + 1); with the true service
        # times the oracle knows what each endpoint will hold (as the controller estimates).
        svc = np.array([truth[a]["mean_service_ms"] / 1000.0 for a in addrs], dtype=np.float64)
        w = least_request_weights(res.shares, svc, demand_rps, available=avail)
    else:
        w = shares_to_weights(res.shares, available=avail)
    return {
        "weights": {a: int(x) for a, x in zip(addrs, w)},
        "shares": {a: round(float(x), 4) for a, x in zip(addrs, res.shares)},
        "excluded": excluded,
        "status": res.status,
        "max_utilization": _r(res.max_utilization, 3),
    }


def oracle_for(settings: Settings, events: list[LiveEvent], *, demand_rps: float, slo_ms: float) -> dict[str, Any]:
    """:func:`oracle_split` once ``events`` have been applied to ``settings``' testbed,
    with ``settings.control``'s knobs."""
    truth = {a: state_truth(st) for a, st in states_after(settings, events).items()}
    c = settings.control
    return oracle_split(
        truth,
        demand_rps=demand_rps,
        slo_ms=slo_ms,
        cost_weight=c.cost_weight,
        util_target=c.util_target,
        latency_weight=c.latency_weight,
        lb_policy=DEFAULT_LB_POLICY,
    )


# -- accounting (pure; unit-tested) -----------------------------------------------------------


class PriceBook:
    """Each endpoint's price over time: the configured one, then every change (offsets in
    seconds from the run's start)."""

    def __init__(self, initial: dict[str, float]) -> None:
        self.changes: dict[str, list[tuple[float, float]]] = {a: [(-math.inf, float(p))] for a, p in initial.items()}

    def change(self, t: float, prices: dict[str, float]) -> None:
        for a, p in prices.items():
            self.changes.setdefault(a, [(-math.inf, math.nan)]).append((float(t), float(p)))
            self.changes[a].sort(key=lambda tp: tp[0])

    def price_at(self, address: str, t: np.ndarray) -> np.ndarray:
        ch = self.changes.get(address)
        if not ch:
            return np.full(np.shape(t), math.nan)
        times = np.array([c[0] for c in ch])
        prices = np.array([c[1] for c in ch])
        idx = np.searchsorted(times, np.asarray(t, dtype=np.float64), side="right") - 1
        return prices[np.clip(idx, 0, len(prices) - 1)]

    def request_prices(self, res: OpenLoopResult) -> np.ndarray:
        """Price (per million) of each request, at the time a backend answered it; 0 for
        requests no backend answered (Envoy's own errors, transport errors, unsent)."""
        out = np.zeros(len(res), dtype=np.float64)
        done = res.completed_s
        for ix, name in enumerate(res.backends):
            m = res.backend == ix
            if m.any():
                out[m] = self.price_at(name, done[m])
        return out


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def group_metrics(
    res: OpenLoopResult,
    mask: np.ndarray,
    prices: np.ndarray,
    slo_ms: float,
    clouds: dict[str, str] | None = None,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The headline numbers over the requests in ``mask``; with ``clouds`` (address ->
    cloud) the share answered by each cloud, with ``names`` (bench address -> configured
    address) by each endpoint under its configured address."""
    n = int(mask.sum())
    ok = res.ok & mask
    lat = res.latency_ms[mask]
    s = latency_summary(lat)
    out: dict[str, Any] = {
        "requests": n,
        "p50_ms": s["p50"],
        "p99_ms": s["p99"],
        "p999_ms": s["p999"],
        "max_ms": s["max"],
        "error_rate": _r(error_rate(n, int(ok.sum())), 5),
        "errors": n - int(ok.sum()),
        "cost_per_million": _r(float(prices[mask].sum()) / n, 4) if n else None,
        "slo_attainment": _r(slo_attainment(ok[mask], res.latency_ms[mask], slo_ms), 5),
    }
    if clouds is not None and n:
        share: Counter[str] = Counter()
        for ix, name in enumerate(res.backends):
            share[clouds.get(name, name)] += int(((res.backend == ix) & mask).sum())
        share["(no backend)"] = int(((res.backend < 0) & mask).sum())
        out["share_by_cloud"] = {c: round(v / n, 4) for c, v in sorted(share.items()) if v}
    if names is not None and n:
        out["share_by_endpoint"] = {
            names.get(name, name): round(int(((res.backend == ix) & mask).sum()) / n, 4)
            for ix, name in sorted(enumerate(res.backends), key=lambda kv: names.get(kv[1], kv[1]))
        }
    return out


def arm_metrics(
    res: OpenLoopResult,
    *,
    warmup_s: float,
    scale: float,
    scenario: LiveScenario,
    prices: PriceBook,
    slo_ms: float,
    bin_s: float,
    clouds: dict[str, str],
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Headline numbers over the measured requests (intended at or after ``warmup_s``),
    per scenario phase, and per ``bin_s`` bin (warm-up included, for the plot)."""
    p = prices.request_prices(res)
    measured = res.intended_s >= warmup_s
    out = group_metrics(res, measured, p, slo_ms, clouds, names)
    out["warmup_requests"] = int((~measured).sum())
    t_scen = (res.intended_s - warmup_s) / scale  # in the scenario file's own seconds
    phases = []
    bounds = [0.0] + [e.at_s for e in scenario.events] + [scenario.duration_s]
    phase_names = ["start"] + [e.name for e in scenario.events]
    for name, lo, hi in zip(phase_names, bounds[:-1], bounds[1:]):
        if hi <= lo:
            continue
        m = measured & (t_scen >= lo) & (t_scen < hi)
        phases.append(
            {
                "phase": name,
                "from_s": round(lo * scale, 2),
                "to_s": round(hi * scale, 2),
                **group_metrics(res, m, p, slo_ms, clouds, names),
            }
        )
    out["phases"] = phases
    t = res.intended_s - warmup_s
    n_bins = math.floor((float(t.max()) + warmup_s) / bin_s) + 1 if len(res) else 0
    bins: dict[str, list[Any]] = {
        "t_s": [],
        "p99_ms": [],
        "p50_ms": [],
        "error_rate": [],
        "cost_per_million": [],
        "requests": [],
    }
    for lo in (-warmup_s + k * bin_s for k in range(n_bins)):
        m = (t >= lo) & (t < lo + bin_s)
        k = int(m.sum())
        if not k:
            continue
        ls = latency_summary(res.latency_ms[m])
        bins["t_s"].append(round(float(lo + bin_s / 2), 3))
        bins["p99_ms"].append(ls["p99"])
        bins["p50_ms"].append(ls["p50"])
        bins["error_rate"].append(round(1 - float(res.ok[m].sum()) / k, 5))
        bins["cost_per_million"].append(round(float(p[m].sum()) / k, 4))
        bins["requests"].append(k)
    out["bins"] = bins
    return out


def evaluate_targets(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue #7's targets for each BalanceIQ arm present, against the Envoy arms present.

    "Best" BalanceIQ arm: lowest p99. The cost target's reference is the cost-blind
    (Envoy) arm with the highest SLO attainment (lower p99 breaks a tie)."""
    biq = {n: a for n, a in arms.items() if ARMS.get(n) and ARMS[n].family == "balanceiq"}
    envoy = {n: a for n, a in arms.items() if ARMS.get(n) and ARMS[n].family == "envoy"}
    out: dict[str, Any] = {"by_arm": {}, "best_arm": None}
    if not biq:
        out["note"] = "no BalanceIQ arm ran: nothing to evaluate"
        return out

    def p99(a: dict[str, Any]) -> float:
        v = a.get("p99_ms")
        return math.inf if v is None else float(v)

    best_blind = None
    if envoy:
        best_blind = max(envoy, key=lambda n: (envoy[n].get("slo_attainment") or 0.0, -p99(envoy[n])))
    for name, a in biq.items():
        res: dict[str, Any] = {}
        for key, ref in (
            ("p99_vs_least_request", "least_request"),
            ("p99_vs_round_robin", "round_robin"),
            ("p99_vs_cswrr", "cswrr"),
        ):
            text, limit = TARGETS_TEXT[key]
            if ref in arms and arms[ref].get("p99_ms"):
                ratio = p99(a) / float(arms[ref]["p99_ms"])
                res[key] = {"target": text, "ratio": _r(ratio, 3), "limit": limit, "met": bool(ratio <= limit)}
            else:
                res[key] = {"target": text, "ratio": None, "limit": limit, "met": None, "note": f"{ref} did not run"}
        text, limit = TARGETS_TEXT["cost_vs_best_cost_blind"]
        if best_blind is not None and envoy[best_blind].get("cost_per_million"):
            blind = envoy[best_blind]
            ratio = float(a["cost_per_million"]) / float(blind["cost_per_million"])
            slo_ok = (a.get("slo_attainment") or 0.0) >= (blind.get("slo_attainment") or 0.0)
            res["cost_vs_best_cost_blind"] = {
                "target": text,
                "reference": best_blind,
                "ratio": _r(ratio, 3),
                "limit": limit,
                "slo_attainment": a.get("slo_attainment"),
                "reference_slo_attainment": blind.get("slo_attainment"),
                "met": bool(ratio <= limit and slo_ok),
                "cost_met": bool(ratio <= limit),
                "slo_met": bool(slo_ok),
                # The same test against every cost-blind arm, for readers who take "best" otherwise.
                "vs_each": {
                    n: {
                        "ratio": _r(float(a["cost_per_million"]) / float(e["cost_per_million"]), 3),
                        "slo_at_least_as_good": bool(
                            (a.get("slo_attainment") or 0.0) >= (e.get("slo_attainment") or 0.0)
                        ),
                    }
                    for n, e in envoy.items()
                    if e.get("cost_per_million")
                },
            }
        else:
            res["cost_vs_best_cost_blind"] = {"target": text, "met": None, "note": "no cost-blind arm ran"}
        text, _ = TARGETS_TEXT["errors_vs_envoy_arms"]
        if envoy:
            worst_ok = all((a.get("error_rate") or 0.0) <= (e.get("error_rate") or 0.0) for e in envoy.values())
            res["errors_vs_envoy_arms"] = {
                "target": text,
                "error_rate": a.get("error_rate"),
                "envoy_error_rates": {n: e.get("error_rate") for n, e in envoy.items()},
                "met": bool(worst_ok),
            }
        else:
            res["errors_vs_envoy_arms"] = {"target": text, "met": None, "note": "no Envoy arm ran"}
        out["by_arm"][name] = res
    best = min(biq, key=lambda n: p99(biq[n]))
    out["best_arm"] = best
    out["best"] = out["by_arm"][best]
    out["met"] = {k: v.get("met") for k, v in out["best"].items()}
    return out


# -- processes ---------------------------------------------------------------------------------


_ROLES = (
    ("balanceiq_lab.openloop", "generator"),
    ("balanceiq_lab.testbed.backend", "backends"),
    ("balanceiq.telemetry.als", "als"),
    ("envoy", "envoy"),
    ("prometheus", "prometheus"),
)


def _cpu_snapshot() -> tuple[dict[int, tuple[str, float]], dict[int, float]]:
    """CPU seconds so far of this process ("harness": xDS server, controller, scenario
    driver) and its children by role, and of every other process on the machine."""
    ours = cpu_by_role(_ROLES, "harness")
    foreign: dict[int, float] = {}
    for p in psutil.process_iter(["pid", "cpu_times"]):
        if p.info["pid"] in ours or p.info["cpu_times"] is None:
            continue
        foreign[p.info["pid"]] = p.info["cpu_times"].user + p.info["cpu_times"].system
    return ours, foreign


def _cpu_delta(before: tuple[dict[int, tuple[str, float]], dict[int, float]], seconds: float) -> dict[str, Any]:
    ours0, foreign0 = before
    ours1, foreign1 = _cpu_snapshot()
    # Per pid, so processes that ended meanwhile do not cancel others' use (their own
    # last stretch is missed: a lower bound).
    foreign = sum(max(0.0, cpu - foreign0.get(pid, 0.0)) for pid, cpu in foreign1.items())
    if seconds <= 0:
        return {}
    return {
        "ours_cores": cores_by_role(ours0, ours1, seconds),
        "other_processes_cores": round(foreign / seconds, 2),
    }


Inspect = Callable[["ArmStack", OpenLoopResult], Any]


class Generator:
    """The open-loop generator as a child process: started, handed t=0, waited for."""

    def __init__(
        self,
        url: str,
        *,
        rate_rps: float,
        duration_s: float,
        arrivals: str,
        seed: int,
        out: Path,
        max_inflight: int = MAX_INFLIGHT,
        timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> None:
        self.out = out
        self.duration_s = duration_s
        self.timeout_s = timeout_s
        argv = cli_argv(
            url,
            rate_rps,
            duration_s,
            out,
            arrivals=arrivals,
            seed=seed,
            max_inflight=max_inflight,
            timeout_s=timeout_s,
            start_at="-",
        )
        self.err_path = out.with_suffix(".stderr")
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise BenchError(f"load generator did not start: {self.err_path.read_text(errors='replace')[-500:]}")
        self.start_wall = math.nan

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, lead_s: float = 0.3) -> float:
        """Fix t=0 ``lead_s`` from now; returns it (epoch seconds)."""
        self.start_wall = time.time() + lead_s
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{self.start_wall!r}\n")
        self.proc.stdin.close()
        return self.start_wall

    def wait(self, on_tick: Callable[[float], None] | None = None) -> OpenLoopResult:
        deadline = self.start_wall + self.duration_s + self.timeout_s + 30
        while self.proc.poll() is None:
            if time.time() > deadline:
                self.stop()
                raise BenchError("load generator overran its schedule by 30 s; killed")
            if on_tick is not None:
                on_tick(time.time() - self.start_wall)
            time.sleep(0.25)
        if self.proc.returncode != 0 or not self.out.exists():
            raise BenchError(
                f"load generator exited {self.proc.returncode}: {self.err_path.read_text(errors='replace')[-500:]}"
            )
        return OpenLoopResult.from_json(json.loads(self.out.read_text()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                if f is not None:
                    f.close()


# -- one stack ----------------------------------------------------------------------------------


class ArmStack(Stack):
    """A :class:`~balanceiq_lab.stack.Stack` on :func:`bench_settings` (free ports, the
    bench's windows, a fresh state dir), Envoy on ``lb_policy``, started; ``mapping`` is
    {configured address: bench address}."""

    def __init__(
        self, base: Settings, workdir: Path, lb_policy: str, *, private_gauges: bool = False, orca: bool = False
    ) -> None:
        settings, self.mapping = bench_settings(
            base, workdir / "state", private_gauges=private_gauges, orca=orca, lb_policy=lb_policy
        )
        super().__init__(settings, workdir, lb_policy=lb_policy)
        self.start()


def cost_aware_weights(cluster: Any) -> dict[str, int]:
    """:class:`CostAwareStatic` on the configured prices and capacity hints, as weights."""
    from balanceiq.policy.baselines import CostAwareStatic, PolicyContext
    from balanceiq.telemetry.observation import EndpointObservation, Observation

    eps: list[EndpointConfig] = list(cluster.endpoints)
    obs = Observation(
        cluster=cluster.name,
        source="api",
        endpoints=tuple(
            EndpointObservation(address=e.address, cost_per_million=e.cost_per_million_requests, healthy=True)
            for e in eps
        ),
    )
    n = len(eps)
    ctx = PolicyContext(
        shares=np.full(n, 1.0 / n),
        capacity_hint=np.array([e.capacity_rps or math.nan for e in eps], dtype=np.float64),
        static_weights=np.array([e.weight for e in eps], dtype=np.float64),
        demand_rps=0.0,
        k=1,
    )
    d = CostAwareStatic().decide(obs, ctx)
    return {e.address: int(w) for e, w in zip(eps, d.weights)}


# -- the rate the box sustains, and the generator's own overhead --------------------------------


def measure_capacity(
    base: Settings, rate_rps: float, workdir: Path, *, arrivals: str, seed: int, console: Console
) -> dict[str, Any]:
    """A stack like the arms' (ROUND_ROBIN) with every backend at zero delay and no
    concurrency limit, so only CPU limits it: (1) the generator alone against one
    backend at ``rate_rps`` (its latency floor, schedule lag, CPU per request); (2) a
    ramp through Envoy at 1, 2, 4, 8, 12 x ``rate_rps`` (at most 2,000), ``RAMP_STEP_S`` each, stopping at
    the first rate not sustained (any error, p99 > ``SUSTAIN_P99_MS`` or schedule lag
    p99 > ``SUSTAIN_LAG_P99_MS``)."""
    out: dict[str, Any] = {
        "criteria": {
            "errors": 0,
            "p99_ms_max": SUSTAIN_P99_MS,
            "schedule_lag_p99_ms_max": SUSTAIN_LAG_P99_MS,
            "step_s": RAMP_STEP_S,
        }
    }
    stack = ArmStack(base, workdir, "ROUND_ROBIN")
    pids = set(stack.pids)
    try:
        stack.control_all(
            {
                "base_latency_ms": 0.0,
                "jitter_ms": 0.0,
                "extra_latency_ms": 0.0,
                "tail_prob": 0.0,
                "concurrency": 100000,
                "error_rate": 0.0,
                "orca": True,
            }
        )
        stack.wait_routable()

        def run(url: str, rate: float, name: str) -> OpenLoopResult:
            g = Generator(
                url, rate_rps=rate, duration_s=RAMP_STEP_S, arrivals=arrivals, seed=seed, out=workdir / f"{name}.json"
            )
            pids.add(g.pid)
            g.start()
            return g.wait()

        direct_url = next(iter(stack.backend_urls.values())) + "/"
        with console.status(f"capacity: the generator alone against a zero-delay backend at {rate_rps:g} req/s"):
            r = run(direct_url, rate_rps, "calibration-direct")
        out["generator_calibration"] = {
            "what": "generator -> one zero-delay backend directly (no Envoy), open loop",
            "rate_rps": rate_rps,
            **_step_summary(r),
        }
        steps = []
        sustained = None
        for f in RAMP_FACTORS:
            rate = rate_rps * f
            if rate > 2000:
                break
            with console.status(f"capacity: {rate:g} req/s through Envoy to zero-delay backends"):
                r = run(stack.proxy_url, rate, f"ramp-{rate:g}")
            s = _step_summary(r)
            ok = (
                s["errors"] == 0
                and (s["latency_ms"]["p99"] or math.inf) <= SUSTAIN_P99_MS
                and (s["schedule_lag_ms"]["p99"] or 0.0) <= SUSTAIN_LAG_P99_MS
            )
            steps.append({"rate_rps": rate, "sustained": ok, **s})
            if not ok:
                break
            sustained = rate
        out["ramp"] = steps
        out["sustainable_rps"] = sustained
        out["sustainable_is_lower_bound"] = bool(steps and steps[-1]["sustained"])
    finally:
        stack.stop()
    out["leftover_processes"] = leftovers(pids, 10.0)
    return out


def _step_summary(r: OpenLoopResult) -> dict[str, Any]:
    s = r.summary()
    o = r.overhead()
    return {
        "requests": s["requests"],
        "errors": s["errors"],
        "achieved_rps": round(s["ok"] / r.duration_s, 1) if r.duration_s else None,
        "latency_ms": {k: s["latency_ms"][k] for k in ("p50", "p99", "p999", "max")},
        "schedule_lag_ms": o["schedule_lag_ms"],
        "cpu_ms_per_request": o["cpu_ms_per_request"],
        "generator_cores": o["cpu_cores"],
        "peak_inflight": o["peak_inflight"],
    }


# -- one arm ------------------------------------------------------------------------------------


_CpuSnapshot = tuple[dict[int, tuple[str, float]], dict[int, float]]


class _ArmRun:
    """One arm's stack, weights, scenario replay and load; :func:`run_arm` drives it."""

    def __init__(
        self,
        arm: Arm,
        base: Settings,
        scenario: LiveScenario,
        workdir: Path,
        *,
        rate_rps: float,
        duration_s: float,
        warmup_s: float,
        slo_ms: float,
        private_gauges: bool,
        orca: bool = False,
    ) -> None:
        self.arm = arm
        self.rate_rps, self.duration_s, self.warmup_s, self.slo_ms = rate_rps, duration_s, warmup_s, slo_ms
        self.stack = ArmStack(arm_base(arm, base), workdir, arm.lb_policy, private_gauges=private_gauges, orca=orca)
        self.pids = set(self.stack.pids)
        self.cluster = self.stack.settings.clusters[0]
        self.clouds = {ep.address: ep.cloud for ep in self.cluster.endpoints}
        self.scen = remap_scenario(scenario, self.stack.mapping)
        self.scale = duration_s / scenario.duration_s
        self.book = PriceBook({ep.address: ep.cost_per_million_requests for ep in self.cluster.endpoints})
        self.configured = {new: old for old, new in self.stack.mapping.items()}
        self.plane: Any = None
        self.driver: Any = None
        self.gen: Generator | None = None
        self.applied: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.oracle_pushes: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.start_wall = 0.0
        self.info: dict[str, Any] = {
            "label": arm.label,
            "lb_policy": arm.lb_policy,
            "weights": arm.weights,
            "family": arm.family,
            **({"control": dict(arm.control)} if arm.control else {}),
        }

    def push_oracle(self, n_events: int, t_s: float) -> None:
        events = self.scen.events
        o = oracle_for(self.stack.settings, events[:n_events], demand_rps=self.rate_rps, slo_ms=self.slo_ms)
        self.stack.push(o["weights"])
        self.oracle_pushes.append(
            {
                "t_s": round(t_s, 3),
                "after": events[n_events - 1].name if n_events else "start",
                "weights": {self.configured[a]: w for a, w in o["weights"].items()},
                "excluded": [self.configured[a] for a in o["excluded"]],
                "status": o["status"],
                "max_utilization": o["max_utilization"],
            }
        )

    def set_weights(self, scorer: Any, recording: Path | None) -> None:
        """The arm's weights: static, the oracle's first push, or a controller (not started yet)."""
        self.stack.control_all({"orca": True})  # every arm: the same backends, the same response headers
        self.stack.wait_routable()
        if self.arm.weights == "cost_aware":
            w = cost_aware_weights(self.cluster)
            self.stack.push(w)
            self.info["static_weights"] = w
        elif self.arm.weights == "oracle":
            self.push_oracle(0, -self.warmup_s)
        elif self.arm.weights == "controller":
            self.plane = self.stack.control_plane(scorer, token=TOKEN, recording=recording, retry_s=0.5)

    def on_prices(self, prices: dict[str, float]) -> None:
        self.book.change(time.time() - self.gen.start_wall if self.gen else 0.0, prices)
        if self.plane is not None:  # what PUT /api/policy {"costs": ...} does
            self.plane.update_policy({"costs": prices})

    def start(self, arrivals: str, seed: int, out: Path) -> _CpuSnapshot:
        """Generator, controller and scenario replay under way; the CPU snapshot at t=0."""
        from balanceiq_lab.testbed.scenario import ScenarioDriver

        self.driver = ScenarioDriver(list(self.cluster.endpoints), self.stack.backend_urls, on_prices=self.on_prices)
        self.gen = Generator(
            self.stack.proxy_url,
            rate_rps=self.rate_rps,
            duration_s=self.warmup_s + self.duration_s,
            arrivals=arrivals,
            seed=seed,
            out=out,
        )
        self.pids.add(self.gen.pid)
        if self.plane is not None:
            self.plane.start()
        cpu0 = _cpu_snapshot()
        self.start_wall = self.gen.start()
        self.thread = threading.Thread(target=self.replay, name="bench-live-scenario", daemon=True)
        self.thread.start()
        return cpu0

    def replay(self) -> None:
        start = self.start_wall
        for i, ev in enumerate(self.scen.events):
            at = start + self.warmup_s + ev.at_s * self.scale
            while (wait := at - time.time()) > 0:
                if self.stop.wait(min(wait, 0.5)):
                    return
            try:
                hit = self.driver.apply(ev)
                self.applied.append(
                    {
                        "name": ev.name,
                        "at_s": round(ev.at_s * self.scale, 3),
                        "applied_s": round(time.time() - start - self.warmup_s, 3),
                        "endpoints": hit,
                    }
                )
                if self.arm.weights == "oracle":
                    self.push_oracle(i + 1, time.time() - start - self.warmup_s)
            except Exception as exc:  # report it; the arm's numbers would be wrong
                self.failures.append(f"event {ev.name!r}: {type(exc).__name__}: {exc}")

    def wait(self, progress: Progress | None, cpu0: _CpuSnapshot) -> tuple[OpenLoopResult, dict[str, Any]]:
        """The load's result and the CPU used meanwhile, once the schedule has played out."""
        assert self.gen is not None
        total = self.warmup_s + self.duration_s
        task = progress.add_task(f"{self.arm.name}", total=total) if progress else None

        def tick(elapsed: float) -> None:
            if progress is not None and task is not None:
                w = self.warmup_s
                phase = "warm-up" if elapsed < w else self.scen.phase_at((elapsed - w) / self.scale)
                progress.update(
                    task, completed=min(max(elapsed, 0.0), total), description=f"{self.arm.name:<18} {phase[:22]}"
                )

        res = self.gen.wait(tick)
        cpu = _cpu_delta(cpu0, time.time() - self.start_wall)
        if progress is not None and task is not None:
            progress.update(task, completed=total, visible=False)
        self.stop.set()
        assert self.thread is not None
        self.thread.join(10)
        if self.failures:
            raise BenchError(f"arm {self.arm.name}: scenario events failed: {'; '.join(self.failures)}")
        return res, cpu

    def conclude(self, res: OpenLoopResult, inspect: Inspect | None) -> None:
        """Reversals, the controller's or oracle's record and ``inspect``, before teardown."""
        if self.plane is not None:
            self.info["controller"] = _controller_summary(
                self.plane.controller, self.start_wall, self.warmup_s, self.configured
            )
            self.info["reversals"] = self.info["controller"]["reversals"]
        elif self.arm.weights == "oracle":
            self.info["oracle_pushes"] = self.oracle_pushes
            self.info["reversals"] = len(reversal_events([p["weights"] for p in self.oracle_pushes]))
        else:
            self.info["reversals"] = 0
        if self.arm.family == "envoy" and self.arm.lb_policy == CSWRR:
            self.info["envoy_weights_at_end"] = self.stack.envoy_weights()  # CSWRR's own, from ORCA
        if inspect is not None:
            self.info["inspect"] = inspect(self.stack, res)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)
        if self.driver is not None:
            self.driver.close()
        if self.gen is not None:
            self.gen.stop()
        self.stack.stop()  # the controller's loop and telemetry too


def run_arm(
    arm: Arm,
    base: Settings,
    scenario: LiveScenario,
    workdir: Path,
    *,
    rate_rps: float,
    duration_s: float,
    warmup_s: float,
    arrivals: str,
    seed: int,
    slo_ms: float,
    bin_s: float,
    scorer: Any,
    progress: Progress | None = None,
    inspect: Inspect | None = None,
    private_gauges: bool = False,
    recording: Path | None = None,
    orca: bool = False,
) -> dict[str, Any]:
    """One arm on a fresh stack; returns its metrics (and the pids it started).

    ``recording``: the controller's decisions, each with its observation, as JSON lines
    (what ``balanceiq calibrate`` fits and what a decision is replayed from offline).

    ``inspect(stack, result)`` runs after the load, before teardown (tests read the
    backends' own counters there); what it returns is kept under ``"inspect"``.

    The oracle arm pushes :func:`oracle_for` (the truth: the testbed profiles with the
    events applied so far, ``rate_rps`` as demand) before the load and right after each
    event. Every arm's result has ``reversals`` (:func:`~balanceiq_lab.stability.reversal_events`
    over the measured decisions or pushes; 0 for arms whose weights never change)."""
    t_arm = time.monotonic()
    run = _ArmRun(
        arm,
        base,
        scenario,
        workdir,
        rate_rps=rate_rps,
        duration_s=duration_s,
        warmup_s=warmup_s,
        slo_ms=slo_ms,
        private_gauges=private_gauges,
        orca=orca,
    )
    try:
        run.set_weights(scorer, recording)
        cpu0 = run.start(arrivals, seed, workdir / "load.json")
        res, cpu = run.wait(progress, cpu0)
        run.conclude(res, inspect)
    finally:
        run.close()
    m = arm_metrics(
        res,
        warmup_s=warmup_s,
        scale=run.scale,
        scenario=scenario,
        prices=run.book,
        slo_ms=slo_ms,
        bin_s=bin_s,
        clouds=run.clouds,
        names=run.configured,
    )
    return {
        **run.info,
        **m,
        "events": run.applied,
        "generator": res.overhead(),
        "cpu": cpu,
        "price_changes": {a: [[_r(t, 3), p] for t, p in ch[1:]] for a, ch in run.book.changes.items() if len(ch) > 1},
        "backends": {a: run.clouds[a] for a in run.clouds},
        "wall_s": round(time.monotonic() - t_arm, 1),
        "_pids": sorted(run.pids),
    }


def _controller_summary(
    controller: Any, start_wall: float, warmup_s: float, names: dict[str, str] | None = None
) -> dict[str, Any]:
    """Decisions, modes, pushes, each decision's weights (per endpoint, under its
    configured address with ``names``; the weights Envoy was left with: the new ones if
    pushed, else the previous) and share per cloud, and ``reversals`` of the decided
    split (weights differ from it under LEAST_REQUEST, which they compensate) over the
    measured decisions (t >= 0, after the warm-up)."""
    recs = list(reversed(controller.log.recent(100000)))
    modes = Counter(r.mode for r in recs)
    clouds: dict[str, str] = {ep.address: ep.cloud for ep in controller.cluster.endpoints}
    names = names or {}
    timeline = []
    measured: list[dict[str, float]] = []
    split: dict[str, float] | None = None  # the split decided last (weights realise it)
    for r in recs:
        weights: dict[str, int] = dict(r.weights if r.pushed or not r.previous else r.previous)
        if r.pushed and getattr(r, "shares", None):
            split = dict(r.shares)
        total = sum(weights.values()) or 1
        by_cloud: dict[str, float] = defaultdict(float)
        for a, w in weights.items():
            by_cloud[clouds.get(a, a)] += w / total
        t_s = round(r.timestamp - start_wall - warmup_s, 2)
        if t_s >= 0:
            measured.append(split or {a: float(w) for a, w in weights.items()})
        timeline.append(
            {
                "t_s": t_s,
                "mode": r.mode,
                "pushed": r.pushed,
                "share_by_cloud": {c: round(v, 3) for c, v in sorted(by_cloud.items())},
                "weights": {names.get(a, a): int(w) for a, w in sorted(weights.items())},
            }
        )
    return {
        "decisions": len(recs),
        "modes": dict(modes),
        "pushes": sum(1 for r in recs if r.pushed),
        "errors": sum(1 for r in recs if r.error),
        "reversals": len(reversal_events(measured)),
        "measured_decisions": len(measured),
        "weight_timeline": timeline,
    }


# -- output -------------------------------------------------------------------------------------


HEADLINE = ("p50_ms", "p99_ms", "p999_ms", "error_rate", "cost_per_million", "slo_attainment", "requests")


def markdown_table(result: dict[str, Any]) -> str:
    """The per-arm table (as in BENCHMARKS.md)."""
    slo = result["setup"]["slo_ms"]
    lines = [
        f"| arm | p50 ms | p99 ms | p99.9 ms | error rate | $ / M req | SLO attainment (≤ {slo:g} ms) | requests |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    best = (result.get("targets") or {}).get("best_arm")
    for name, a in result["arms"].items():
        label = f"**{a['label']}**" if name == best else a["label"]
        lines.append(
            f"| {label} | {f(a['p50_ms'], '.1f')} | {f(a['p99_ms'], '.0f')} | {f(a['p999_ms'], '.0f')} | "
            f"{f(None if a['error_rate'] is None else 100 * a['error_rate'], '.2f')} % | "
            f"{f(a['cost_per_million'], '.3f')} | {f(None if a['slo_attainment'] is None else 100 * a['slo_attainment'], '.2f')} % | "
            f"{a['requests']} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """p99 per bin (log scale) and $ per million per bin, one line per arm; events as
    vertical lines; the warm-up shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    styles = {"envoy": "-", "static": ":", "balanceiq": "-", "oracle": "--"}
    for a in result["arms"].values():
        b = a["bins"]
        lw = 2.2 if a["family"] == "balanceiq" else 1.3
        ax1.plot(
            b["t_s"],
            [v if v is not None else float("nan") for v in b["p99_ms"]],
            styles.get(a["family"], "-"),
            label=a["label"],
            linewidth=lw,
            drawstyle="steps-mid",
        )
        ax2.plot(
            b["t_s"],
            b["cost_per_million"],
            styles.get(a["family"], "-"),
            label=a["label"],
            linewidth=lw,
            drawstyle="steps-mid",
        )
    warm = result["setup"]["warmup_s"]
    events: list[dict[str, Any]] = next((a["events"] for a in result["arms"].values() if a["events"]), [])
    for ax in (ax1, ax2):
        ax.axvspan(-warm, 0, color="0.92", zorder=0)
        for ev in events:
            ax.axvline(ev["applied_s"], color="0.35", linestyle="--", linewidth=0.9)
    for ev in events:
        ax1.annotate(
            ev["name"],
            (ev["applied_s"], 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            color="0.25",
        )
    ax1.annotate(
        "warm-up (not measured)", (-warm, 0.0), xycoords=("data", "axes fraction"), va="bottom", fontsize=8, color="0.4"
    )
    ax1.axhline(result["setup"]["slo_ms"], color="tab:red", linewidth=0.8, alpha=0.6)
    ax1.set_yscale("log")
    ax1.set_ylabel(f"p99 latency per {result['setup']['bin_s']:g} s (ms)")
    ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax2.set_ylabel("$ per million requests")
    ax2.set_xlabel(f"seconds into the scenario (x{result['scenario']['time_scale']:.2f} of the file's timeline)")
    s = result["setup"]
    fig.suptitle(
        f"balanceiq bench live: {result['scenario']['name']}, {s['rate_rps']:g} req/s open loop "
        f"({s['arrivals']}), latency from intended send time"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the run --------------------------------------------------------------------------------------


def run_live_bench(
    base: Settings,
    scenario: LiveScenario,
    *,
    arms: list[Arm] | None = None,
    rate_rps: float = DEFAULT_RATE_RPS,
    duration_s: float = DEFAULT_DURATION_S,
    warmup_s: float = DEFAULT_WARMUP_S,
    arrivals: str = "poisson",
    seed: int = 0,
    slo_ms: float = DEFAULT_SLO_MS,
    bin_s: float = BIN_S,
    plot_path: Path | None = Path("artifacts/bench-live.png"),
    calibrate: bool = True,
    scenario_file: str | None = None,
    console: Console | None = None,
    inspect: Inspect | None = None,
    private_gauges: bool = False,
    orca: bool = False,
) -> dict[str, Any]:
    """Run every arm (see the module docstring); returns the result (one JSON object).
    ``inspect``: see :func:`run_arm` (tests). ``private_gauges``: let the controller read
    the testbed backends' in-flight / concurrency-limit gauges (off: see :func:`bench_settings`)."""
    console = console or Console(stderr=True)
    arms = arms if arms is not None else parse_arms(None)
    validate_args(rate_rps=rate_rps, duration_s=duration_s, warmup_s=warmup_s, slo_ms=slo_ms, bin_s=bin_s)
    if arrivals not in ARRIVALS:
        raise BenchError(f"arrivals must be one of {', '.join(ARRIVALS)}, got {arrivals!r}")
    if not base.clusters or not base.clusters[0].endpoints:
        raise BenchError("the config has no endpoints to balance")
    scenario.check_targets(list(base.clusters[0].endpoints))
    # Ray's and torch's chatter must not reach stdout: it carries exactly one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        return _run(
            base,
            scenario,
            arms,
            rate_rps,
            duration_s,
            warmup_s,
            arrivals,
            seed,
            slo_ms,
            bin_s,
            plot_path,
            calibrate,
            scenario_file,
            console,
            inspect,
            private_gauges,
            orca,
        )


def _load_scorer(console: Console) -> tuple[Any, dict[str, Any]]:
    with console.status("loading the shipped policy checkpoint"):
        try:
            from balanceiq.serve.policy import PolicyModel

            model = PolicyModel()
        except BalanceIQError:
            raise
        except Exception as exc:
            raise BenchError(f"could not load the policy checkpoint: {type(exc).__name__}: {exc}") from exc
    return (lambda rows: model.score_many([rows])[0]), {"checkpoint": str(model.checkpoint)}


def _result_header(
    base: Settings,
    scenario: LiveScenario,
    arms: list[Arm],
    setup: dict[str, Any],
    scenario_file: str | None,
    private_gauges: bool,
    orca: bool = False,
) -> dict[str, Any]:
    """The result's scenario, setup and machine sections, before any arm runs."""
    scale = setup["duration_s"] / scenario.duration_s
    return {
        "bench": "live",
        "scenario": {
            "name": scenario.name,
            "file": scenario_file,
            "duration_s": scenario.duration_s,
            "time_scale": round(scale, 4),
            "events": [
                {"name": e.name, "at_s": e.at_s, "replayed_at_s": round(e.at_s * scale, 3)} for e in scenario.events
            ],
        },
        "setup": {
            **setup,
            "control_interval_s": CONTROL_INTERVAL_S,
            "telemetry_window_s": TELEMETRY_WINDOW_S,
            "scrape_interval_s": SCRAPE_INTERVAL_S,
            "max_inflight": MAX_INFLIGHT,
            "client_timeout_s": CLIENT_TIMEOUT_S,
            "envoy_route_timeout_s": 10.0,
            "arms": [a.name for a in arms],
            "private_gauges": private_gauges,
            "orca_for_balanceiq": orca,
            "endpoints": [
                {
                    "address": ep.address,
                    "cloud": ep.cloud,
                    "region": ep.region,
                    "cost_per_million": ep.cost_per_million_requests,
                    "capacity_rps": ep.capacity_rps,
                    "testbed": behaviour_for(base.testbed, ep),
                }
                for ep in base.clusters[0].endpoints
            ],
            "method": "open loop: one arrival schedule for every arm, latency from the intended send time; "
            "a fresh testbed per arm; the scenario scaled to duration_s after an unmeasured warm-up",
        },
        "machine": {"cores": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
    }


def _calibrate_capacity(
    base: Settings, rate_rps: float, work: Path, arrivals: str, seed: int, console: Console, notes: list[str]
) -> dict[str, Any]:
    """The ramp that finds the rate this box sustains (notes when ``rate_rps`` is above it)."""
    try:
        cap = measure_capacity(base, rate_rps, work / "capacity", arrivals=arrivals, seed=seed, console=console)
    except BalanceIQError:
        raise
    except Exception as exc:
        raise BenchError(f"capacity measurement failed: {type(exc).__name__}: {exc}") from exc
    sus = cap.get("sustainable_rps")
    if sus is None or sus < rate_rps:
        notes.append(
            f"--rate {rate_rps:g} is above the rate this box sustained in the ramp ({sus}): "
            "the arms' latencies include the machine's own queueing"
        )
    if cap["leftover_processes"]:
        notes.append(f"capacity stack left processes: {cap['leftover_processes']}")
    return cap


def _arm_verdict(arm: Arm, r: dict[str, Any], notes: list[str], console: Console) -> None:
    """Flag an arm the machine disturbed; print its headline."""
    lag = r["generator"]["schedule_lag_ms"]["p99"] or 0.0
    r["disturbed"] = bool(lag > SUSTAIN_LAG_P99_MS)
    if r["disturbed"]:
        notes.append(
            f"{arm.name}: the generator's schedule lag p99 was {lag:.0f} ms (> {SUSTAIN_LAG_P99_MS:g}; "
            f"other processes used {r['cpu'].get('other_processes_cores')} cores): the machine "
            "was busy during this arm and its latencies include that"
        )
    console.print(
        f"  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  p99.9 {r['p999_ms']} ms  "
        f"errors {100 * (r['error_rate'] or 0):.2f} %  ${r['cost_per_million']}/M  "
        f"SLO {100 * (r['slo_attainment'] or 0):.2f} %  ({r['wall_s']} s)",
        highlight=False,
    )


def _generator_overhead(arms: dict[str, dict[str, Any]], capacity: dict[str, Any] | None) -> dict[str, Any]:
    lags = [a["generator"]["schedule_lag_ms"]["p99"] for a in arms.values()]
    cpu = [a["generator"]["cpu_ms_per_request"] for a in arms.values()]
    return {
        "schedule_lag_p99_ms_max_over_arms": max((x for x in lags if x is not None), default=None),
        "cpu_ms_per_request_mean_over_arms": round(float(np.mean(cpu)), 4) if cpu else None,
        "not_sent_total": sum(a["generator"]["not_sent"] for a in arms.values()),
        "calibration": (capacity or {}).get("generator_calibration"),
    }


def _run(
    base: Settings,
    scenario: LiveScenario,
    arms: list[Arm],
    rate_rps: float,
    duration_s: float,
    warmup_s: float,
    arrivals: str,
    seed: int,
    slo_ms: float,
    bin_s: float,
    plot_path: Path | None,
    calibrate: bool,
    scenario_file: str | None,
    console: Console,
    inspect: Inspect | None = None,
    private_gauges: bool = False,
    orca: bool = False,
) -> dict[str, Any]:
    t0 = time.monotonic()
    notes: list[str] = []
    all_pids: set[int] = set()
    setup = {
        "rate_rps": rate_rps,
        "arrivals": arrivals,
        "seed": seed,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "slo_ms": slo_ms,
        "bin_s": bin_s,
    }
    result = _result_header(base, scenario, arms, setup, scenario_file, private_gauges, orca)
    if len(base.clusters) > 1:
        notes.append(f"only the first cluster ({base.clusters[0].name}) is benchmarked")
    with tempfile.TemporaryDirectory(prefix="balanceiq-bench-live-") as tmp:
        work = Path(tmp)
        scorer = None
        if any(a.family == "balanceiq" for a in arms):
            scorer, info = _load_scorer(console)
            result["setup"]["policy"] = info
        if calibrate:
            result["capacity"] = _calibrate_capacity(base, rate_rps, work, arrivals, seed, console, notes)
        result["arms"] = {}
        with progress_bar(console, count="{task.completed:>5.0f}/{task.total:.0f} s") as progress:
            for arm in arms:
                console.print(
                    f"[bold]{arm.label}[/]: fresh testbed, {warmup_s:g} s warm-up + {duration_s:g} s of {scenario.name}"
                )
                try:
                    r = run_arm(
                        arm,
                        base,
                        scenario,
                        work / arm.name,
                        rate_rps=rate_rps,
                        duration_s=duration_s,
                        warmup_s=warmup_s,
                        arrivals=arrivals,
                        seed=seed,
                        slo_ms=slo_ms,
                        bin_s=bin_s,
                        scorer=scorer,
                        progress=progress,
                        inspect=inspect,
                        private_gauges=private_gauges,
                        orca=orca,
                    )
                except BalanceIQError:
                    raise
                except Exception as exc:
                    raise BenchError(f"arm {arm.name} failed: {type(exc).__name__}: {exc}") from exc
                all_pids.update(r.pop("_pids"))
                _arm_verdict(arm, r, notes, console)
                result["arms"][arm.name] = r
    result["targets"] = evaluate_targets(result["arms"])
    result["generator_overhead"] = _generator_overhead(result["arms"], result.get("capacity"))
    result["leftover_processes"] = leftovers(all_pids, 10.0)
    if result["leftover_processes"]:
        notes.append(f"processes still alive after teardown: {result['leftover_processes']}")
    if plot_path is not None and result["arms"]:
        result["plot"] = str(plot(result, Path(plot_path)))
    result["markdown"] = markdown_table(result)
    result["runtime_s"] = round(time.monotonic() - t0, 1)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["notes"] = notes
    console.print(result["markdown"], markup=False, highlight=False)
    return result
