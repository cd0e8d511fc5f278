"""`balanceiq bench live --suite N`: the live benchmark over seeded random fleets.

The shipped scenario is one fleet the project was tuned on. The suite draws fleets it has
never seen (:func:`draw_fleet`, deterministic per seed; fleet ``i`` of ``--seed S`` uses
seed ``S * 1000 + i``) and runs every arm on each, one after the other, each on a fresh
stack with the same open-loop arrival schedule (Poisson, seeded by the fleet's seed):

* **6-12 backends in 2-4 clouds**, each with a lognormal service time (median
  ``base_latency_ms``, ``sigma`` 0.2-0.6; or, one time in four, ``sigma`` 0.1 plus a
  rare long tail: ``tail_prob`` 0.01-0.05 of ``tail_ms`` 100-500), ``concurrency`` slots,
  a price per million requests (up to 20x apart across the fleet) and **no capacity
  hint**: the controller must learn capacity from telemetry.
* **The load** is 40-80 % of the fleet's true total capacity. A small box's Envoy passes
  only a few hundred req/s, so the rate is drawn in ``rate_rps_range`` first and every base
  latency is then scaled by one common factor (kept within 5-150 ms; the concurrencies
  are adjusted when that is not enough) until rate / capacity is the drawn fraction.
  At 100-200 req/s and 5-150 ms that leaves most backends with 1-3 slots (a few
  more on the slow ones): queueing at 40-80 % load on single-slot, heavy-tailed
  backends is what the balancers are up against. A draw that cannot be fitted is
  drawn again from the same generator (still deterministic; ``draw_attempts`` says how
  many it took).
  True capacity of a backend = ``concurrency / mean slot hold``, the mean being
  ``median * exp(sigma**2 / 2) + jitter / 2 + tail_prob * tail_ms``
  (:func:`~balanceiq_lab.testbed.backend.mean_service_ms`).
* **2-3 events** at distinct times between 25 % and 80 % of the run: a backend slows
  down 2-5x, grows a latency tail, answers 5-30 % errors, loses half or two thirds of its
  concurrency, changes price 0.2-10x (one backend or a whole cloud), or recovers (an
  earlier-hit backend reset). Events never leave the fleet with less than 1.15x the
  offered rate of capacity.

The **oracle** arm is the LP on the truth (:func:`truth` gives every backend's capacity,
mean service time and price at any time of the run), pushed at the start and right after
each event (:func:`balanceiq_lab.bench.live.oracle_split`).

Per fleet and arm: p50/p99/p99.9, $ per million, error rate, SLO attainment, weight
reversals. The summary (:func:`suite_summary`, pure) gives per arm the geometric-mean
ratios of p99 and cost against LEAST_REQUEST, CSWRR and the oracle, how often it was no
worse than LEAST_REQUEST on both, its worst p99 ratio, whether its error rate never
exceeded LEAST_REQUEST's, total reversals, and issue #13's targets for BalanceIQ over
the shipped lb_policy (:data:`balanceiq_lab.bench.live.DEFAULT_ARM`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from balanceiq.config import BackendProfile, ClusterConfig, EndpointConfig, Settings, default_settings
from balanceiq_lab.bench.live import (
    ARMS,
    BIN_S,
    DEFAULT_ARM,
    DEFAULT_LB_POLICY,
    DEFAULT_SLO_MS,
    SUSTAIN_LAG_P99_MS,
    Arm,
    _load_scorer,
    _r,
    oracle_for,
    run_arm,
    validate_args,
)
from balanceiq_lab.bench.processes import leftovers
from balanceiq_lab.errors import BenchError
from balanceiq_lab.progress import progress_bar
from balanceiq_lab.testbed.backend import mean_service_ms, true_capacity_rps
from balanceiq_lab.testbed.scenario import LiveEvent, LiveScenario, state_truth, states_after, truth_at

# -- knobs -------------------------------------------------------------------------------------

SUITE_ARMS = ("round_robin", "least_request", "cswrr", "balanceiq_rr", "balanceiq_lr", "oracle")
DEFAULT_SUITE_DURATION_S = 30.0
DEFAULT_SUITE_WARMUP_S = 10.0  # CSWRR's 10 s blackout and the controller's first decisions
DEFAULT_RATE_RANGE = (100.0, 200.0)
MAX_FLEETS = 50
MAX_SEED = 10**9
SEED_STRIDE = 1000  # fleet i of --seed S: S * 1000 + i

CLOUDS: dict[str, tuple[str, ...]] = {
    "aws": ("us-east-1", "us-west-2", "eu-west-1"),
    "gcp": ("us-central1", "europe-west1", "asia-east1"),
    "azure": ("eastus", "westeurope", "southeastasia"),
    "oci": ("us-ashburn-1", "eu-frankfurt-1", "ap-tokyo-1"),
}
N_BACKENDS = (6, 12)
N_CLOUDS = (2, 4)
LATENCY_MS = (5.0, 150.0)
SIGMA = (0.2, 0.6)
TAIL_SHARE = 0.25  # backends with a small sigma and a rare long tail instead
TAIL_SIGMA = 0.1
TAIL_PROB = (0.01, 0.05)
TAIL_MS = (100.0, 500.0)
CONCURRENCY = (1, 16)
CONCURRENCY_MAX_ADJUSTED = 64
PRICE = (0.05, 1.0)
PRICE_SPREAD = 20.0
LOAD = (0.4, 0.8)
JITTER_MS = 1.0  # BackendSettings' default; the testbed does not change it
EVENTS = (2, 3)
EVENT_WINDOW = (0.25, 0.8)
EVENT_MIN_GAP = 0.1  # of the duration
MIN_HEADROOM = 1.15  # capacity after any event >= this x the rate
EVENT_KINDS = ("slowdown", "tail", "errors", "price", "capacity_loss", "recovery")
PORT0 = 19101  # placeholder addresses 127.0.0.1:19101...; bench_settings remaps them


@dataclass(frozen=True)
class FleetBackend:
    address: str
    cloud: str
    region: str
    zone: str
    price: float
    base_latency_ms: float
    sigma: float
    tail_prob: float
    tail_ms: float
    concurrency: int

    @property
    def mean_service_ms(self) -> float:
        return mean_service_ms(
            self.base_latency_ms, sigma=self.sigma, jitter_ms=JITTER_MS, tail_prob=self.tail_prob, tail_ms=self.tail_ms
        )

    @property
    def capacity_rps(self) -> float:
        return true_capacity_rps(self.concurrency, self.mean_service_ms)

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "cloud": self.cloud,
            "region": self.region,
            "zone": self.zone,
            "price": self.price,
            "base_latency_ms": round(self.base_latency_ms, 3),
            "sigma": round(self.sigma, 4),
            "tail_prob": round(self.tail_prob, 4),
            "tail_ms": round(self.tail_ms, 1),
            "concurrency": self.concurrency,
            "mean_service_ms": round(self.mean_service_ms, 3),
            "capacity_rps": round(self.capacity_rps, 2),
        }


@dataclass
class Fleet:
    """One drawn fleet: backends, offered rate, the run's events, and the Settings and
    LiveScenario that make it (``settings`` has placeholder addresses; the benchmark moves
    them to free ports)."""

    seed: int
    rate_rps: float
    load_fraction: float
    latency_scale: float
    duration_s: float
    backends: list[FleetBackend]
    settings: Settings
    scenario: LiveScenario
    event_info: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 1

    @property
    def total_capacity_rps(self) -> float:
        return float(sum(b.capacity_rps for b in self.backends))

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rate_rps": self.rate_rps,
            "load_fraction": round(self.load_fraction, 4),
            "total_capacity_rps": round(self.total_capacity_rps, 2),
            "latency_scale": round(self.latency_scale, 4),
            "duration_s": self.duration_s,
            "clouds": sorted({b.cloud for b in self.backends}),
            "price_spread": round(max(b.price for b in self.backends) / min(b.price for b in self.backends), 3),
            "backends": [b.to_json() for b in self.backends],
            "draw_attempts": self.attempts,
        }

    def events_json(self) -> list[dict[str, Any]]:
        return list(self.event_info)


def truth(fleet: Fleet, t: float) -> dict[str, dict[str, Any]]:
    """Every backend's true capacity (req/s), mean service time (ms), price, error rate and
    health at ``t`` seconds into the measured run (events with ``at_s <= t`` applied),
    keyed by the fleet's (placeholder) address."""
    return truth_at(fleet.settings, fleet.scenario, t)


