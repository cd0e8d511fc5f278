"""The CFR-RL linear program (Zhang et al., IEEE JSAC 2020) on endpoint traffic shares: every available endpoint but the
K critical ones keeps its share; the LP splits the critical traffic, minimising the max utilisation U (free below
``util_target``) + cost and latency terms. When kept endpoints or that knee fix U, it also balances the critical
endpoints' own max (``BALANCE``), or the cost term would park all their traffic on the cheapest. Numeric problems never
raise (shape problems do): bad values become 0 (costs: the highest valid one)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, linprog

from balanceiq.config import UINT32_MAX

BALANCE = 0.5  # weight of the critical endpoints' own max utilisation above the knee
TIE_BREAK = 1e-3  # and its weight as a tie-break

Floats = np.ndarray | Sequence[float]
Mask = np.ndarray | Sequence[bool]


@dataclass(frozen=True)
class LpResult:
    """A split of traffic over every endpoint and how it was reached."""

    shares: np.ndarray  # >= 0, sums to 1 within 1e-9
    max_utilization: float  # max_i share_i * demand / capacity_i with the given capacities
    status: str  # "optimal" or the fallback's name
    fallback: str | None = None


def _vector(name: str, values: object, n: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {n}")
    return arr


def _nonneg(arr: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(arr) & (arr >= 0), arr, 0.0)


def _clean_cost(cost: np.ndarray) -> np.ndarray:
    ok = np.isfinite(cost) & (cost >= 0)
    worst = float(cost[ok].max()) if ok.any() else 0.0
    return np.where(ok, cost, worst)


def clean_latency(latency: np.ndarray) -> np.ndarray:
    """Latency in SLO units for the LP: unknown -> median of the known (0 if none), clipped
    to [0, 4] (beyond 4x the SLO an endpoint is simply bad; the term stays commensurate)."""
    lat = np.asarray(latency, dtype=np.float64).copy()
    known = np.isfinite(lat)
    lat[known] = np.clip(lat[known], 0.0, 4.0)
    lat[~known] = float(np.median(lat[known])) if known.any() else 0.0
    return lat


def _clean_scalar(x: object) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v > 0 else 0.0


def price_unit(cost: np.ndarray, available: np.ndarray | None = None) -> float:
    """One unit of the cost term: the median price of the available endpoints (the largest when
    that is 0); by the largest, one soaring or unused dear price would make every other look free."""
    c = np.asarray(cost, dtype=np.float64)
    pool = c[available] if available is not None and np.any(available) else c
    unit = float(np.median(pool)) if pool.size else 0.0
    return unit if unit > 0 else (float(c.max()) if c.size else 0.0)


def endpoint_mask(name: str, values: object, n: int) -> np.ndarray:
    """One boolean per endpoint. A NaN in a float mask is "unknown", which must not take an endpoint down."""
    arr = np.asarray(values).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {n} (one per endpoint)")
    if arr.dtype == bool:
        return arr.copy()
    try:
        f = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a vector of booleans: {exc}") from None
    return np.asarray(~(np.isfinite(f) & (f == 0)))


def _available(available: object, n: int) -> np.ndarray:
    return np.ones(n, dtype=bool) if available is None else endpoint_mask("available", available, n)


def _clean_shares(shares: np.ndarray, avail: np.ndarray) -> np.ndarray:
    s = _nonneg(shares)
    total = float(s.sum())
    if total <= 0 or not math.isfinite(total):
        base = avail if avail.any() else np.ones_like(avail)
        return np.asarray(base / base.sum())
    if abs(total - 1.0) > 1e-12:
        s = s / total
    return s


def _critical_mask(critical: object, n: int) -> np.ndarray:
    idx = np.asarray(critical if critical is not None else []).reshape(-1)
    if idx.dtype == bool:
        if idx.shape[0] != n:
            raise ValueError(f"critical mask has {idx.shape[0]} entries, expected {n}")
        return idx.copy()
    if idx.size and not np.issubdtype(idx.dtype, np.integer) and not np.all(np.isfinite(idx) & (np.mod(idx, 1) == 0)):
        raise ValueError(f"critical indices must be integers, got {critical!r}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"critical index out of range for {n} endpoints: {sorted(set(idx.tolist()))}")
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return mask


def planning_demand(demand: float, capacity: np.ndarray) -> float:
    """The demand the LP plans for: ``demand`` if positive, else the total valid capacity."""
    d = _clean_scalar(demand)
    return d if d > 0 else float(_nonneg(np.asarray(capacity, dtype=np.float64)).sum())


def utilization(shares: np.ndarray, capacity: np.ndarray, demand: float) -> np.ndarray:
    """Per-endpoint load/capacity. Load on an endpoint without capacity is ``inf``."""
    load = _nonneg(np.asarray(shares, dtype=np.float64)) * _clean_scalar(demand)
    cap = _nonneg(np.asarray(capacity, dtype=np.float64))
    # A subnormal capacity (an API caller's 5e-324) overflows to inf: as overloaded as it is.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(cap > 0, load / np.where(cap > 0, cap, 1.0), np.where(load > 0, np.inf, 0.0))


def objective(
    shares: np.ndarray,
    capacity: np.ndarray,
    cost: np.ndarray,
    demand: float,
    *,
    cost_weight: float = 0.1,
    util_target: float = 0.0,
    latency: Floats | None = None,
    latency_weight: float = 0.0,
) -> float:
    """The LP's objective for any full split, sanitised like the LP: its optimum with every endpoint critical
    scores <= any other split of the same inputs."""
    s = _nonneg(_vector("shares", shares))
    n = s.shape[0]
    cap = _nonneg(_vector("capacity", capacity, n))
    c = _clean_cost(_vector("cost", cost, n))
    w = _clean_scalar(cost_weight)
    u = utilization(s, cap, planning_demand(demand, cap))
    unit = price_unit(c)
    cost_term = w * float(c @ s) / unit if unit > 0 else 0.0
    wl = _clean_scalar(latency_weight)
    lat_term = wl * float(clean_latency(_vector("latency", latency, n)) @ s) if latency is not None and wl > 0 else 0.0
    return max(float(u.max(initial=0.0)), _clean_scalar(util_target)) + cost_term + lat_term


def _lp(
    cap: np.ndarray,
    cost_coef: np.ndarray,
    budget: float,
    floor: float,
    demand: float,
    knee: float = 0.0,
    upper: np.ndarray | None = None,
    lower: np.ndarray | None = None,
) -> np.ndarray | None:
    """Critical shares minimising U + cost_coef @ x (+ balance and tie-break), or None on failure."""
    m = cap.shape[0]
    # In units of the largest capacity (x_i r_i <= U', r_i >= 1) HiGHS' tolerance binds shares, not tiny utilisations.
    cap_ref = float(cap.max())
    with np.errstate(over="ignore", divide="ignore", under="ignore"):
        r = cap_ref / cap
        k_u = demand / cap_ref  # U = k_u * U'
    if not (np.all(np.isfinite(r)) and math.isfinite(k_u) and k_u > 0):
        return None
    tie = floor > 0
    # x..., U', then (tie) V' = the critical endpoints' own max and B' = max(V', knee).
    nv = m + 3 if tie else m + 1
    c = np.zeros(nv)
    c[:m] = cost_coef
    c[m] = k_u
    a_ub = np.zeros((m + 2 if tie else m, nv))
    a_ub[np.arange(m), np.arange(m)] = r
    if tie:
        c[m + 1 :] = TIE_BREAK * k_u, BALANCE * k_u
        a_ub[:m, m + 1] = -1.0  # V' >= x_i r_i
        a_ub[m, m : m + 2] = -1.0, 1.0  # U' >= V'
        a_ub[m + 1, m + 1 :] = 1.0, -1.0  # B' >= V'
    else:
        a_ub[:, m] = -1.0  # U' >= x_i r_i
    # argmin is invariant to scaling the objective; a unit-sized one suits HiGHS' tolerances.
    c /= float(np.abs(c).max())
    a_eq = np.zeros((1, nv))
    a_eq[0, :m] = 1.0
    lo = np.zeros(m) if lower is None else lower
    up = np.full(m, np.inf) if upper is None else upper
    xb = [(float(a), float(u) if math.isfinite(u) else None) for a, u in zip(lo, up, strict=True)]
    bounds = xb + [(floor / k_u, None)] + ([(0.0, None), (knee / k_u, None)] if tie else [])
    try:
        with warnings.catch_warnings():
            # A failed solve is handled by the caller's fallback.
            warnings.simplefilter("ignore", OptimizeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = linprog(
                c, A_ub=a_ub, b_ub=np.zeros(a_ub.shape[0]), A_eq=a_eq, b_eq=[budget], bounds=bounds, method="highs"
            )
    except (ValueError, np.linalg.LinAlgError):
        return None
    if res.status != 0 or res.x is None or not np.all(np.isfinite(res.x)):
        return None
    x = np.clip(res.x[:m], 0.0, None)
    total = float(x.sum())
    if total <= 0 or abs(total - budget) > 1e-6 * max(budget, 1.0):
        return None
    # HiGHS meets the equality within its tolerance; the caller promises sum 1 within 1e-9.
    return np.asarray(x * (budget / total))


def _result(shares: np.ndarray, capacity: np.ndarray, demand: float, fallback: str | None) -> LpResult:
    s = np.clip(shares, 0.0, None)
    total = float(s.sum())
    if abs(total - 1.0) > 1e-12:
        s = s / total
    return LpResult(s, float(utilization(s, capacity, demand).max(initial=0.0)), fallback or "optimal", fallback)


def _share_bounds(
    max_share: np.ndarray | None, min_share: np.ndarray | None, idx: np.ndarray, budget: float
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The critical endpoints' share bounds, made to hold the critical ``budget``."""
    upper = None
    if max_share is not None:
        upper = np.where(np.isfinite(max_share) & (max_share >= 0), max_share, np.inf)[idx]
        room = float(np.minimum(upper, budget).sum())
        if room < budget * (1 + 1e-9) and np.isfinite(upper).all():
            # Not enough headroom for the critical traffic: stretch every bound alike.
            upper = upper * (budget / room) * (1 + 1e-6) if room > 0 else None
    lower = None
    if min_share is not None:
        lower = np.where(np.isfinite(min_share) & (min_share > 0), min_share, 0.0)[idx]
        if upper is not None:
            lower = np.minimum(lower, upper)
        if lower.sum() > budget:
            lower = lower * (budget / float(lower.sum())) * (1 - 1e-9)
    return upper, lower


