"""The one decision step (observation -> capacity -> breachers -> critical set -> LP), a pure function
of (observation, context, policy scores, knobs, state) that the controller, the simulator, the live env
and ``POST /api/policy/score`` all call, so what is trained is served."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from balanceiq.policy.baselines import PolicyContext, available_mask, obs_field
from balanceiq.policy.headroom import Estimate, estimate
from balanceiq.policy.knobs import Knobs
from balanceiq.policy.lp import LpResult, least_request_weights, shares_to_weights, solve_critical
from balanceiq.policy.memory import CoreState, Memory, latency_p95, remember
from balanceiq.telemetry.observation import Observation

LATENCY_FREE = 0.5  # p95 below this fraction of the SLO costs nothing in the LP (price decides)
LATENCY_MEMORY_S = 20.0  # how long a quiet endpoint's last measured p95 stands in (fading) for a measurement
GAP_MIN = 0.01  # below this distance from the fleet-wide optimum (a share), no place in the critical set


@dataclass(frozen=True)
class CoreDecision:
    """One decision and the state it leaves."""

    shares: np.ndarray
    weights: np.ndarray
    critical: tuple[int, ...]
    forced: tuple[int, ...]
    breaching: tuple[int, ...]  # measured now (window or sustained errors)
    held: tuple[int, ...]  # earlier breachers too quiet to measure
    estimate: Estimate
    lp_status: str
    state: CoreState
    notes: tuple[str, ...] = ()

    @property
    def capacity(self) -> np.ndarray:
        return self.estimate.capacity

    def info(self) -> dict[str, Any]:
        return {"lp_status": self.lp_status, "capacity_estimate": [round(float(c), 3) for c in self.capacity]}


def lp_latency(p95_ms: np.ndarray, slo_ms: float) -> np.ndarray:
    """The LP's latency term per endpoint: p95 in SLO units above :data:`LATENCY_FREE` (NaN stays unknown)."""
    with np.errstate(invalid="ignore"):
        return np.maximum(np.asarray(p95_ms, dtype=np.float64) / slo_ms - LATENCY_FREE, 0.0)


def envoy_weights(
    shares: np.ndarray,
    addresses: Sequence[str],
    state: CoreState,
    demand_rps: float,
    lb_policy: str,
    *,
    available: np.ndarray | None = None,
    scale: int = 10000,
) -> np.ndarray:
    """Integer Envoy weights that realise ``shares`` under ``lb_policy`` (for LEAST_REQUEST,
    scaled by the requests each will hold, from its smoothed median latency)."""
    if lb_policy != "LEAST_REQUEST":
        return shares_to_weights(shares, scale=scale, available=available)
    mems = [state.memory.get(a, Memory()) for a in addresses]
    time_in_system_s = np.array([m.base_ms * m.ratio / 1000.0 for m in mems], dtype=np.float64)
    return least_request_weights(shares, time_in_system_s, demand_rps, available=available, scale=scale)


def with_forced(ranked: Sequence[int], forced: Sequence[int], k: int) -> list[int]:
    """Every ``forced`` endpoint, then the first ``k`` of ``ranked`` not already in (the
    forced endpoints' traffic needs more than one place to go)."""
    chosen = list(dict.fromkeys(int(i) for i in forced))
    extra = [i for i in dict.fromkeys(int(i) for i in ranked) if i not in chosen]
    return chosen + extra[: max(0, int(k))]


