"""Guardrails, operator overrides and the rollback circuit breaker.

The properties re-derive what the guardrails promise (routable set, fixed shares, the
effective floor, ``forced``) independently of the module, then check the result against
them on random fleets, proposals, availability, overrides and configs.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balanceiq.config import GuardrailConfig
from balanceiq.control.args import WEIGHT_SCALE
from balanceiq.control.guardrails import Guardrails, GuardResult
from balanceiq.control.overrides import Override, OverrideTable
from balanceiq.control.rollback import RollbackMonitor
from balanceiq.exceptions import ControlError, GuardrailError
from balanceiq.policy.lp import UINT32_MAX, traffic_moved

NAN = math.nan
INF = math.inf
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_000_000.0


def addrs(n: int) -> list[str]:
    return [f"127.0.0.1:{8001 + i}" for i in range(n)]


def guard(min_share: float = 0.0, max_shift: float = 1.0) -> Guardrails:
    return Guardrails(GuardrailConfig(min_share=min_share, max_shift=max_shift))


def ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=bool)


# -- an independent model of what apply promises ---------------------------------------------


@dataclass
class Case:
    addresses: list[str]
    current: np.ndarray
    proposed: np.ndarray
    available: np.ndarray
    overrides: dict[str, Override]
    config: GuardrailConfig


@dataclass
class Expect:
    routable: np.ndarray
    drained: np.ndarray
    fixed: np.ndarray  # routable and pinned/set
    fixed_val: np.ndarray
    feasible: bool  # the fixed shares can be honoured exactly
    floor: float  # effective floor (when feasible)
    forced: np.ndarray  # current with the forced changes (when feasible)
    cur: np.ndarray  # sanitised current


def clean(v: np.ndarray, base: np.ndarray) -> np.ndarray:
    s = np.where(np.isfinite(v) & (v >= 0), v, 0.0)
    if s.max(initial=0.0) <= 0:
        return base / base.sum()
    s = s / s.max()
    return s / s.sum()


def expect(case: Case) -> Expect:
    n = len(case.addresses)
    ovs = [case.overrides.get(a) for a in case.addresses]
    drained = np.array([o is not None and o.action == "drain" for o in ovs])
    fixed_all = np.array([o is not None and o.fixed for o in ovs])
    fixed_val = np.array([float(o.share) if o is not None and o.fixed else 0.0 for o in ovs])  # type: ignore[arg-type]
    routable = case.available & ~drained
    fixed = fixed_all & routable
    free_mask = routable & ~fixed
    fsum = float(fixed_val[fixed].sum())
    feasible = bool(routable.any()) and fsum <= 1 + 1e-9 and (bool(free_mask.any()) or abs(fsum - 1) <= 1e-9)
    base = routable if routable.any() else np.ones(n, dtype=bool)
    cur = clean(case.current, base)
    free = max(0.0, 1.0 - fsum)
    m = int(free_mask.sum())
    floor = case.config.min_share
    if m and m * floor > free + 1e-9:
        floor = free / (2 * m)
    forced = np.where(routable, cur, 0.0)
    forced[fixed] = fixed_val[fixed]
    c_free = float(forced[free_mask].sum())
    if m and c_free > 0:
        forced[free_mask] = forced[free_mask] / c_free * free
    elif m:
        forced[free_mask] = np.inf  # no current split: the target's is used, which respects the floor
    return Expect(routable, drained, fixed, fixed_val, feasible, floor, forced, cur)


values = st.one_of(
    st.floats(0.0, 10.0),
    st.just(0.0),
    st.sampled_from([NAN, INF, -INF, -1.0, 1e300]),
)


@st.composite
def cases(draw: st.DrawFn, *, max_n: int = 40, dirty: bool = True) -> Case:
    n = draw(st.integers(1, max_n))
    a = addrs(n)
    elems = values if dirty else st.floats(0.0, 10.0)
    current = np.array(draw(st.lists(elems, min_size=n, max_size=n)), dtype=np.float64)
    proposed = np.array(draw(st.lists(elems, min_size=n, max_size=n)), dtype=np.float64)
    p_up = draw(st.sampled_from([1.0, 0.9, 0.5, 0.0]))
    available = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n))) | (p_up == 1.0)
    if p_up == 0.9:
        available = np.array([draw(st.integers(0, 9)) > 0 for _ in range(n)])
    overrides: dict[str, Override] = {}
    # Mostly fixed shares that fit (each <= 1/n); sometimes any size, to reach the scaling.
    big = draw(st.booleans()) and draw(st.booleans())
    top = 1.0 if big else 1.0 / n
    for addr in a:
        kind = draw(st.sampled_from(["none", "none", "none", "drain", "pin", "set"]))
        if kind == "drain":
            overrides[addr] = Override(addr, "drain", None, None, created_at=T0)
        elif kind == "pin":
            overrides[addr] = Override(addr, "pin", draw(st.floats(0.0, top)), None, created_at=T0)
        elif kind == "set":
            w = draw(st.integers(1, max(1, int(WEIGHT_SCALE * top))))
            overrides[addr] = Override(addr, "set", w / WEIGHT_SCALE, None, created_at=T0)
    config = GuardrailConfig(
        min_share=draw(st.one_of(st.just(0.0), st.just(0.01), st.floats(0.0, 0.49))),
        max_shift=draw(st.one_of(st.just(1.0), st.just(0.25), st.just(0.05), st.floats(0.001, 1.0))),
    )
    return Case(a, current, proposed, available, overrides, config)


def run(case: Case) -> GuardResult:
    return Guardrails(case.config).apply(case.addresses, case.current, case.proposed, case.available, case.overrides)


def check_invariants(case: Case, res: GuardResult) -> Expect:
    n = len(case.addresses)
    e = expect(case)
    w = res.weights
    assert w.shape == (n,) and w.dtype == np.int64
    assert int(w.min()) >= 1 and int(w.max()) <= UINT32_MAX
    s = res.shares
    assert s.shape == (n,) and np.all(np.isfinite(s)) and np.all(s >= 0)
    assert abs(float(s.sum()) - 1.0) <= 1e-9
    assert res.limited == any(x.startswith("max_shift:") for x in res.notes)
    if not e.routable.any():
        assert any(x.startswith("fallback:") for x in res.notes)
        assert not res.limited
        return e
    assert abs(float(s[e.routable].sum()) - 1.0) <= 1e-9
    assert np.all(s[~e.routable] == 0.0)  # drained / unavailable: exactly 0
    assert res.health == {a: ("DRAINING" if e.drained[i] else "HEALTHY") for i, a in enumerate(case.addresses)}
    if e.feasible:
        assert np.all(s[e.fixed] == e.fixed_val[e.fixed])  # exact, not approximately
        free = e.routable & ~e.fixed
        low = np.minimum(e.floor, e.forced[free])
        assert np.all(s[free] >= low - 1e-9)
        below = s[free] < e.floor - 1e-9
        if below.any():
            # Only an endpoint ramping up from below the floor, under the shift limit.
            assert res.limited
            assert np.all(e.forced[free][below] < e.floor)
        if res.limited:
            assert traffic_moved(e.forced, s) == pytest.approx(case.config.max_shift, abs=1e-9)
        if traffic_moved(e.cur, e.forced) <= 1e-12:  # nothing forced: the limit binds the whole move
            assert res.moved <= case.config.max_shift + 1e-9
    assert res.moved == pytest.approx(traffic_moved(e.cur, s), abs=1e-12)
    return e


# -- properties ----------------------------------------------------------------------------------


@FAST
@given(cases())
def test_apply_invariants(case: Case) -> None:
    check_invariants(case, run(case))


@FAST
@given(cases(), st.data())
def test_second_decision_with_nothing_forced_moves_at_most_max_shift(case: Case, data: st.DataObject) -> None:
    # Steady state: availability and overrides unchanged since the last decision, whose
    # shares are now current. Then every move is the policy's, and the limit binds it.
    g = Guardrails(case.config)
    first = g.apply(case.addresses, case.current, case.proposed, case.available, case.overrides)
    n = len(case.addresses)
    proposal = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=np.float64)
    second = g.apply(case.addresses, first.shares, proposal, case.available, case.overrides)
    check_invariants(Case(case.addresses, first.shares, proposal, case.available, case.overrides, case.config), second)
    assert second.moved <= case.config.max_shift + 1e-9
    assert g.state()["decisions"] == 2


@FAST
@given(cases(max_n=12, dirty=False))
def test_repeated_decisions_converge_to_the_target(case: Case) -> None:
    # max_shift slows the policy down but never stalls it: the same proposal is reached.
    g = Guardrails(case.config)
    unlimited = Guardrails(case.config.model_copy(update={"max_shift": 1.0}))
    target = unlimited.apply(case.addresses, case.current, case.proposed, case.available, case.overrides).shares
    cur = case.current
    for _ in range(math.ceil(1.0 / case.config.max_shift) + 2):
        res = g.apply(case.addresses, cur, case.proposed, case.available, case.overrides)
        cur = res.shares
    np.testing.assert_allclose(cur, target, atol=1e-9)


# -- concrete guardrail behaviour ----------------------------------------------------------------


def test_max_shift_interpolates_towards_the_target() -> None:
    a = addrs(2)
    res = guard(min_share=0.0, max_shift=0.25).apply(a, np.array([0.5, 0.5]), np.array([1.0, 0.0]), ones(2), {})
    # The proposal moves 0.5; alpha = 0.25 / 0.5 = 0.5 of the way: [0.75, 0.25].
    np.testing.assert_allclose(res.shares, [0.75, 0.25], atol=1e-12)
    assert res.weights.tolist() == [7500, 2500]
    assert res.limited and res.moved == pytest.approx(0.25)
    assert "max_shift: proposal moved 0.5 of traffic, limited to 0.25" in res.notes


def test_max_shift_counts_the_floor_in_the_target() -> None:
    a = addrs(2)
    res = guard(min_share=0.01, max_shift=0.25).apply(a, np.array([0.5, 0.5]), np.array([1.0, 0.0]), ones(2), {})
    # Target [0.99, 0.01] moves 0.49; alpha = 0.25 / 0.49.
    np.testing.assert_allclose(res.shares, [0.75, 0.25], atol=1e-12)
    assert res.notes == (
        "min_share: raised 1 endpoint(s) to the floor 0.01",
        "max_shift: proposal moved 0.49 of traffic, limited to 0.25",
    )


def test_no_limit_when_the_move_is_small() -> None:
    a = addrs(2)
    res = guard(max_shift=0.25).apply(a, np.array([0.5, 0.5]), np.array([0.6, 0.4]), ones(2), {})
    np.testing.assert_allclose(res.shares, [0.6, 0.4])
    assert not res.limited and res.notes == ()


def test_drain_is_exempt_from_max_shift() -> None:
    a = addrs(3)
    table = OverrideTable(a)
    table.drain(a[0], reason="maintenance", now=T0)
    res = guard(max_shift=0.1).apply(a, np.array([0.6, 0.2, 0.2]), np.full(3, 1 / 3), ones(3), table.active(now=T0))
    np.testing.assert_allclose(res.shares, [0.0, 0.5, 0.5])
    assert res.shares[0] == 0.0
    assert res.moved == pytest.approx(0.6) and not res.limited
    assert res.health == {a[0]: "DRAINING", a[1]: "HEALTHY", a[2]: "HEALTHY"}
    assert res.weights[0] == 1 and res.weights.sum() == WEIGHT_SCALE
    assert any(x.startswith(f"drained: moved 0.6 of traffic off {a[0]}") for x in res.notes)


def test_unavailable_endpoint_is_zeroed_at_once_but_stays_healthy_for_envoy() -> None:
    a = addrs(3)
    res = guard(max_shift=0.05).apply(
        a, np.array([0.5, 0.25, 0.25]), np.array([0.5, 0.25, 0.25]), np.array([False, True, True]), {}
    )
    np.testing.assert_allclose(res.shares, [0.0, 0.5, 0.5])
    assert res.health[a[0]] == "HEALTHY"  # Envoy's own health checks handle it
    assert any(x.startswith("unavailable:") for x in res.notes)


def test_endpoint_coming_back_ramps_up_to_the_floor() -> None:
    a = addrs(3)
    g = guard(min_share=0.2, max_shift=0.05)
    # The target is [0.2, 0.4, 0.4] (0.2 from the floor); only 0.05 may move per decision.
    res = g.apply(a, np.array([0.0, 0.5, 0.5]), np.array([0.0, 0.5, 0.5]), ones(3), {})
    np.testing.assert_allclose(res.shares, [0.05, 0.475, 0.475])
    assert res.limited
    shares = res.shares
    for _ in range(3):
        shares = g.apply(a, shares, np.array([0.0, 0.5, 0.5]), ones(3), {}).shares
    np.testing.assert_allclose(shares, [0.2, 0.4, 0.4], atol=1e-12)


def test_floor_is_paid_in_proportion_to_excess() -> None:
    a = addrs(3)
    res = guard(min_share=0.1).apply(a, np.full(3, 1 / 3), np.array([0.7, 0.3, 0.0]), ones(3), {})
    # Deficit 0.1; excesses over the floor 0.6 and 0.2 pay 3/4 and 1/4 of it.
    np.testing.assert_allclose(res.shares, [0.625, 0.275, 0.1], atol=1e-12)


def test_floor_is_lowered_when_it_does_not_fit() -> None:
    a = addrs(4)
    table = OverrideTable(a)
    table.set_weight(a[0], 9900, now=T0)
    res = guard(min_share=0.01).apply(
        a, np.array([0.99, 0.01, 0.0, 0.0]), np.array([0, 1, 0, 0.0]), ones(4), table.active(now=T0)
    )
    # Three floors of 0.01 do not fit in 0.01 free: each becomes 0.01 / 6.
    assert res.shares[0] == 0.99
    assert res.shares[2] == pytest.approx(0.01 / 6) and res.shares[3] == pytest.approx(0.01 / 6)
    assert any("do not fit in the free share 0.01" in x for x in res.notes)


def test_fixed_shares_and_the_rest_in_proportion() -> None:
    a = addrs(4)
    table = OverrideTable(a)
    table.set_weight(a[0], 3000, now=T0)
    table.pin(a[1], 0.2, now=T0)
    res = guard().apply(a, np.full(4, 0.25), np.array([0.9, 0.0, 3.0, 1.0]), ones(4), table.active(now=T0))
    assert res.shares[0] == 0.3 and res.shares[1] == 0.2
    np.testing.assert_allclose(res.shares[2:], [0.375, 0.125])
    assert res.weights.tolist() == [3000, 2000, 3750, 1250]


def test_fixed_shares_that_cannot_be_honoured_are_scaled_with_a_note() -> None:
    a = addrs(3)
    over = {
        a[0]: Override(a[0], "set", 0.7, None),
        a[1]: Override(a[1], "pin", 0.6, None),
    }
    res = guard().apply(a, np.full(3, 1 / 3), np.full(3, 1 / 3), ones(3), over)
    np.testing.assert_allclose(res.shares, [0.7 / 1.3, 0.6 / 1.3, 0.0])
    assert any("sum to 1.3 > 1" in x for x in res.notes)
    # Every routable endpoint fixed, summing to 0.5: scaled up to 1.
    res = guard().apply(
        a,
        np.full(3, 1 / 3),
        np.full(3, 1 / 3),
        np.array([True, True, False]),
        {a[0]: Override(a[0], "set", 0.3, None), a[1]: Override(a[1], "set", 0.2, None)},
    )
    np.testing.assert_allclose(res.shares, [0.6, 0.4, 0.0])
    assert any("every routable endpoint is pinned/set" in x for x in res.notes)


def test_pin_on_an_unavailable_endpoint_is_released() -> None:
    a = addrs(3)
    res = guard().apply(
        a, np.full(3, 1 / 3), np.full(3, 1 / 3), np.array([False, True, True]), {a[0]: Override(a[0], "pin", 0.5, None)}
    )
    np.testing.assert_allclose(res.shares, [0.0, 0.5, 0.5])
    assert any(x.startswith(f"fixed: {a[0]} not routable") for x in res.notes)


def test_sanitises_garbage_inputs() -> None:
    a = addrs(3)
    res = guard().apply(a, np.array([NAN, INF, -1.0]), np.array([NAN, 2.0, -INF]), ones(3), {})
    np.testing.assert_allclose(res.shares, [0.0, 1.0, 0.0])
    assert res.moved == pytest.approx(2 / 3)  # from the equal split the garbage became
    res = guard().apply(a, np.zeros(3), np.full(3, NAN), ones(3), {})
    np.testing.assert_allclose(res.shares, np.full(3, 1 / 3))


def test_fallback_when_every_available_endpoint_is_drained() -> None:
    a = addrs(3)
    over = {a[0]: Override(a[0], "drain", None, None)}
    res = guard().apply(a, np.full(3, 1 / 3), np.full(3, 1 / 3), np.array([True, False, False]), over)
    np.testing.assert_allclose(res.shares, [1.0, 0.0, 0.0])
    assert res.health[a[0]] == "HEALTHY"  # we route to it, so Envoy must not drop it
    assert any(x.startswith("fallback: every available endpoint is drained") for x in res.notes)


def test_fallback_when_nothing_is_available() -> None:
    a = addrs(3)
    over = {a[0]: Override(a[0], "drain", None, None)}
    res = guard(max_shift=0.01).apply(a, np.full(3, 1 / 3), np.full(3, 1 / 3), np.zeros(3, dtype=bool), over)
    np.testing.assert_allclose(res.shares, [0.0, 0.5, 0.5])
    assert res.health[a[0]] == "DRAINING"
    assert res.weights.min() >= 1 and res.weights.sum() == WEIGHT_SCALE
    assert any(x.startswith("fallback: no endpoint available") for x in res.notes)


def test_apply_rejects_structural_errors() -> None:
    a = addrs(3)
    g = guard()
    with pytest.raises(GuardrailError, match="proposed has 2 entries, expected 3"):
        g.apply(a, np.full(3, 1 / 3), np.ones(2), ones(3), {})
    with pytest.raises(GuardrailError, match="current has 4 entries"):
        g.apply(a, np.ones(4), np.ones(3), ones(3), {})
    with pytest.raises(GuardrailError, match="available has 2 entries"):
        g.apply(a, np.ones(3), np.ones(3), ones(2), {})
    with pytest.raises(GuardrailError, match="empty"):
        g.apply([], np.ones(0), np.ones(0), ones(0), {})


def test_override_for_unknown_endpoint_is_ignored_with_a_note() -> None:
    a = addrs(2)
    stray = {"10.9.9.9:1": Override("10.9.9.9:1", "drain", None, None)}
    res = guard().apply(a, np.full(2, 0.5), np.full(2, 0.5), ones(2), stray)
    np.testing.assert_allclose(res.shares, [0.5, 0.5])
    assert res.notes == ("overrides: ignored for unknown endpoint(s) 10.9.9.9:1",)


def test_config_is_replaceable_at_run_time_and_state_counts() -> None:
    a = addrs(2)
    g = guard(max_shift=0.1)
    assert g.apply(a, np.full(2, 0.5), np.array([1.0, 0.0]), ones(2), {}).limited
    g.config = GuardrailConfig(min_share=0.0, max_shift=1.0)
    res = g.apply(a, np.full(2, 0.5), np.array([1.0, 0.0]), ones(2), {})
    assert not res.limited
    np.testing.assert_allclose(res.shares, [1.0, 0.0])
    st_ = g.state()
    assert st_["max_shift"] == 1.0 and st_["min_share"] == 0.0 and st_["baseline"] == "cost_aware"
    assert st_["decisions"] == 2 and st_["limited_count"] == 1 and st_["floor_count"] == 0


# -- override table ------------------------------------------------------------------------------


def test_override_table_round_trip_and_json() -> None:
    a = addrs(3)
    t = OverrideTable(a)
    pin = t.pin(a[0], 0.33333, ttl_s=60, reason="investigating", now=T0)
    assert pin == Override(a[0], "pin", 0.33333, T0 + 60, "investigating", T0)
    t.set_weight(a[1], 2500, now=T0)
    assert t.to_json(now=T0) == [
        {
            "address": a[0],
            "action": "pin",
            "share": 0.33333,
            "weight": 3333,
            "expires_at": T0 + 60,
            "reason": "investigating",
            "created_at": T0,
        },
        {
            "address": a[1],
            "action": "set",
            "share": 0.25,
            "weight": 2500,
            "expires_at": None,
            "reason": "",
            "created_at": T0,
        },
    ]
    assert t.drain(a[1], now=T0).action == "drain"  # replaces the set
    assert t.active(now=T0)[a[1]].share is None
    assert t.clear(a[1]) is True and t.clear(a[1]) is False
    assert set(t.active(now=T0)) == {a[0]}


def test_override_expiry_via_now() -> None:
    a = addrs(2)
    t = OverrideTable(a)
    t.drain(a[0], ttl_s=30, now=T0)
    assert a[0] in t.active(now=T0 + 29.9)
    assert t.active(now=T0 + 30) == {}
    assert t.clear(a[0]) is False  # dropped, not merely hidden
    # An expired drain no longer counts toward "last routable endpoint".
    t.drain(a[0], ttl_s=10, now=T0)
    t.drain(a[1], now=T0 + 10)
    assert set(t.active(now=T0 + 10)) == {a[1]}


@pytest.mark.parametrize("op", ["pin", "drain", "set", "clear"])
def test_unknown_address_is_rejected(op: str) -> None:
    t = OverrideTable(addrs(2))
    call = {
        "pin": lambda: t.pin("10.0.0.9:80", 0.5),
        "drain": lambda: t.drain("10.0.0.9:80"),
        "set": lambda: t.set_weight("10.0.0.9:80", 100),
        "clear": lambda: t.clear("10.0.0.9:80"),
    }[op]
    with pytest.raises(GuardrailError, match=r"unknown endpoint '10\.0\.0\.9:80'"):
        call()


@pytest.mark.parametrize("weight", [0, 10001, -5, 1.5, True, "100"])
def test_weight_out_of_range_is_rejected(weight: object) -> None:
    a = addrs(2)
    t = OverrideTable(a)
    with pytest.raises(GuardrailError, match=rf"weight for {a[0]} must be"):
        t.set_weight(a[0], weight)  # type: ignore[arg-type]
    assert t.active() == {}


def test_weight_bounds_are_inclusive() -> None:
    a = addrs(2)
    t = OverrideTable(a)
    assert t.set_weight(a[0], 1).share == 1e-4
    assert t.set_weight(a[0], np.int64(10000)).share == 1.0


@pytest.mark.parametrize("ttl", [0, -1.0, NAN, INF, "x"])
def test_bad_ttl_is_rejected(ttl: object) -> None:
    a = addrs(2)
    t = OverrideTable(a)
    with pytest.raises(GuardrailError, match=rf"ttl_s for {a[0]}"):
        t.drain(a[0], ttl_s=ttl)  # type: ignore[arg-type]


def test_draining_the_last_routable_endpoint_is_rejected() -> None:
    a = addrs(2)
    t = OverrideTable(a)
    t.drain(a[0])
    t.drain(a[0])  # re-draining the same endpoint is fine
    with pytest.raises(GuardrailError) as info:
        t.drain(a[1])
    assert str(info.value) == f"cannot drain {a[1]}: it is the last routable endpoint"
    assert isinstance(info.value, ControlError)
    with pytest.raises(GuardrailError, match="last routable endpoint"):
        OverrideTable(a[:1]).drain(a[0])


def test_fixed_shares_above_one_are_rejected() -> None:
    a = addrs(3)
    t = OverrideTable(a)
    t.set_weight(a[0], 6000)
    with pytest.raises(GuardrailError, match=rf"cannot set {a[1]} to weight 5000: .* sum to 1.1 > 1"):
        t.set_weight(a[1], 5000)
    with pytest.raises(GuardrailError, match=rf"cannot pin {a[1]} at share 0.5"):
        t.pin(a[1], 0.5)
    t.set_weight(a[0], 5000)  # replacing its own share is not double-counted
    t.set_weight(a[1], 5000)
    assert {k: v.share for k, v in t.active().items()} == {a[0]: 0.5, a[1]: 0.5}


@pytest.mark.parametrize("share", [-0.1, 1.5, NAN])
def test_pin_share_out_of_range_is_rejected(share: float) -> None:
    a = addrs(2)
    with pytest.raises(GuardrailError, match=rf"current_share of {a[0]}|cannot pin {a[0]}"):
        OverrideTable(a).pin(a[0], share)


def test_override_validates_itself_and_table_rejects_duplicates() -> None:
    with pytest.raises(GuardrailError, match="must be one of pin, drain, set"):
        Override("a:1", "block", None, None)  # type: ignore[arg-type]
    with pytest.raises(GuardrailError, match="drain override for a:1 takes no share"):
        Override("a:1", "drain", 0.5, None)
    with pytest.raises(GuardrailError, match="share of a:1"):
        Override("a:1", "set", None, None)
    with pytest.raises(GuardrailError, match="duplicate endpoint address"):
        OverrideTable(["a:1", "b:1", "a:1"])


def test_override_table_is_safe_across_threads() -> None:
    a = addrs(8)
    t = OverrideTable(a)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for k in range(200):
                t.set_weight(a[i], 1 + k % 100, now=T0)
                t.clear(a[i])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(a))]
    for th in threads:
        th.start()
    for _ in range(200):
        total = sum(o.share or 0.0 for o in t.active(now=T0).values())
        assert total <= 1.0
    for th in threads:
        th.join()
    assert errors == [] and t.active(now=T0) == {}


def test_table_feeds_apply() -> None:
    a = addrs(3)
    t = OverrideTable(a)
    t.pin(a[2], 0.5, ttl_s=10, now=T0)
    g = guard()
    res = g.apply(a, np.full(3, 1 / 3), np.array([1.0, 1.0, 0.0]), ones(3), t.active(now=T0 + 1))
    np.testing.assert_allclose(res.shares, [0.25, 0.25, 0.5])
    res = g.apply(a, res.shares, np.array([1.0, 1.0, 0.0]), ones(3), t.active(now=T0 + 10))
    np.testing.assert_allclose(res.shares, [0.5, 0.5, 0.0])


# -- rollback monitor ------------------------------------------------------------------------


def test_rollback_full_cycle() -> None:
    """Closed -> open after M worse intervals -> closed after P intervals holding its own."""
    m = RollbackMonitor(after=3, margin=0.1, probation_after=2)
    assert m.mode == "policy"
    # Within the margin is not worse; a good interval resets the streak.
    assert m.record(-1.05, -1.0, now=1.0) == "policy"
    assert m.record(-1.5, -1.0, now=2.0) == "policy" and m.worse_streak == 1
    assert m.record(-0.5, -1.0, now=3.0) == "policy" and m.worse_streak == 0
    for t in (4.0, 5.0):
        assert m.record(-1.5, -1.0, now=t) == "policy"
    assert m.record(-1.5, -1.0, now=6.0) == "baseline"
    st = m.state()
    assert st["rollbacks"] == 1 and st["since"] == 6.0 and "3 consecutive" in st["reason"]
    assert st["transitions"][-1] == {"at": 6.0, "from": "policy", "to": "baseline", "reason": st["reason"]}
    # Open: still worse keeps the baseline; holding its own twice in a row recovers.
    assert m.record(-1.5, -1.0, now=7.0) == "baseline"
    assert m.record(-1.0, -1.0, now=8.0) == "baseline" and m.good_streak == 1
    assert m.record(-1.6, -1.0, now=9.0) == "baseline" and m.good_streak == 0
    assert m.record(-0.9, -1.0, now=10.0) == "baseline"
    assert m.record(-0.9, -1.0, now=11.0) == "policy"
    st = m.state()
    assert st["recoveries"] == 1 and "recovered" in st["reason"] and st["last_policy_score"] == -0.9


def test_non_finite_scores() -> None:
    m = RollbackMonitor(after=2, margin=0.0, probation_after=1)
    # A policy score that is not finite counts as worse.
    m.record(float("nan"), -1.0)
    assert m.record(float("inf"), -1.0) == "baseline"
    # A baseline score that is not finite is no evidence either way.
    assert m.record(-0.5, float("nan")) == "baseline" and m.good_streak == 0
    assert m.record(-0.5, -1.0) == "policy"
    assert m.record("junk", None) == "policy"  # type: ignore[arg-type]


def test_reconfigure() -> None:
    m = RollbackMonitor(after=5, margin=0.5, probation_after=10)
    m.record(-2.0, -1.0)
    m.reconfigure(after=2, margin=0.5, probation_after=1)
    assert m.record(-2.0, -1.0) == "baseline"
    with pytest.raises(GuardrailError, match="rollback_margin"):
        m.reconfigure(after=2, margin=-1, probation_after=1)
    assert m.state()["margin"] == 0.5 and m.state()["after"] == 2


def test_rollback_monitor_rejects_bad_arguments() -> None:
    with pytest.raises(GuardrailError, match="rollback_margin"):
        RollbackMonitor(after=1, margin=-0.1, probation_after=1)
    with pytest.raises(GuardrailError, match="rollback_after"):
        RollbackMonitor(after=0, margin=0.1, probation_after=1)
    with pytest.raises(GuardrailError, match="probation_after"):
        RollbackMonitor(after=1, margin=0.1, probation_after=0)


def test_transitions_keep_the_last_twenty() -> None:
    m = RollbackMonitor(after=1, margin=0.0, probation_after=1)
    for i in range(30):
        m.record(-2.0, -1.0, now=float(2 * i))
        m.record(-0.5, -1.0, now=float(2 * i + 1))
    st = m.state()
    assert st["rollbacks"] == 30 and st["recoveries"] == 30
    assert len(st["transitions"]) == 20 and st["transitions"][-1]["at"] == 59.0


# -- SLO breachers ------------------------------------------------------------------------


def _breach_guard(max_shift: float = 0.1) -> Guardrails:
    return Guardrails(GuardrailConfig(min_share=0.05, breach_min_share=0.001, max_shift=max_shift))


def test_a_breacher_floors_at_breach_min_share_and_leaves_at_once() -> None:
    addrs = ["a", "b", "c", "d"]
    cur = np.array([0.25, 0.25, 0.25, 0.25])
    prop = np.array([0.0, 0.5, 0.5, 0.0])  # the LP takes everything off a (breaching) and d
    avail = np.ones(4, dtype=bool)
    plain = _breach_guard().apply(addrs, cur, prop, avail, {})
    assert plain.limited and plain.moved == pytest.approx(0.1, abs=1e-9)
    r = _breach_guard().apply(addrs, cur, prop, avail, {}, breaching=np.array([True, False, False, False]))
    # a drops to its floor at once; only the move off d (not breaching) is ramped.
    assert r.shares[0] == pytest.approx(0.001, abs=1e-9)
    # Floors: target a=0.001, d=0.05, b=c=0.4745. a's 0.249 goes to b and c at once; what
    # is left (0.1 off d onto b and c each... 0.2 in all) is halved by max_shift=0.1.
    assert r.shares[3] == pytest.approx(0.15, abs=1e-9)
    assert any(n.startswith("breaching:") for n in r.notes)
    assert r.shares.sum() == pytest.approx(1.0) and np.all(r.weights >= 1)


def test_a_breacher_never_gains_traffic_whoever_proposes_it() -> None:
    # Breacher a loses 0.3 at once; breacher b may not take 0.2 more (a rollback baseline
    # knows nothing of breaches), so c, the healthy one, gets it all, ramped by max_shift.
    addrs = ["a", "b", "c"]
    cur = np.array([0.5, 0.2, 0.3])
    prop = np.array([0.2, 0.4, 0.4])
    r = Guardrails(GuardrailConfig(min_share=0.0, breach_min_share=0.0, max_shift=1.0)).apply(
        addrs, cur, prop, np.ones(3, dtype=bool), {}, breaching=np.array([True, True, False])
    )
    assert r.shares == pytest.approx([0.2, 0.2, 0.6], abs=1e-9)
    assert any("kept from gaining" in n for n in r.notes)


def test_breaching_mask_must_match_the_endpoints() -> None:
    with pytest.raises(GuardrailError, match="breaching"):
        _breach_guard().apply(
            ["a", "b"],
            np.array([0.5, 0.5]),
            np.array([0.5, 0.5]),
            np.ones(2, dtype=bool),
            {},
            breaching=np.array([True]),
        )