def solve_critical(
    shares: Floats,
    critical: Sequence[int] | np.ndarray,
    capacity: Floats,
    cost: Floats,
    demand: float,
    *,
    available: Mask | None = None,
    cost_weight: float = 0.1,
    util_target: float = 0.0,
    latency: Floats | None = None,
    latency_weight: float = 0.0,
    max_share: Floats | None = None,
    min_share: Floats | None = None,
) -> LpResult:
    """Re-optimise only the ``critical`` endpoints (indices or a bool mask): available others
    keep their share, unavailable ones release theirs. ``max_share``/``min_share`` bound each
    critical share (stretched or scaled to fit). ``status`` is ``"optimal"`` or a fallback:
    ``"all_down"``, ``"no_critical"``, ``"no_capacity"`` or ``"lp_failed"``."""
    s = _vector("shares", shares)
    n = s.shape[0]
    if n == 0:
        raise ValueError("no endpoints")
    avail = _available(available, n)
    crit = _critical_mask(critical, n)
    cap = _nonneg(_vector("capacity", capacity, n))
    c = _clean_cost(_vector("cost", cost, n))
    lat = None if latency is None else _vector("latency", latency, n)
    max_share = None if max_share is None else _vector("max_share", max_share, n)
    min_share = None if min_share is None else _vector("min_share", min_share, n)
    d_real = _clean_scalar(demand)
    if not avail.any():
        return _result(np.full(n, 1.0 / n), cap, d_real, "all_down")
    s = _clean_shares(s, avail)
    kept_mask = ~crit & avail
    out = np.where(kept_mask, s, 0.0)
    budget = max(0.0, 1.0 - float(out.sum()))
    crit_avail = crit & avail
    if not crit_avail.any():
        base = np.where(avail, s, 0.0)
        base = base / base.sum() if base.sum() > 0 else avail / avail.sum()
        return _result(base, cap, d_real, "no_critical")
    if budget <= 0:
        return _result(out, cap, d_real, None)
    usable = crit_avail & (cap > 0)
    if not usable.any():
        out[crit_avail] += budget / int(crit_avail.sum())
        return _result(out, cap, d_real, "no_capacity")
    idx = np.flatnonzero(usable)
    if idx.size == 1:
        out[idx] = budget
        return _result(out, cap, d_real, None)

    d_plan = planning_demand(d_real, cap)
    fixed_u = utilization(out, cap, d_plan)[kept_mask]
    # An inf (kept, no capacity) floor would make every critical split "free", handing it all to the cheapest.
    fixed_u = fixed_u[np.isfinite(fixed_u)]
    floor = max(float(fixed_u.max(initial=0.0)), _clean_scalar(util_target))
    unit = price_unit(c, avail)
    cost_coef = _clean_scalar(cost_weight) * c[idx] / unit if unit > 0 else np.zeros(idx.size)
    wl = _clean_scalar(latency_weight)
    if lat is not None and wl > 0:
        cost_coef = cost_coef + wl * clean_latency(lat)[idx]
    upper, lower = _share_bounds(max_share, min_share, idx, budget)
    x = _lp(cap[idx], cost_coef, budget, floor, d_plan, _clean_scalar(util_target), upper, lower)
    out[idx] = budget * cap[idx] / cap[idx].sum() if x is None else x
    return _result(out, cap, d_real, "lp_failed" if x is None else None)