# -- drawing -------------------------------------------------------------------------------------


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _capacity(scale: float, lat: np.ndarray, infl: np.ndarray, fixed: np.ndarray, conc: np.ndarray) -> float:
    """Total true capacity (req/s) with every base latency times ``scale``."""
    return float((conc * 1000.0 / (scale * lat * infl + fixed)).sum())


def _fit_scale(
    target: float, lat: np.ndarray, infl: np.ndarray, fixed: np.ndarray, conc: np.ndarray
) -> tuple[float, np.ndarray] | None:
    """One common latency factor (and concurrencies, adjusted if that alone cannot) that
    make the total capacity ``target`` with every scaled latency within LATENCY_MS; None
    when no such fleet is near (the caller draws again)."""
    lo_f, hi_f = LATENCY_MS[0] / float(lat.min()), LATENCY_MS[1] / float(lat.max())
    if lo_f > hi_f:
        return None
    conc = conc.copy()
    for _ in range(8):
        cap_fast, cap_slow = _capacity(lo_f, lat, infl, fixed, conc), _capacity(hi_f, lat, infl, fixed, conc)
        if cap_slow <= target <= cap_fast:
            a, b = lo_f, hi_f  # capacity falls as the factor grows: bisect
            for _ in range(200):
                mid = 0.5 * (a + b)
                if _capacity(mid, lat, infl, fixed, conc) > target:
                    a = mid
                else:
                    b = mid
            return 0.5 * (a + b), conc
        # Rescale the concurrencies to fit near the slow end of the latency range: the
        # fewer slots taken away, the more the fleet keeps its spread of concurrency.
        aim_f = math.exp(0.25 * math.log(lo_f) + 0.75 * math.log(hi_f))
        g = target / _capacity(aim_f, lat, infl, fixed, conc)
        new = np.clip(np.rint(conc * g), 1, CONCURRENCY_MAX_ADJUSTED).astype(np.int64)
        if np.array_equal(new, conc):
            return None
        conc = new
    return None


