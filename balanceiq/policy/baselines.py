"""The controller's guardrail baselines: non-learned policies behind the CFR-RL policy's interface
(the lab adds its own). An endpoint whose ``healthy`` is ``False`` gets share 0 (``None`` counts
as available), except under ``equal`` and ``static``: Envoy without a controller handles health."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from balanceiq.config import UINT32_MAX
from balanceiq.policy.lp import shares_to_weights
from balanceiq.telemetry.observation import Observation

MIN_SATURATION = 0.05  # below it, rps/saturation extrapolates too far to be a capacity estimate
MIN_P95_MS = 0.1  # a measured p95 of ~0 is a clock artefact; it must not claim all the traffic
MIN_COST_FRACTION = 0.01  # a free endpoint may be preferred, but not to the point of taking all traffic


@dataclass(frozen=True)
class Decision:
    """What a policy wants applied, and the Envoy weights that realise it."""

    shares: np.ndarray  # traffic fractions to apply (sum 1)
    weights: np.ndarray  # integer Envoy load_balancing_weights (each in [1, 2**32-1])
    critical: tuple[int, ...]  # endpoints re-optimised this step (all: full re-optimisation; (): static)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyContext:
    """What a policy may know besides the Observation (arrays in the Observation's order)."""

    shares: np.ndarray  # current split
    capacity_hint: np.ndarray  # config hints (nan if unknown)
    static_weights: np.ndarray  # config weights
    demand_rps: float  # observed total rps
    k: int  # critical endpoints per decision
    true_capacity: np.ndarray | None = None  # simulator only: for the oracle


@runtime_checkable
class Policy(Protocol):
    name: str

    def reset(self) -> None: ...

    def decide(self, obs: Observation, ctx: PolicyContext) -> Decision: ...


def _check(obs: Observation, ctx: PolicyContext) -> int:
    n = len(obs.endpoints)
    if n == 0:
        raise ValueError(f"cluster {obs.cluster!r}: observation has no endpoints")
    for name in ("shares", "capacity_hint", "static_weights"):
        got = np.asarray(getattr(ctx, name)).reshape(-1).shape[0]
        if got != n:
            raise ValueError(f"PolicyContext.{name} has {got} entries, observation has {n} endpoints")
    return n


def available_mask(obs: Observation) -> np.ndarray:
    """True unless Envoy reports the endpoint unhealthy (unknown health counts as up)."""
    return np.array([e.healthy is not False for e in obs.endpoints], dtype=bool)


def obs_field(obs: Observation, name: str) -> np.ndarray:
    """One field of every endpoint, as floats."""
    return np.array([getattr(e, name) for e in obs.endpoints], dtype=np.float64)


def _positive(arr: np.ndarray) -> np.ndarray:
    return np.asarray(np.isfinite(arr) & (arr > 0))


def _fill_median(arr: np.ndarray, ok: np.ndarray, default: float) -> np.ndarray:
    fill = float(np.median(arr[ok])) if ok.any() else default
    return np.where(ok, arr, fill)


def _normalise(weights: np.ndarray, avail: np.ndarray | None = None) -> np.ndarray:
    """Non-negative finite weights -> shares; unusable input -> equal over available."""
    w = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
    if avail is not None:
        w = np.where(avail, w, 0.0)
    total = float(w.sum())
    if total > 0 and math.isfinite(total):
        return w / total
    base = avail if avail is not None and avail.any() else np.ones(w.shape[0], dtype=bool)
    return np.asarray(base / base.sum())


def _decision(shares: np.ndarray, avail: np.ndarray | None, critical: tuple[int, ...], **info: Any) -> Decision:
    return Decision(shares, shares_to_weights(shares, available=avail), critical, info)


def _hint_capacity(ctx: PolicyContext) -> np.ndarray:
    """Config capacity hints; unknown ones take the median of the known (1 if none)."""
    hint = np.asarray(ctx.capacity_hint, dtype=np.float64).reshape(-1)
    return _fill_median(hint, _positive(hint), 1.0)


def estimate_capacity(obs: Observation, ctx: PolicyContext) -> np.ndarray:
    """Capacity (rps) per endpoint: the config hint, else ``rps / saturation`` (Little's law), else the
    median of the others; NaN everywhere when nothing is known (the LP then splits capacity-blind)."""
    _check(obs, ctx)
    hint = np.asarray(ctx.capacity_hint, dtype=np.float64).reshape(-1)
    rps = obs_field(obs, "rps")
    sat = obs_field(obs, "saturation")
    measurable = _positive(rps) & np.isfinite(sat) & (sat >= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        measured = np.where(measurable, rps / np.maximum(np.where(measurable, sat, 1.0), MIN_SATURATION), np.nan)
    est = np.where(_positive(hint), hint, measured)
    return _fill_median(est, _positive(est), math.nan)


class _Stateless:
    def reset(self) -> None:
        pass


class EqualWeights(_Stateless):
    """Every weight 1: Envoy's plain round robin."""

    name = "equal"

    def decide(self, obs: Observation, ctx: PolicyContext) -> Decision:
        n = _check(obs, ctx)
        return Decision(np.full(n, 1.0 / n), np.ones(n, dtype=np.int64), (), {})


class StaticWeights(_Stateless):
    """The weights from the config, as Envoy would apply them without a controller."""

    name = "static"

    def decide(self, obs: Observation, ctx: PolicyContext) -> Decision:
        _check(obs, ctx)
        raw = np.asarray(ctx.static_weights, dtype=np.float64).reshape(-1)
        # Config weights are validated elsewhere; here a bad one becomes 1, never a crash.
        w = np.where(np.isfinite(raw), np.rint(raw), 1.0)
        w = np.clip(w, 1, UINT32_MAX).astype(np.int64)
        if int(w.sum()) > UINT32_MAX:
            return _decision(_normalise(w.astype(np.float64)), None, ())
        return Decision(w / w.sum(), w, (), {})


class CostAwareStatic(_Stateless):
    """Shares proportional to capacity_hint / cost (unknowns: the median of the known;
    costs floored at 1% of the highest, so a free endpoint does not take everything)."""

    name = "cost_aware"

    def decide(self, obs: Observation, ctx: PolicyContext) -> Decision:
        _check(obs, ctx)
        avail = available_mask(obs)
        cap = _hint_capacity(ctx)
        cost = obs_field(obs, "cost_per_million")
        cost = _fill_median(cost, np.isfinite(cost) & (cost >= 0), 0.0)
        cmax = float(cost.max())
        score = cap / np.maximum(cost, MIN_COST_FRACTION * cmax) if cmax > 0 else cap
        return _decision(_normalise(score, avail), avail, ())


class InverseLatencyEwma:
    """Weights proportional to 1 / EWMA(p95) per address; an endpoint without a usable
    p95 this window keeps its current share, the measured ones split the rest."""

    name = "inverse_latency"
    alpha = 0.3

    def __init__(self) -> None:
        self._ewma: dict[str, float] = {}

    def reset(self) -> None:
        self._ewma.clear()

    def decide(self, obs: Observation, ctx: PolicyContext) -> Decision:
        _check(obs, ctx)
        avail = available_mask(obs)
        measured = np.zeros(len(obs.endpoints), dtype=bool)
        for i, e in enumerate(obs.endpoints):
            if e.usable and math.isfinite(e.p95_ms) and e.p95_ms >= 0:
                p95 = max(e.p95_ms, MIN_P95_MS)
                old = self._ewma.get(e.address)
                self._ewma[e.address] = p95 if old is None else self.alpha * p95 + (1 - self.alpha) * old
                measured[i] = avail[i]
        current = _normalise(np.asarray(ctx.shares, dtype=np.float64).reshape(-1), avail)
        shares = np.where(measured, 0.0, current)
        budget = max(0.0, 1.0 - float(shares.sum()))
        if measured.any() and budget > 0:
            inv = np.array([1.0 / self._ewma[e.address] if measured[i] else 0.0 for i, e in enumerate(obs.endpoints)])
            shares = shares + budget * inv / inv.sum()
        shares = _normalise(shares, avail)
        return _decision(shares, avail, (), ewma_p95_ms={a: round(v, 3) for a, v in self._ewma.items()})


class LeastRequest(_Stateless):
    """A static model of Envoy's LEAST_REQUEST: shares proportional to capacity_hint / (inflight + 1),
    held for a whole interval (Envoy reacts per request: this is a lower bound on how well it does)."""

    name = "least_request"

    def decide(self, obs: Observation, ctx: PolicyContext) -> Decision:
        _check(obs, ctx)
        avail = available_mask(obs)
        cap = _hint_capacity(ctx)
        inflight = obs_field(obs, "inflight")
        inflight = np.where(np.isfinite(inflight) & (inflight >= 0), inflight, 0.0)
        return _decision(_normalise(cap / (inflight + 1.0), avail), avail, ())


def utilisation(obs: Observation, ctx: PolicyContext) -> tuple[np.ndarray, np.ndarray]:
    """``(utilisation, capacity)``: load over :func:`estimate_capacity` per endpoint, the
    load being observed rps or, unmeasured, current share x demand; NaN where unknown."""
    cap = estimate_capacity(obs, ctx)
    shares = np.asarray(ctx.shares, dtype=np.float64).reshape(-1)
    rps = obs_field(obs, "rps")
    demand = float(ctx.demand_rps)
    load = np.where(np.isfinite(rps) & (rps >= 0), rps, shares * demand if math.isfinite(demand) else np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        util = np.where(_positive(cap), load / np.where(_positive(cap), cap, 1.0), np.nan)
    return util, cap


def hot_cold_critical(obs: Observation, ctx: PolicyContext) -> list[int]:
    """The ceil(K/2) most utilised available endpoints, hottest first, then the floor(K/2) least utilised,
    coldest first: the hot/cold heuristic's critical set, in the order teacher ``hot_cold`` teaches."""
    n = _check(obs, ctx)
    util, _ = utilisation(obs, ctx)
    known = np.isfinite(util) & available_mask(obs)
    k = min(max(int(ctx.k), 1), n)
    hot = [int(i) for i in np.argsort(np.where(known, -util, np.inf), kind="stable")[: (k + 1) // 2]]
    cold = [int(i) for i in np.argsort(np.where(known, util, np.inf), kind="stable") if int(i) not in hot]
    return hot + cold[: k - len(hot)]


BASELINES: dict[str, Callable[[], Policy]] = {
    cls.name: cls for cls in (EqualWeights, StaticWeights, CostAwareStatic, InverseLatencyEwma, LeastRequest)
}


def make_policy(name: str, registry: Mapping[str, Callable[[], Policy]] = BASELINES) -> Policy:
    """A fresh baseline by name from ``registry``; ValueError naming the known ones otherwise."""
    try:
        factory = registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(registry))}") from None
    return factory()