def shares_to_weights(shares: Floats, *, scale: int = 10000, available: Mask | None = None) -> np.ndarray:
    """Integer Envoy weights summing to exactly ``max(scale, n)`` (<= 2**32-1), realising ``shares`` within
    ``n/scale`` each (largest remainder); Envoy forbids 0: zero-share or unavailable ones get 1 (health drains)."""
    s = _nonneg(_vector("shares", shares))
    n = s.shape[0]
    if int(scale) < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    avail = _available(available, n)
    s = np.where(avail, s, 0.0)
    total = float(s.sum())
    base = avail if avail.any() else np.ones(n, dtype=bool)
    s = s / total if total > 0 else base / base.sum()
    units = min(max(int(scale), n), UINT32_MAX)
    w = np.ones(n, dtype=np.int64)
    pos = s > 0
    # Every zero-share endpoint costs one unit; the positive ones share what is left.
    rest = units - int((~pos).sum())
    target = s[pos] * rest
    wp = np.maximum(np.floor(target).astype(np.int64), 1)
    deficit = rest - int(wp.sum())
    if deficit > 0:
        wp[np.argsort(-(target - wp), kind="stable")[:deficit]] += 1
    while deficit < 0:
        # Bumping tiny shares to 1 overspent; take back from the most over-served.
        excess = np.where(wp > 1, wp - target, -np.inf)
        wp[int(np.argmax(excess))] -= 1
        deficit += 1
    w[pos] = wp
    return w