def _prices(rng: np.random.Generator, n: int) -> list[float]:
    p = np.exp(rng.uniform(math.log(PRICE[0]), math.log(PRICE[1]), n))
    p = np.round(p, 4)
    floor = math.ceil(float(p.max()) / PRICE_SPREAD * 1e4) / 1e4
    return [float(x) for x in np.maximum(p, floor)]


def _draw_backends(rng: np.random.Generator) -> tuple[list[dict[str, Any]], list[str]]:
    n = int(rng.integers(N_BACKENDS[0], N_BACKENDS[1] + 1))
    k = int(rng.integers(N_CLOUDS[0], N_CLOUDS[1] + 1))
    clouds = [str(c) for c in rng.choice(list(CLOUDS), size=k, replace=False)]
    assign = clouds + [clouds[int(i)] for i in rng.integers(0, k, n - k)]
    assign = [assign[int(i)] for i in rng.permutation(n)]
    prices = _prices(rng, n)
    rows = []
    for i, cloud in enumerate(assign):
        region = CLOUDS[cloud][int(rng.integers(0, len(CLOUDS[cloud])))]
        heavy = rng.random() < TAIL_SHARE
        rows.append(
            {
                "cloud": cloud,
                "region": region,
                "zone": f"{region}-{'abc'[int(rng.integers(0, 3))]}",
                "price": prices[i],
                "latency": _loguniform(rng, *LATENCY_MS),
                "sigma": TAIL_SIGMA if heavy else float(rng.uniform(*SIGMA)),
                "tail_prob": float(rng.uniform(*TAIL_PROB)) if heavy else 0.0,
                "tail_ms": float(rng.uniform(*TAIL_MS)) if heavy else 0.0,
                "concurrency": int(rng.integers(CONCURRENCY[0], CONCURRENCY[1] + 1)),
            }
        )
    return rows, clouds


def fleet_settings(backends: list[FleetBackend], base: Settings | None = None) -> Settings:
    """``base`` (control knobs, guardrails, telemetry...) with one cluster of ``backends``
    (no capacity hints) and a testbed profile per backend."""
    base = base or default_settings()
    name = base.clusters[0].name if base.clusters else "my_service"
    endpoints = [
        EndpointConfig(
            address=b.address,
            cloud=b.cloud,
            region=b.region,
            zone=b.zone,
            cost_per_million_requests=b.price,
            capacity_rps=None,
        )
        for b in backends
    ]
    overrides = {
        b.address: BackendProfile(
            base_latency_ms=b.base_latency_ms,
            concurrency=b.concurrency,
            error_rate=0.0,
            sigma=b.sigma,
            tail_prob=b.tail_prob,
            tail_ms=b.tail_ms,
        )
        for b in backends
    }
    data = base.model_dump()
    data["clusters"] = [ClusterConfig(name=name, endpoints=endpoints).model_dump()]
    data["testbed"] = {**data["testbed"], "overrides": {a: p.model_dump() for a, p in overrides.items()}}
    return Settings.model_validate(data)


def _event_times(rng: np.random.Generator, k: int, duration_s: float) -> list[float]:
    lo, hi = EVENT_WINDOW[0] * duration_s, EVENT_WINDOW[1] * duration_s
    gap = EVENT_MIN_GAP * duration_s
    for _ in range(1000):
        t = sorted(round(float(x), 2) for x in rng.uniform(lo, hi, k))
        if all(b - a >= gap for a, b in itertools.pairwise(t)):
            return t
    return [round(lo + i * (hi - lo) / max(k - 1, 1), 2) for i in range(k)]  # evenly spread


def _total_capacity(settings: Settings, events: list[LiveEvent]) -> float:
    return float(sum(state_truth(s)["capacity_rps"] for s in states_after(settings, events).values()))


def _label(b: FleetBackend, i: int) -> str:
    return f"b{i} ({b.cloud}/{b.region})"


