"""The CFR-RL linear program: its invariants under random inputs, its optimum and fallbacks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balanceiq.policy.lp import (
    UINT32_MAX,
    LpResult,
    objective,
    price_unit,
    shares_to_weights,
    solve_critical,
    traffic_moved,
    utilization,
)

NAN = math.nan
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Case:
    shares: np.ndarray
    critical: list[int]
    capacity: np.ndarray
    cost: np.ndarray
    demand: float
    available: np.ndarray
    cost_weight: float


@st.composite
def cases(draw: st.DrawFn, *, dirty: bool = True, max_n: int = 40) -> Case:
    """Random fleets: Dirichlet shares, capacities with zeros/NaN, costs, availability."""
    n = draw(st.integers(1, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    concentration = draw(st.sampled_from([0.1, 1.0, 10.0]))
    shares = rng.dirichlet(np.full(n, concentration))
    capacity = rng.uniform(1.0, 1000.0, n)
    cost = rng.uniform(0.0, 5.0, n)
    if dirty:
        p_zero, p_nan = draw(st.sampled_from([0.0, 0.2, 1.0])), draw(st.sampled_from([0.0, 0.2, 1.0]))
        capacity[rng.random(n) < p_zero] = 0.0
        capacity[rng.random(n) < p_nan] = NAN
        cost[rng.random(n) < draw(st.sampled_from([0.0, 0.2]))] = NAN
    p_down = draw(st.sampled_from([0.0, 0.3, 1.0] if dirty else [0.0, 0.3]))
    available = rng.random(n) >= p_down
    k = draw(st.integers(0 if dirty else 1, n))
    critical = sorted(rng.choice(n, k, replace=False).tolist())
    demand = draw(st.sampled_from([0.0, 1.0, 100.0, 5000.0, NAN] if dirty else [1.0, 100.0, 5000.0]))
    cost_weight = draw(st.sampled_from([0.0, 0.1, 1.0]))
    return Case(shares, critical, capacity, cost, demand, available, cost_weight)


def solve(c: Case) -> LpResult:
    return solve_critical(
        c.shares, c.critical, c.capacity, c.cost, c.demand, available=c.available, cost_weight=c.cost_weight
    )


def oracle(capacity: object, cost: object, demand: float, **kw: object) -> LpResult:
    """The LP with every endpoint critical (the lab's oracle)."""
    n = np.asarray(capacity, dtype=np.float64).reshape(-1).shape[0]
    return solve_critical(np.ones(n) / n, np.ones(n, dtype=bool), capacity, cost, demand, **kw)  # type: ignore[arg-type]


def solve_oracle(c: Case) -> LpResult:
    return oracle(c.capacity, c.cost, c.demand, available=c.available, cost_weight=c.cost_weight)


def assert_valid(res: LpResult, available: np.ndarray) -> None:
    s = res.shares
    assert s.dtype == np.float64
    assert np.all(np.isfinite(s))
    assert np.all(s >= 0)
    assert abs(float(s.sum()) - 1.0) <= 1e-9
    if available.any():
        assert np.all(s[~available] == 0), res
    else:
        assert res.fallback == "all_down"
    assert res.status == (res.fallback or "optimal")
    assert not math.isnan(res.max_utilization)


def obj(shares: np.ndarray, c: Case) -> float:
    return objective(shares, c.capacity, c.cost, c.demand, cost_weight=c.cost_weight)


# -- invariants -------------------------------------------------------------------------------


@FAST
@given(cases())
def test_result_shares_are_a_valid_split(c: Case) -> None:
    assert_valid(solve(c), c.available)
    assert_valid(solve_oracle(c), c.available)


@FAST
@given(cases())
def test_available_non_critical_endpoints_keep_their_share_exactly(c: Case) -> None:
    res = solve(c)
    if res.fallback is not None:
        return
    kept = np.ones(len(c.shares), dtype=bool)
    kept[c.critical] = False
    kept &= c.available
    assert np.array_equal(res.shares[kept], c.shares[kept])


@FAST
@given(cases())
def test_unusable_critical_endpoints_get_nothing(c: Case) -> None:
    res = solve(c)
    if res.fallback is not None:
        return
    crit = np.zeros(len(c.shares), dtype=bool)
    crit[c.critical] = True
    no_capacity = ~(np.isfinite(c.capacity) & (c.capacity > 0))
    assert np.all(res.shares[crit & (no_capacity | ~c.available)] == 0)


@FAST
@given(cases(), st.sampled_from([1, 7, 100, 10000, 2**31]))
def test_weights_are_envoy_valid_and_realise_the_shares(c: Case, scale: int) -> None:
    res = solve(c)
    avail = c.available if c.available.any() else None
    w = shares_to_weights(res.shares, scale=scale, available=avail)
    n = len(w)
    assert w.dtype == np.int64
    assert np.all(w >= 1) and np.all(w <= UINT32_MAX)
    assert int(w.sum()) <= UINT32_MAX
    assert int(w.sum()) == max(scale, n)
    realised = w / w.sum()
    assert np.all(np.abs(realised - res.shares) <= n / scale + 1e-12)


@FAST
@given(cases())
def test_oracle_is_never_beaten(c: Case) -> None:
    if not c.available.any():
        return
    best_res = solve_oracle(c)
    if best_res.fallback is not None:
        return  # a fallback is a defined answer, not an optimum (see the fallback tests)
    best = obj(best_res.shares, c)
    # Tolerance: HiGHS' feasibility tolerance (1e-7 on shares) times the largest coefficient.
    tol = 1e-6 * (1.0 + abs(best))
    rng = np.random.default_rng(len(c.shares))
    idx = np.flatnonzero(c.available)
    for _ in range(20):
        split = np.zeros(len(c.shares))
        split[idx] = rng.dirichlet(np.full(idx.size, 0.5))
        assert best <= obj(split, c) + tol
    res = solve(c)
    assert best <= obj(res.shares, c) + tol
    # The oracle can do at least as well as any critical set, including "everything".
    every = solve_critical(
        c.shares,
        list(range(len(c.shares))),
        c.capacity,
        c.cost,
        c.demand,
        available=c.available,
        cost_weight=c.cost_weight,
    )
    assert best <= obj(every.shares, c) + tol


@FAST
@given(cases(dirty=False))
def test_pure_min_max_equalises_utilisation(c: Case) -> None:
    res = oracle(c.capacity, c.cost, c.demand, available=c.available, cost_weight=0.0)
    if not c.available.any():
        return
    assert res.status == "optimal"
    cap = np.where(c.available, c.capacity, 0.0)
    expected = cap / cap.sum()
    assert np.allclose(res.shares, expected, atol=1e-6, rtol=0)
    assert res.max_utilization == pytest.approx(c.demand / cap.sum(), rel=1e-5)


@FAST
@given(cases())
def test_never_raises_and_reports_finite_shares_for_any_critical_set(c: Case) -> None:
    # Bool masks and index lists are the same request.
    mask = np.zeros(len(c.shares), dtype=bool)
    mask[c.critical] = True
    a = solve(c)
    b = solve_critical(c.shares, mask, c.capacity, c.cost, c.demand, available=c.available, cost_weight=c.cost_weight)
    assert np.array_equal(a.shares, b.shares)
    assert a.status == b.status


# -- examples -------------------------------------------------------------------------------------


def test_critical_traffic_moves_to_capacity_within_the_critical_set() -> None:
    cap = np.array([100.0, 300.0, 200.0, 200.0])
    res = solve_critical([0.25] * 4, [0, 1], cap, [1.0] * 4, 400.0, cost_weight=0.0)
    assert res.status == "optimal"
    assert res.shares[2:] == pytest.approx([0.25, 0.25], abs=0)
    # 0.5 of the traffic over capacities 100 and 300: 1/8 and 3/8 equalise them at 0.5.
    assert res.shares[:2] == pytest.approx([0.125, 0.375], abs=1e-7)
    assert res.max_utilization == pytest.approx(0.5)  # also the kept ones: 0.25*400/200


def test_critical_split_is_even_when_a_kept_endpoint_sets_the_max() -> None:
    # U is pinned at 1.0 by the kept endpoints; without the tie-break any critical split
    # under it is optimal and HiGHS may put all 0.5 on one endpoint.
    cap = np.array([300.0, 300.0, 100.0, 100.0])
    res = solve_critical([0.25] * 4, [0, 1], cap, [1.0] * 4, 400.0, cost_weight=0.1)
    assert res.shares == pytest.approx([0.25, 0.25, 0.25, 0.25], abs=1e-7)


def test_cost_term_prefers_cheap_capacity_below_the_knee() -> None:
    # Kept endpoint 2 sits at utilisation 1.0; with the knee there too, utilisation below
    # it is free and cost alone decides the critical split.
    cap = np.array([200.0, 200.0, 100.0])
    res = solve_critical([0.3, 0.3, 0.4], [0, 1], cap, [1.0, 10.0, 1.0], 250.0, cost_weight=0.1, util_target=1.0)
    assert res.shares[2] == 0.4
    assert res.shares[0] == pytest.approx(0.6, abs=1e-7)
    assert res.shares[1] == pytest.approx(0.0, abs=1e-7)


def test_without_a_knee_critical_endpoints_are_balanced_under_a_kept_max() -> None:
    # The same fleet with no knee: U is pinned by the kept endpoint, and the critical
    # endpoints are balanced (BALANCE) rather than the cheap one filled up to U, so the
    # next decision has headroom to lower U with (see the module doc). Prices are in units
    # of the median price, so the 10x dearer endpoint costs 0.01 * 10 per share here.
    cap = np.array([200.0, 200.0, 100.0])
    res = solve_critical([0.5, 0.1, 0.4], [0, 1], cap, [1.0, 10.0, 1.0], 250.0, cost_weight=0.01)
    assert res.shares == pytest.approx([0.3, 0.3, 0.4], abs=1e-7)


def test_prices_count_in_units_of_the_median_so_a_soaring_price_is_shed() -> None:
    # Three equal endpoints at half load; the third's price rises 8x. Shedding it lifts the
    # max utilisation by 0.25 and saves 7 median prices on a third of the traffic (0.7 at
    # cost weight 0.3). In units of the largest price that saving would read 0.09, so the
    # LP would keep paying 8x for a third of the traffic.
    cap = np.array([100.0, 100.0, 100.0])
    res = oracle(cap, [1.0, 1.0, 8.0], 150.0, cost_weight=0.3)
    assert res.shares[2] == pytest.approx(0.0, abs=1e-7)
    assert res.max_utilization == pytest.approx(0.75, abs=1e-6)
    assert price_unit(np.array([1.0, 2.0, 50.0])) == 2.0
    # Unavailable endpoints do not count; a fleet priced at 0 in the middle falls back to the max.
    assert price_unit(np.array([1.0, 2.0, 50.0]), np.array([True, False, True])) == pytest.approx(25.5)
    assert price_unit(np.array([0.0, 0.0, 3.0])) == 3.0


def test_cost_weight_trades_utilisation_for_price() -> None:
    cap = np.array([100.0, 100.0])
    cheap_blind = oracle(cap, [1.0, 10.0], 100.0, cost_weight=0.0)
    assert cheap_blind.shares == pytest.approx([0.5, 0.5], abs=1e-7)
    # Moving share d to the cheap endpoint costs d of utilisation and saves 0.9*w*d: w > 1.11 wins.
    cheap = oracle(cap, [1.0, 10.0], 100.0, cost_weight=3.0)
    assert cheap.shares == pytest.approx([1.0, 0.0], abs=1e-7)


def test_unavailable_non_critical_share_is_released_to_the_critical_set() -> None:
    res = solve_critical(
        [0.25] * 4, [0, 1], [100.0] * 4, [1.0] * 4, 100.0, available=[True, True, True, False], cost_weight=0.0
    )
    assert res.status == "optimal"
    assert res.shares == pytest.approx([0.375, 0.375, 0.25, 0.0], abs=1e-7)


def test_zero_demand_plans_for_load_rather_than_price() -> None:
    res = oracle([100.0, 300.0], [1.0, 5.0], 0.0, cost_weight=0.1)
    assert res.shares == pytest.approx([0.25, 0.75], abs=1e-7)
    assert res.max_utilization == 0.0


# -- fallbacks ------------------------------------------------------------------------------------


def test_all_down_is_equal_over_everything() -> None:
    for res in (
        solve_critical([0.7, 0.2, 0.1], [0], [1.0, 2.0, 3.0], [1.0] * 3, 10.0, available=[False] * 3),
        oracle([1.0, 2.0, 3.0], [1.0] * 3, 10.0, available=[False] * 3),
    ):
        assert res.fallback == res.status == "all_down"
        assert res.shares == pytest.approx([1 / 3] * 3)


def test_empty_critical_set_keeps_available_shares_renormalised() -> None:
    res = solve_critical([0.5, 0.3, 0.2], [], [1.0] * 3, [1.0] * 3, 1.0, available=[True, True, False])
    assert res.fallback == "no_critical"
    assert res.shares == pytest.approx([0.625, 0.375, 0.0])
    # Nothing left on available endpoints: equal over them.
    res = solve_critical([0.0, 0.0, 1.0], [2], [1.0] * 3, [1.0] * 3, 1.0, available=[True, True, False])
    assert res.fallback == "no_critical"
    assert res.shares == pytest.approx([0.5, 0.5, 0.0])


@pytest.mark.parametrize("bad", [0.0, NAN, math.inf, -5.0])
def test_capacity_unknown_on_every_critical_endpoint_is_capacity_blind(bad: float) -> None:
    res = solve_critical([0.4, 0.4, 0.2], [0, 1], [bad, bad, 10.0], [1.0] * 3, 5.0)
    assert res.fallback == "no_capacity"
    assert res.shares == pytest.approx([0.4, 0.4, 0.2])
    assert res.max_utilization == math.inf  # load where no capacity is known
    res = oracle([bad] * 3, [1.0] * 3, 5.0, available=[True, True, False])
    assert res.fallback == "no_capacity"
    assert res.shares == pytest.approx([0.5, 0.5, 0.0])


def test_nan_and_inf_inputs_are_sanitised() -> None:
    res = solve_critical(
        [NAN, math.inf, -1.0, 0.5],
        [0, 1, 2, 3],
        [100.0, NAN, 100.0, 100.0],
        [NAN, 1.0, math.inf, 2.0],
        NAN,
        cost_weight=NAN,
    )
    assert res.status == "optimal"
    assert np.all(np.isfinite(res.shares)) and res.shares.sum() == pytest.approx(1.0, abs=1e-12)
    # Unknown capacity (index 1) gets nothing; the rest by capacity (cost_weight NaN -> 0).
    assert res.shares == pytest.approx([1 / 3, 0.0, 1 / 3, 1 / 3], abs=1e-7)
    assert res.max_utilization == 0.0  # demand NaN -> 0
    # Shares all invalid: equal over available.
    res = solve_critical([NAN, NAN], [0], [1.0, 1.0], [1.0, 1.0], 1.0)
    assert res.shares == pytest.approx([0.5, 0.5])


def test_lp_failure_falls_back_to_capacity_proportional() -> None:
    # A capacity ratio of 1e300 is beyond any solver's numerics.
    res = oracle([1e-300, 1.0, 1e300], [1.0] * 3, 1e6, cost_weight=0.0)
    assert res.fallback == res.status == "lp_failed"
    assert np.all(np.isfinite(res.shares)) and res.shares.sum() == pytest.approx(1.0)
    assert res.shares[2] == pytest.approx(1.0)


def test_structural_errors_raise() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        solve_critical([0.5, 0.5], [0], [1.0], [1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="out of range"):
        solve_critical([0.5, 0.5], [2], [1.0, 1.0], [1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="no endpoints"):
        oracle([], [], 1.0)


# -- weights and movement ---------------------------------------------------------------------------


def test_weights_give_zero_share_endpoints_one_unit() -> None:
    w = shares_to_weights([0.5, 0.5, 0.0], scale=1000)
    assert w.tolist() == [500, 499, 1] or w.tolist() == [499, 500, 1]
    w = shares_to_weights([0.5, 0.5, 0.0], available=[True, False, True])
    assert w.tolist() == [9998, 1, 1]


def test_weights_with_tiny_shares_still_sum_to_scale() -> None:
    shares = np.array([1e-9] * 50 + [1 - 50e-9])
    w = shares_to_weights(shares, scale=100)
    assert np.all(w >= 1) and int(w.sum()) == 100 and w[-1] == 50


def test_weights_more_endpoints_than_scale() -> None:
    w = shares_to_weights(np.full(20, 0.05), scale=10)
    assert w.tolist() == [1] * 20


def test_weights_reject_nonpositive_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        shares_to_weights([1.0], scale=0)


def test_traffic_moved() -> None:
    assert traffic_moved([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert traffic_moved([1.0, 0.0], [0.0, 1.0]) == 1.0
    assert traffic_moved([0.5, 0.3, 0.2], [0.4, 0.4, 0.2]) == pytest.approx(0.1)
    assert traffic_moved([NAN, 1.0], [0.0, 1.0]) == 0.0


def test_utilization_marks_load_without_capacity() -> None:
    u = utilization(np.array([0.5, 0.5, 0.0]), np.array([100.0, 0.0, 0.0]), 100.0)
    assert u.tolist() == [0.5, math.inf, 0.0]


# -- the latency term ---------------------------------------------------------------------


def test_latency_term_fills_fast_endpoints_first_below_the_knee() -> None:
    from balanceiq.policy.lp import objective, solve_critical

    cap = np.array([100.0, 100.0, 100.0])
    cost = np.array([1.0, 1.0, 1.0])
    latency = np.array([0.1, 0.6, np.nan])  # p95 / SLO; the third is unknown -> typical
    shares = np.full(3, 1 / 3)
    blind = solve_critical(shares, [0, 1, 2], cap, cost, 60.0, util_target=0.5)
    aware = solve_critical(shares, [0, 1, 2], cap, cost, 60.0, util_target=0.5, latency=latency, latency_weight=0.2)
    # Without the term every split under the knee costs the same; the tie-break spreads it.
    assert blind.shares == pytest.approx(np.full(3, 1 / 3), abs=1e-6)
    # The fast endpoint fills to the knee (0.5 * 100 / 60 of the traffic); the slow one gets
    # what is left after the typical (unknown) one also fills to the knee.
    assert aware.shares[0] == pytest.approx(50 / 60, abs=1e-6)
    assert aware.shares[1] < aware.shares[2]
    assert (
        objective(aware.shares, cap, cost, 60.0, util_target=0.5, latency=latency, latency_weight=0.2)
        <= objective(blind.shares, cap, cost, 60.0, util_target=0.5, latency=latency, latency_weight=0.2) + 1e-9
    )


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=12))
@settings(max_examples=200, deadline=None)
def test_latency_sanitation_is_finite_bounded_and_typical_for_unknowns(values: list[float]) -> None:
    from balanceiq.policy.lp import clean_latency

    lat = clean_latency(np.array(values))
    assert lat.shape == (len(values),) and np.all(np.isfinite(lat)) and np.all((lat >= 0) & (lat <= 4))
    known = [min(max(v, 0.0), 4.0) for v in values if math.isfinite(v)]
    unknown = [i for i, v in enumerate(values) if not math.isfinite(v)]
    for i in unknown:
        assert lat[i] == pytest.approx(float(np.median(known)) if known else 0.0)


def test_least_request_weights_give_back_what_active_requests_take() -> None:
    """Envoy's LEAST_REQUEST picks by weight / (active + 1): the weights make up for it."""
    from balanceiq.policy.lp import least_request_weights

    shares = np.array([0.5, 0.5])
    # 100 req/s; endpoint 0 holds each request 10 ms, endpoint 1 for 100 ms.
    w = least_request_weights(shares, [0.01, 0.1], 100.0, scale=10000)
    active = shares * 100 * np.array([0.01, 0.1])  # 0.5 and 5 requests in flight
    effective = w / (active + 1)
    np.testing.assert_allclose(effective / effective.sum(), shares, atol=1e-3)
    # Unknown times (NaN) or no demand: the plain weights.
    assert least_request_weights(shares, [np.nan, np.nan], 100.0).tolist() == shares_to_weights(shares).tolist()
    assert least_request_weights(shares, [0.01, 0.1], float("nan")).tolist() == shares_to_weights(shares).tolist()
    assert all(1 <= x <= 2**32 - 1 for x in least_request_weights([1.0, 0.0], [1e9, 1e9], 1e9))