def least_request_weights(
    shares: Floats, time_in_system_s: Floats, demand_rps: float, *, available: Mask | None = None, scale: int = 10000
) -> np.ndarray:
    """Weights realising ``shares`` under LEAST_REQUEST (picks by ``weight / (active + 1)``): ``share x (active + 1)``,
    each holding ``share x demand x time in system`` (Little's law; unknown times count as none)."""
    s = _nonneg(_vector("shares", shares))
    n = s.shape[0]
    t = _nonneg(_vector("time_in_system_s", time_in_system_s, n))
    total = float(s.sum())
    frac = s / total if total > 0 else s
    with np.errstate(over="ignore", invalid="ignore"):
        factor = 1.0 + np.minimum(frac * _clean_scalar(demand_rps) * t, 1e6)
    return shares_to_weights(s * np.where(np.isfinite(factor), factor, 1.0), scale=scale, available=available)


def traffic_moved(old_shares: Floats, new_shares: Floats) -> float:
    """Fraction of traffic whose endpoint changed: ``0.5 * sum |new - old|`` (NaN -> 0)."""
    old = _nonneg(_vector("old_shares", old_shares))
    new = _nonneg(_vector("new_shares", new_shares, old.shape[0]))
    return 0.5 * float(np.abs(new - old).sum())


def weights_to_shares(weights: Floats, routable: Mask | None = None) -> np.ndarray:
    """The split Envoy realises from ``weights`` (non-routable ones, e.g. DRAINING, get none; equal if none is left)."""
    w = _nonneg(_vector("weights", weights))
    if routable is not None:
        w = np.where(_available(routable, w.shape[0]), w, 0.0)
    total = float(w.sum())
    return w / total if total > 0 else np.full(w.shape[0], 1.0 / max(w.shape[0], 1))


def critical_indices(action: object, n: int) -> list[int]:
    """An action's endpoint indices in order, duplicates and out-of-range ones dropped."""
    return list(dict.fromkeys(a for a in map(int, np.asarray(action).reshape(-1)) if 0 <= a < n))