def _draw_events(
    rng: np.random.Generator, fleet_backends: list[FleetBackend], settings: Settings, rate: float, duration_s: float
) -> tuple[list[LiveEvent], list[dict[str, Any]]]:
    k = int(rng.integers(EVENTS[0], EVENTS[1] + 1))
    times = _event_times(rng, k, duration_s)
    events: list[LiveEvent] = []
    info: list[dict[str, Any]] = []
    hit: list[int] = []  # backends touched by an earlier event, for "recovery"
    index = {b.address: i for i, b in enumerate(fleet_backends)}
    for at in times:
        kinds = [kd for kd in EVENT_KINDS if kd != "recovery" or hit]
        kinds = [kinds[int(i)] for i in rng.permutation(len(kinds))] + ["price"]
        chosen = None
        for kind in kinds:
            state = states_after(settings, events)
            order = [int(i) for i in rng.permutation(len(fleet_backends))]
            for i in order:
                b = fleet_backends[i]
                st = state[b.address]
                ev_kw: dict[str, Any] = {"at_s": at, "endpoint": b.address}
                detail: dict[str, Any] = {"kind": kind, "target": b.address}
                if kind == "slowdown":
                    f = float(rng.uniform(2, 5))
                    ev_kw |= {
                        "name": f"{_label(b, i)} slows x{f:.1f}",
                        "set": {"base_latency_ms": round(float(st["base_latency_ms"]) * f, 3)},
                    }
                    detail["factor"] = round(f, 3)
                elif kind == "tail":
                    tp, tm = float(rng.uniform(0.02, 0.1)), float(rng.uniform(*TAIL_MS))
                    ev_kw |= {
                        "name": f"{_label(b, i)} tail {100 * tp:.0f}% +{tm:.0f} ms",
                        "set": {"tail_prob": round(tp, 4), "tail_ms": round(tm, 1)},
                    }
                elif kind == "errors":
                    e = float(rng.uniform(0.05, 0.3))
                    ev_kw |= {"name": f"{_label(b, i)} errors {100 * e:.0f}%", "set": {"error_rate": round(e, 4)}}
                elif kind == "capacity_loss":
                    c = int(st["concurrency"])
                    if c < 2:
                        continue
                    d = int(rng.integers(2, 4))
                    new = max(1, c // d)
                    ev_kw |= {
                        "name": f"{_label(b, i)} loses capacity ({c} -> {new} slots)",
                        "set": {"concurrency": new},
                    }
                elif kind == "recovery":
                    if i not in hit:
                        continue
                    ev_kw |= {"name": f"{_label(b, i)} recovers", "reset": True}
                elif kind == "price":
                    m = 1.0
                    while 1 / 1.5 < m < 1.5:
                        m = _loguniform(rng, 0.2, 10.0)
                    if rng.random() < 0.5:
                        ev_kw = {"at_s": at, "cloud": b.cloud, "name": f"{b.cloud} price x{m:.2f}"}
                        detail["target"] = b.cloud
                    else:
                        ev_kw["name"] = f"{_label(b, i)} price x{m:.2f}"
                    ev_kw["cost_multiplier"] = round(m, 4)
                    detail["multiplier"] = round(m, 4)
                ev = LiveEvent.model_validate(ev_kw)
                cap = _total_capacity(settings, [*events, ev])
                if cap < MIN_HEADROOM * rate:
                    continue
                chosen = ev
                targets = [index[ep.address] for ep in ev.targets(list(settings.clusters[0].endpoints))]
                if ev.reset:
                    hit = [h for h in hit if h not in targets]
                else:
                    hit.extend(t for t in targets if t not in hit)
                detail.update(
                    {
                        "at_s": at,
                        "name": ev.name,
                        "set": dict(ev.set),
                        "reset": ev.reset,
                        "cost_multiplier": ev.cost_multiplier,
                        "capacity_after_rps": round(cap, 2),
                    }
                )
                break
            if chosen is not None:
                break
        assert chosen is not None  # a price change always keeps the capacity
        events.append(chosen)
        info.append(detail)
    return events, info


def draw_fleet(
    seed: int,
    rate_rps_range: tuple[float, float] = DEFAULT_RATE_RANGE,
    *,
    duration_s: float = DEFAULT_SUITE_DURATION_S,
    base: Settings | None = None,
) -> Fleet:
    """A random fleet, its offered rate and a timeline of events; the same for the same
    arguments (numpy ``default_rng(seed)``). See the module docstring for the ranges."""
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise BenchError(f"a fleet seed must be an integer >= 0, got {seed!r}")
    lo_rate, hi_rate = (float(x) for x in rate_rps_range)
    if not (math.isfinite(lo_rate) and math.isfinite(hi_rate) and 0 < lo_rate <= hi_rate <= 2000):
        raise BenchError(f"the rate range must satisfy 0 < low <= high <= 2000 req/s, got {rate_rps_range}")
    rng = np.random.default_rng(seed)
    for attempt in range(1, 201):
        rows, _ = _draw_backends(rng)
        load = float(rng.uniform(*LOAD))
        rate = round(float(rng.uniform(lo_rate, hi_rate)), 1) if hi_rate > lo_rate else lo_rate
        lat = np.array([r["latency"] for r in rows])
        infl = np.exp(np.array([r["sigma"] for r in rows]) ** 2 / 2)
        fixed = JITTER_MS / 2 + np.array([r["tail_prob"] * r["tail_ms"] for r in rows])
        conc = np.array([r["concurrency"] for r in rows], dtype=np.int64)
        fit = _fit_scale(rate / load, lat, infl, fixed, conc)
        if fit is None:
            continue
        scale, conc = fit
        backends = [
            FleetBackend(
                address=f"127.0.0.1:{PORT0 + i}",
                cloud=r["cloud"],
                region=r["region"],
                zone=r["zone"],
                price=r["price"],
                base_latency_ms=float(np.clip(scale * r["latency"], *LATENCY_MS)),
                sigma=r["sigma"],
                tail_prob=r["tail_prob"],
                tail_ms=r["tail_ms"],
                concurrency=int(conc[i]),
            )
            for i, r in enumerate(rows)
        ]
        total = sum(b.capacity_rps for b in backends)
        assert abs(rate / total - load) < 1e-6, (rate, total, load)
        assert all(LATENCY_MS[0] <= b.base_latency_ms <= LATENCY_MS[1] for b in backends)
        settings = fleet_settings(backends, base)
        events, info = _draw_events(rng, backends, settings, rate, duration_s)
        scenario = LiveScenario(
            name=f"fleet-{seed}",
            duration_s=duration_s,
            events=events,
            description=f"random fleet, seed {seed}: {len(backends)} backends, "
            f"{100 * load:.0f}% load at {rate:g} req/s",
        )
        return Fleet(
            seed=seed,
            rate_rps=rate,
            load_fraction=load,
            latency_scale=scale,
            duration_s=duration_s,
            backends=backends,
            settings=settings,
            scenario=scenario,
            event_info=info,
            attempts=attempt,
        )
    raise BenchError(f"seed {seed}: no fleet fits the rate range {rate_rps_range} in 200 draws")


# -- summary (pure; unit-tested) ---------------------------------------------------------------------

REFERENCES = ("least_request", "cswrr", "oracle")
LR = "least_request"
TARGETS: tuple[tuple[str, str, str, float | bool], ...] = (
    # (key in the arm's summary, text, comparison, limit)
    ("p99_vs_least_request", "p99 geomean <= 0.8 x LEAST_REQUEST", "<=", 0.8),
    ("cost_vs_least_request", "cost geomean <= 0.9 x LEAST_REQUEST", "<=", 0.9),
    ("both_le_least_request_fraction", "p99 and cost both <= LEAST_REQUEST's on >= 75 % of fleets", ">=", 0.75),
    ("max_p99_vs_least_request", "never p99 > 1.2 x LEAST_REQUEST", "<=", 1.2),
    ("errors_le_least_request_every_fleet", "error rate <= LEAST_REQUEST's on every fleet", "==", True),
    ("p99_vs_cswrr", "p99 geomean <= 1.1 x CSWRR", "<=", 1.1),
    ("cost_vs_cswrr", "cost geomean <= 0.85 x CSWRR", "<=", 0.85),
    ("p99_vs_oracle", "p99 geomean <= 1.25 x oracle", "<=", 1.25),
    ("cost_vs_oracle", "cost geomean <= 1.05 x oracle", "<=", 1.05),
)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def ratio(value: Any, reference: Any) -> float | None:
    """``value / reference`` when both are finite, ``value > 0`` and ``reference > 0``
    (a geometric mean needs positive ratios); else None."""
    v, r = _num(value), _num(reference)
    if v is None or r is None or v <= 0 or r <= 0:
        return None
    return v / r


def geomean(values: list[float | None]) -> float | None:
    """Geometric mean of the positive finite values; None if there are none."""
    xs = [x for x in values if x is not None and math.isfinite(x) and x > 0]
    return float(math.exp(sum(math.log(x) for x in xs) / len(xs))) if xs else None


def _usable(arm: dict[str, Any] | None) -> bool:
    return bool(arm) and not arm.get("error") and _num(arm.get("p99_ms")) is not None  # type: ignore[union-attr]


def arm_summary(name: str, fleets: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm over every fleet it ran on (see the module docstring)."""
    rows = [f["arms"] for f in fleets if _usable(f["arms"].get(name))]
    out: dict[str, Any] = {
        "fleets": len(rows),
        "reversals_total": sum(int(r[name].get("reversals") or 0) for r in rows),
    }
    for ref in REFERENCES:
        if ref == name:
            continue
        pairs = [(r[name], r[ref]) for r in rows if _usable(r.get(ref))]
        p = [ratio(a["p99_ms"], b["p99_ms"]) for a, b in pairs]
        c = [ratio(a.get("cost_per_million"), b.get("cost_per_million")) for a, b in pairs]
        out[f"p99_vs_{ref}"] = _r(geomean(p), 4)
        out[f"cost_vs_{ref}"] = _r(geomean(c), 4)
        out[f"fleets_vs_{ref}"] = len(pairs)
        if ref == LR:
            both = [pr is not None and cr is not None and pr <= 1.0 and cr <= 1.0 for pr, cr in zip(p, c)]
            errs = [(_num(a.get("error_rate")) or 0.0) <= (_num(b.get("error_rate")) or 0.0) for a, b in pairs]
            out["both_le_least_request_fraction"] = _r(sum(both) / len(both), 4) if both else None
            out["max_p99_vs_least_request"] = _r(max((x for x in p if x is not None), default=math.nan), 4)
            out["errors_le_least_request_every_fleet"] = all(errs) if errs else None
            out["errors_le_least_request_fleets"] = sum(errs)
    return out


def evaluate_suite_targets(arm: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """Issue #13's targets for one arm's :func:`arm_summary`; ``met`` None when a
    reference arm did not run. ``all_met``: every target met (None if any is unknown)."""
    out: dict[str, Any] = {"arm": name, "targets": {}}
    for key, text, op, limit in TARGETS:
        v = None if arm is None else arm.get(key)
        if v is None:
            met = None
        elif op == "<=":
            met = bool(v <= limit)
        elif op == ">=":
            met = bool(v >= limit)
        else:
            met = bool(v == limit)
        out["targets"][key] = {"target": text, "value": v, "limit": limit, "met": met}
    mets = [t["met"] for t in out["targets"].values()]
    out["all_met"] = None if any(m is None for m in mets) else all(mets)
    out["met"] = sum(1 for m in mets if m)
    out["of"] = len(mets)
    return out


def suite_summary(fleets: list[dict[str, Any]], default_arm: str = DEFAULT_ARM.name) -> dict[str, Any]:
    """Per arm (in order of appearance) :func:`arm_summary`, and the targets of ``default_arm``."""
    names: list[str] = []
    for f in fleets:
        names += [n for n in f["arms"] if n not in names]
    by_arm = {n: arm_summary(n, fleets) for n in names}
    return {"by_arm": by_arm, "targets": evaluate_suite_targets(by_arm.get(default_arm), default_arm)}


def markdown_summary(summary: dict[str, Any]) -> str:
    """One row per arm: ratios (geometric means over fleets), wins, worst case, errors, reversals."""

    def f(v: Any, spec: str = ".2f") -> str:
        if v is None:
            return "—"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return format(v, spec)

    lines = [
        "| arm | fleets | p99 / LR | $ / LR | p99 / CSWRR | $ / CSWRR | p99 / oracle | $ / oracle | "
        "p99 and $ ≤ LR | max p99 / LR | errors ≤ LR every fleet | reversals |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    default = summary["targets"]["arm"]
    for name, a in summary["by_arm"].items():
        label = f"**{name}**" if name == default else name
        frac = a.get("both_le_least_request_fraction")
        lines.append(
            f"| {label} | {a['fleets']} | {f(a.get('p99_vs_least_request'))} | {f(a.get('cost_vs_least_request'))} | "
            f"{f(a.get('p99_vs_cswrr'))} | {f(a.get('cost_vs_cswrr'))} | {f(a.get('p99_vs_oracle'))} | "
            f"{f(a.get('cost_vs_oracle'))} | {f(None if frac is None else 100 * frac, '.0f')}{'' if frac is None else ' %'} | "
            f"{f(a.get('max_p99_vs_least_request'))} | {f(a.get('errors_le_least_request_every_fleet'))} | "
            f"{a['reversals_total']} |"
        )
    t = summary["targets"]
    lines.append("")
    lines.append(f"Targets (issue #13) for **{default}**: {t['met']}/{t['of']} met")
    for v in t["targets"].values():
        mark = {True: "met", False: "NOT met", None: "unknown"}[v["met"]]
        lines.append(
            f"- {v['target']}: {f(v['value'], '.3f') if not isinstance(v['value'], bool) else f(v['value'])} ({mark})"
        )
    return "\n".join(lines)


def plot_suite(result: dict[str, Any], path: Path) -> Path:
    """Per fleet, each arm's p99 and cost relative to LEAST_REQUEST (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fleets = result["fleets"]
    names = [n for n in result["setup"]["arms"] if n != LR]
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.2 * len(fleets) + 4), 7), sharex=True)
    width = 0.8 / max(len(names), 1)
    markers = "osD^v<>ph*"
    for k, name in enumerate(names):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(fleets))]
        for ax, key in zip(axes, ("p99_ms", "cost_per_million")):
            ys = []
            for fl in fleets:
                a, lr = fl["arms"].get(name), fl["arms"].get(LR)
                ys.append(ratio(a.get(key), lr.get(key)) if _usable(a) and _usable(lr) else None)
            ax.scatter(
                xs,
                [math.nan if y is None else y for y in ys],
                marker=markers[k % len(markers)],
                s=36,
                label=name,
                zorder=3,
                linewidths=2.0 if name == result["default_arm"] else 0.8,
            )
    for ax, what in zip(axes, ("p99 / LEAST_REQUEST", "$ per M / LEAST_REQUEST")):
        ax.axhline(1.0, color="0.3", linewidth=0.9)
        ax.set_yscale("log")
        ax.set_ylabel(what)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[1].set_xticks(range(len(fleets)))
    axes[1].set_xticklabels(
        [
            f"seed {fl['seed']}\n{fl['fleet']['rate_rps']:g} rps, {100 * fl['fleet']['load_fraction']:.0f}%"
            for fl in fleets
        ],
        fontsize=8,
    )
    s = result["setup"]
    fig.suptitle(
        f"balanceiq bench live --suite {s['fleets']} --seed {s['seed']}: each arm relative to LEAST_REQUEST "
        f"({s['duration_s']:g} s per arm)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the run -------------------------------------------------------------------------------------------

ARM_KEYS = (
    "label",
    "family",
    "lb_policy",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "cost_per_million",
    "error_rate",
    "slo_attainment",
    "reversals",
    "requests",
    "errors",
    "share_by_cloud",
    "disturbed",
    "wall_s",
)


def _compact(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: r.get(k) for k in ARM_KEYS}
    out["schedule_lag_p99_ms"] = r["generator"]["schedule_lag_ms"]["p99"]
    out["phases"] = [
        {k: p.get(k) for k in ("phase", "from_s", "to_s", "p99_ms", "cost_per_million", "error_rate")}
        for p in r.get("phases", [])
    ]
    if "controller" in r:
        c = r["controller"]
        out["controller"] = {k: c[k] for k in ("decisions", "measured_decisions", "modes", "pushes", "errors")}
    if "oracle_pushes" in r:
        out["oracle_pushes"] = r["oracle_pushes"]
    return out


def parse_suite_arms(text: str | None) -> list[Arm]:
    """``--arms`` for the suite: default :data:`SUITE_ARMS` (plus the default arm if it is another)."""
    from balanceiq_lab.bench.live import parse_arms

    if text:
        return parse_arms(text)
    names = list(SUITE_ARMS) + ([DEFAULT_ARM.name] if DEFAULT_ARM.name not in SUITE_ARMS else [])
    return [ARMS[n] for n in names]


def validate_suite_args(n: int, seed: int, rate_rps_range: tuple[float, float]) -> None:
    problems = []
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_FLEETS):
        problems.append(f"--suite must be an integer in 1..{MAX_FLEETS} (fleets), got {n!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
        problems.append(
            f"--seed must be an integer in 0..{MAX_SEED} (fleet i uses seed * {SEED_STRIDE} + i), got {seed!r}"
        )
    lo, hi = rate_rps_range
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 2000):
        problems.append(f"the rate range must satisfy 0 < low <= high <= 2000 req/s, got {rate_rps_range}")
    if problems:
        raise BenchError("; ".join(problems))