def decide(
    obs: Observation,
    ctx: PolicyContext,
    scores: np.ndarray | None,
    knobs: Knobs,
    state: CoreState | None = None,
    *,
    now: float | None = None,
) -> CoreDecision:
    """One decision from the split in force (``ctx.shares``). ``scores``: the policy's, one per
    endpoint (higher = more critical), or ``None`` to re-optimise every endpoint."""
    state = state or CoreState()
    n = len(obs.endpoints)
    if n == 0:
        raise ValueError(f"cluster {obs.cluster!r}: observation has no endpoints")
    now = float(obs.timestamp if now is None else now)
    shares = np.asarray(ctx.shares, dtype=np.float64).reshape(-1)
    if shares.shape[0] != n:
        raise ValueError(f"context has {shares.shape[0]} shares, observation has {n} endpoints")
    dt = max(0.0, now - state.at) if state.at is not None else 0.0
    mem, breaching, held, repriced = remember(obs, shares, knobs, state, now)
    est, mem = estimate(obs, np.asarray(ctx.capacity_hint, dtype=np.float64), mem, knobs, dt, breaching)
    avail = available_mask(obs)
    notes: list[str] = []
    forced: list[int] = []
    if knobs.force_breaching:
        recovered = [i for i, e in enumerate(obs.endpoints) if mem[e.address].recovering > 0]
        candidates = breaching + np.flatnonzero(est.congested).tolist() + repriced + recovered
        forced = [i for i in dict.fromkeys(candidates) if avail[i] and i not in held]
    everyone = [i for i in range(n) if avail[i] and i not in held]
    critical = everyone if scores is None else _ranked(scores, n, avail, held, forced, knobs.k)
    demand = float(ctx.demand_rps) if math.isfinite(ctx.demand_rps) and ctx.demand_rps > 0 else 0.0
    dearer_share = np.array([mem[e.address].dearer_share for e in obs.endpoints], dtype=np.float64)  # NaN: no rise
    max_share = None
    if knobs.safe_moves and demand > 0:
        max_share = np.where(np.isfinite(est.max_load), est.max_load / demand, np.inf)
        if np.isfinite(dearer_share).any():
            max_share, critical = _price_cap(max_share, dearer_share, shares, avail, critical, everyone, notes)
    min_share = None
    if knobs.safe_moves:
        # Bounded steps down too: only trouble (a breach, a queue, a price change) empties an endpoint at once.
        urgent = est.congested | np.isfinite(dearer_share)
        urgent[[*breaching, *held, *repriced]] = True
        min_share = np.where(avail & ~urgent, np.maximum(shares - knobs.max_shrink, 0.0), 0.0)
    solve = functools.partial(
        solve_critical,
        shares,
        capacity=est.capacity,
        cost=obs_field(obs, "cost_per_million"),
        demand=demand,
        available=avail,
        cost_weight=knobs.cost_weight,
        util_target=knobs.util_target,
        latency=_latency(obs, mem, knobs, now) if knobs.latency_weight > 0 else None,
        latency_weight=knobs.latency_weight,
        max_share=max_share,
        min_share=min_share,
    )
    if scores is not None and knobs.gap_k > 0 and knobs.force_breaching:
        whole = solve(everyone) if set(everyone) - set(critical) else None
        critical = critical + _gap_picks(whole, critical, held, shares, knobs.gap_k)
    res = solve(critical)
    if max_share is not None:
        for j in _bound(res.shares, shares, max_share, min_share):
            a = obs.endpoints[int(j)].address
            mem[a] = replace(mem[a], recovering=max(mem[a].recovering, 2))
    return CoreDecision(
        shares=res.shares,
        weights=shares_to_weights(res.shares, available=avail),
        critical=tuple(critical),
        forced=tuple(forced),
        breaching=tuple(breaching),
        held=tuple(held),
        estimate=est,
        lp_status=res.status,
        state=CoreState(at=now, memory=mem),
        notes=tuple(notes),
    )


def optimum_gap(
    obs: Observation, ctx: PolicyContext, knobs: Knobs, state: CoreState | None = None, *, now: float | None = None
) -> np.ndarray:
    """How far each endpoint's share is from the core's fleet-wide optimum (price, SLO and headroom all in
    it), 0 where unavailable: the imitation teacher's scores (re-route the flows that matter, as CFR-RL means to)."""
    whole = decide(obs, ctx, None, knobs, state, now=now)
    gap = np.abs(whole.shares - np.asarray(ctx.shares, dtype=np.float64).reshape(-1))
    return np.asarray(np.where(available_mask(obs), gap, 0.0))