def run_live_suite(
    base: Settings | None,
    n: int,
    *,
    seed: int = 0,
    arms: list[Arm] | None = None,
    duration_s: float = DEFAULT_SUITE_DURATION_S,
    warmup_s: float = DEFAULT_SUITE_WARMUP_S,
    rate_rps_range: tuple[float, float] = DEFAULT_RATE_RANGE,
    slo_ms: float = DEFAULT_SLO_MS,
    plot_path: Path | None = Path("artifacts/bench-live-suite.png"),
    private_gauges: bool = False,
    console: Console | None = None,
    only: list[int] | None = None,
    record_dir: Path | None = None,
) -> dict[str, Any]:
    """``n`` fleets (seeds ``seed * 1000 + i``), every arm on each; one JSON object.

    ``only``: run just these fleet indices of the ``n`` (to re-run a fleet, same draw).
    ``record_dir``: each controller arm's decisions as ``<fleet seed>-<arm>.jsonl``."""
    console = console or Console(stderr=True)
    validate_suite_args(n, seed, rate_rps_range)
    bad = [i for i in only or [] if not 0 <= i < n]
    if bad:
        raise BenchError(f"--only takes fleet indices in 0..{n - 1} of the suite, got {bad}")
    validate_args(rate_rps=rate_rps_range[1], duration_s=duration_s, warmup_s=warmup_s, slo_ms=slo_ms, bin_s=BIN_S)
    arms = arms if arms is not None else parse_suite_arms(None)
    base = base or default_settings()
    # Every fleet is drawn before anything starts: a bad draw fails fast.
    fleets = [draw_fleet(seed * SEED_STRIDE + i, rate_rps_range, duration_s=duration_s, base=base) for i in range(n)]
    if only:
        fleets = [fleets[i] for i in sorted(set(only))]
    if record_dir is not None:
        record_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):
        return _run_suite(
            base,
            fleets,
            arms,
            seed,
            duration_s,
            warmup_s,
            rate_rps_range,
            slo_ms,
            plot_path,
            private_gauges,
            console,
            record_dir,
        )


def _suite_setup(
    base: Settings,
    fleets: list[Fleet],
    arms: list[Arm],
    seed: int,
    duration_s: float,
    warmup_s: float,
    rate_rps_range: tuple[float, float],
    slo_ms: float,
    private_gauges: bool,
) -> dict[str, Any]:
    c = base.control
    return {
        "fleets": len(fleets),
        "seed": seed,
        "fleet_seeds": [f.seed for f in fleets],
        "seed_rule": f"fleet i uses seed {SEED_STRIDE} * seed + i (numpy default_rng): "
        "backends, load, events and the Poisson arrival schedule",
        "arms": [a.name for a in arms],
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "slo_ms": slo_ms,
        "rate_rps_range": list(rate_rps_range),
        "arrivals": "poisson",
        "private_gauges": private_gauges,
        "capacity_hints": False,
        "capacity_ramp": False,
        "default_lb_policy": DEFAULT_LB_POLICY,
        "control": {
            "interval_s": 1.0,
            "cost_weight": c.cost_weight,
            "util_target": c.util_target,
            "latency_weight": c.latency_weight,
        },
        "method": "per fleet, every arm on a fresh stack with the same open-loop schedule; the fleet's events "
        "after an unmeasured warm-up; ratios are geometric means over fleets",
    }