def _ranked(scores: np.ndarray, n: int, avail: np.ndarray, held: list[int], forced: list[int], k: int) -> list[int]:
    """The forced endpoints, then the policy's K highest scores."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)[:n]
    if s.shape[0] != n:
        raise ValueError(f"{s.shape[0]} scores for {n} endpoints")
    s = np.where(avail & np.isfinite(s), s, -np.inf)
    s[list(held)] = -np.inf
    ranked = [int(i) for i in np.argsort(-s, kind="stable") if s[i] > -np.inf]
    return with_forced(ranked, forced, max(1, min(int(k), n)))


def _gap_picks(
    whole: LpResult | None, critical: list[int], held: list[int], shares: np.ndarray, gap_k: int
) -> list[int]:
    """The ``gap_k`` endpoints furthest from ``whole``, the fleet-wide optimum, which the policy (ranking by load, not
    price) may never pick; ``None`` (no second LP) when everyone is critical already."""
    gap = np.abs(whole.shares - shares) if whole is not None else np.zeros(shares.shape[0])
    gap[list(critical)] = 0.0
    gap[list(held)] = 0.0
    return [int(i) for i in np.argsort(-gap, kind="stable")[:gap_k] if gap[i] > GAP_MIN]


def _price_cap(
    max_share: np.ndarray,
    dearer_share: np.ndarray,
    shares: np.ndarray,
    avail: np.ndarray,
    critical: list[int],
    everyone: list[int],
    notes: list[str],
) -> tuple[np.ndarray, list[int]]:
    """``(max_share, critical)``: an endpoint whose price rose gains no share, unless the others
    cannot carry the traffic (every endpoint made critical when that finds the room)."""
    n = shares.shape[0]
    dearer = np.isfinite(dearer_share)
    capped = np.where(dearer, np.minimum(max_share, dearer_share), max_share)

    def room_for(crit_idx: list[int]) -> bool:
        crit = np.zeros(n, dtype=bool)
        crit[crit_idx] = True
        budget = 1.0 - float(np.where(~crit & avail, shares, 0.0).sum())
        return float(np.minimum(np.where(crit & avail, capped, 0.0), 1.0).sum()) >= budget

    if not room_for(critical) and room_for(everyone):
        critical = list(dict.fromkeys(critical + everyone))
        notes.append("price: every endpoint re-optimised to keep a repriced one from gaining share")
    if room_for(critical):
        return capped, critical
    notes.append("price: a repriced endpoint may gain share, the others lack headroom")
    return max_share, critical


def _latency(obs: Observation, mem: dict[str, Memory], knobs: Knobs, now: float) -> np.ndarray:
    """The LP's latency term: the latency evidence's p95 where there is enough of it (one
    window's p95 flips with the few slowest requests it caught), else the window's."""
    p95 = obs_field(obs, "p95_ms")
    smooth = np.array([latency_p95(mem[e.address], knobs.slo_ms) for e in obs.endpoints], dtype=np.float64)
    p95 = np.where(np.isfinite(smooth) & np.isfinite(p95), smooth, p95)
    known = np.isfinite(p95)
    typical = float(np.median(p95[known])) if known.any() else math.nan
    for i, e in enumerate(obs.endpoints):
        m = mem[e.address]
        age = now - m.p95_at
        if not known[i] and math.isfinite(m.p95_ms) and age < LATENCY_MEMORY_S:
            # A quiet endpoint's last p95, fading to typical so a recovered one wins traffic back.
            w = 1.0 - age / LATENCY_MEMORY_S
            p95[i] = w * m.p95_ms + (1.0 - w) * typical if math.isfinite(typical) else m.p95_ms
    return lp_latency(p95, knobs.slo_ms)


def _bound(new: np.ndarray, shares: np.ndarray, max_share: np.ndarray, min_share: np.ndarray | None) -> np.ndarray:
    """Endpoints held back by their safe-move bound (up, or the bounded step down): they stay critical
    until they have what the LP wants (CFR-RL re-routes until converged)."""
    bound = (new > shares + 1e-6) & np.isfinite(max_share) & (new >= max_share - 1e-6)
    if min_share is not None:
        bound |= (new < shares - 1e-6) & (min_share > 0) & (new <= min_share + 1e-6)
    return np.flatnonzero(bound)


def observe_only(
    obs: Observation, ctx: PolicyContext, knobs: Knobs, state: CoreState | None = None, *, now: float | None = None
) -> tuple[Estimate, CoreState]:
    """The estimate without a decision (for encoding the policy's input), and the state
    it would leave; :func:`decide` on the same input computes the same estimate."""
    state = state or CoreState()
    now = float(obs.timestamp if now is None else now)
    dt = max(0.0, now - state.at) if state.at is not None else 0.0
    mem, breaching, _, _ = remember(obs, np.asarray(ctx.shares, dtype=np.float64).reshape(-1), knobs, state, now)
    return estimate(obs, np.asarray(ctx.capacity_hint, dtype=np.float64), mem, knobs, dt, breaching)[0], state