def _run_suite(
    base: Settings,
    fleets: list[Fleet],
    arms: list[Arm],
    seed: int,
    duration_s: float,
    warmup_s: float,
    rate_rps_range: tuple[float, float],
    slo_ms: float,
    plot_path: Path | None,
    private_gauges: bool,
    console: Console,
    record_dir: Path | None = None,
) -> dict[str, Any]:
    t0 = time.monotonic()
    default = DEFAULT_ARM.name
    setup = _suite_setup(base, fleets, arms, seed, duration_s, warmup_s, rate_rps_range, slo_ms, private_gauges)
    result: dict[str, Any] = {
        "bench": "live-suite",
        "setup": setup,
        "default_arm": default,
        "machine": {"cores": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "fleets": [],
    }
    notes: list[str] = []
    all_pids: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="balanceiq-bench-suite-") as tmp:
        work = Path(tmp)
        scorer = None
        if any(a.family == "balanceiq" for a in arms):
            scorer, info = _load_scorer(console)
            result["setup"]["policy"] = info
        with progress_bar(console, count="{task.completed:>5.0f}/{task.total:.0f} s") as progress:
            for k, fleet in enumerate(fleets):
                fj = fleet.to_json()
                console.print(
                    f"[bold]fleet {k + 1}/{len(fleets)}[/] seed {fleet.seed}: {len(fleet.backends)} backends in "
                    f"{len(fj['clouds'])} clouds, {fleet.rate_rps:g} req/s = {100 * fleet.load_fraction:.0f}% "
                    f"of {fleet.total_capacity_rps:.0f} req/s; events: "
                    f"{'; '.join(f'{e.at_s:g}s {e.name}' for e in fleet.scenario.events)}"
                )
                entry: dict[str, Any] = {
                    "seed": fleet.seed,
                    "fleet": fj,
                    "events": fleet.events_json(),
                    "oracle_at_start": _oracle_preview(fleet, slo_ms),
                    "arms": {},
                }
                for arm in arms:
                    try:
                        r = run_arm(
                            arm,
                            fleet.settings,
                            fleet.scenario,
                            work / f"{fleet.seed}-{arm.name}",
                            rate_rps=fleet.rate_rps,
                            duration_s=duration_s,
                            warmup_s=warmup_s,
                            arrivals="poisson",
                            seed=fleet.seed,
                            slo_ms=slo_ms,
                            bin_s=BIN_S,
                            scorer=scorer,
                            progress=progress,
                            private_gauges=private_gauges,
                            recording=None
                            if record_dir is None or arm.weights != "controller"
                            else record_dir / f"{fleet.seed}-{arm.name}.jsonl",
                        )
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:  # one arm failing must not lose the rest of the suite
                        msg = f"{type(exc).__name__}: {exc}"
                        entry["arms"][arm.name] = {"label": arm.label, "family": arm.family, "error": msg}
                        notes.append(f"fleet {fleet.seed}, arm {arm.name} failed: {msg}")
                        console.print(f"  [red]{arm.name} failed[/]: {msg}", highlight=False)
                        continue
                    all_pids.update(r.pop("_pids"))
                    lag = r["generator"]["schedule_lag_ms"]["p99"] or 0.0
                    r["disturbed"] = bool(lag > SUSTAIN_LAG_P99_MS)
                    if r["disturbed"]:
                        notes.append(
                            f"fleet {fleet.seed}, {arm.name}: the generator's schedule lag p99 was {lag:.0f} ms"
                        )
                    entry["arms"][arm.name] = _compact(r)
                    console.print(
                        f"  {arm.name:<14} p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  p99.9 {r['p999_ms']} ms  "
                        f"errors {100 * (r['error_rate'] or 0):.2f} %  ${r['cost_per_million']}/M  "
                        f"reversals {r['reversals']}  ({r['wall_s']} s)",
                        highlight=False,
                    )
                result["fleets"].append(entry)
    result["summary"] = suite_summary(result["fleets"], default)
    result["leftover_processes"] = leftovers(all_pids, 10.0)
    if result["leftover_processes"]:
        notes.append(f"processes still alive after teardown: {result['leftover_processes']}")
    if plot_path is not None and result["fleets"]:
        result["plot"] = str(plot_suite(result, Path(plot_path)))
    result["markdown"] = markdown_summary(result["summary"])
    result["runtime_s"] = round(time.monotonic() - t0, 1)
    result["seconds_per_fleet"] = round(result["runtime_s"] / max(len(fleets), 1), 1)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["notes"] = notes
    console.print(result["markdown"], markup=False, highlight=False)
    return result


def _oracle_preview(fleet: Fleet, slo_ms: float) -> dict[str, Any]:
    """The oracle's split before any event (placeholder addresses): what the truth favours."""
    o = oracle_for(fleet.settings, [], demand_rps=fleet.rate_rps, slo_ms=slo_ms)
    return {"shares": o["shares"], "status": o["status"], "max_utilization": o["max_utilization"]}
