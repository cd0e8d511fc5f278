"""Baseline policies: one interface, valid decisions, and no crash on unmeasured data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from policy_cases import NAN, assert_valid, context, fleet, nothing_measured  # tests/ is on sys.path

from balanceiq.policy.baselines import (
    BASELINES,
    CostAwareStatic,
    EqualWeights,
    InverseLatencyEwma,
    LeastRequest,
    Policy,
    StaticWeights,
    estimate_capacity,
    hot_cold_critical,
    make_policy,
)
from balanceiq.telemetry.observation import EndpointObservation, Observation


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_returns_a_valid_decision(name: str) -> None:
    policy = make_policy(name)
    assert isinstance(policy, Policy)
    assert policy.name == name
    policy.reset()
    for _ in range(3):  # stateful policies must stay valid across steps
        assert_valid(policy.decide(fleet(), context()), 4)


@pytest.mark.parametrize("name", sorted(set(BASELINES) - {"equal", "static"}))
def test_controller_baselines_drain_unhealthy_endpoints(name: str) -> None:
    obs = fleet(healthy=(True, False, True, None))
    d = make_policy(name).decide(obs, context())
    assert_valid(d, 4, available=np.array([True, False, True, True]))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_survive_a_fleet_with_nothing_measured(name: str) -> None:
    obs, ctx = nothing_measured()
    assert_valid(make_policy(name).decide(obs, ctx), 3)


def test_equal_and_static_are_what_envoy_does_alone() -> None:
    d = EqualWeights().decide(fleet(), context())
    assert d.weights.tolist() == [1, 1, 1, 1] and d.critical == ()
    d = StaticWeights().decide(fleet(), context())
    assert d.weights.tolist() == [3, 2, 1, 1]
    assert d.shares == pytest.approx([3 / 7, 2 / 7, 1 / 7, 1 / 7])


def test_cost_aware_prefers_cheap_capacity() -> None:
    d = CostAwareStatic().decide(fleet(), context())
    # hints 1000, (median 600), 200, (600); costs 0.2, 0.5, 1.0, (median 0.5)
    score = np.array([1000 / 0.2, 600 / 0.5, 200 / 1.0, 600 / 0.5])
    assert d.shares == pytest.approx(score / score.sum())


def test_inverse_latency_tracks_an_ewma_and_keeps_unmeasured_shares() -> None:
    policy = InverseLatencyEwma()
    d = policy.decide(fleet(), context())
    # Endpoint 3 is unmeasured: it keeps 0.1; the rest split 0.9 by 1/p95.
    inv = np.array([1 / 20, 1 / 40, 1 / 80])
    assert d.shares[3] == pytest.approx(0.1)
    assert d.shares[:3] == pytest.approx(0.9 * inv / inv.sum())
    d = policy.decide(fleet(p95=(120, 40, 80, NAN)), context())
    assert d.info["ewma_p95_ms"]["10.0.0.0:80"] == pytest.approx(0.3 * 120 + 0.7 * 20)
    policy.reset()
    assert policy.decide(fleet(p95=(NAN, NAN, NAN, NAN)), context()).shares == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_inverse_latency_survives_nan_and_zero_latency() -> None:
    policy = InverseLatencyEwma()
    for p95 in ((NAN, NAN, NAN, NAN), (0.0, NAN, 5.0, NAN), (NAN, math.inf, -1.0, NAN)):
        assert_valid(policy.decide(fleet(p95=p95), context()), 4)


def test_least_request_favours_idle_capacity() -> None:
    d = LeastRequest().decide(fleet(), context())
    score = np.array([1000 / 4, 600 / 6, 200 / 10, 600 / 1])
    assert d.shares == pytest.approx(score / score.sum())


def test_estimate_capacity_prefers_hints_then_measurement_then_median() -> None:
    cap = estimate_capacity(fleet(), context())
    # 0: hint; 1: 200 rps at saturation 0.5; 2: hint; 3: no hint, no saturation -> median.
    assert cap.tolist() == pytest.approx([1000.0, 400.0, 200.0, 400.0])
    nothing = context(capacity_hint=np.full(4, NAN))
    obs = Observation("c", tuple(EndpointObservation(f"h{i}:1") for i in range(4)), "none")
    assert np.isnan(estimate_capacity(obs, nothing)).all()
    # An idle endpoint's saturation is floored: 10 rps at 0.01 is not 1000 rps of capacity.
    idle = Observation("c", (EndpointObservation("h:1", rps=10.0, saturation=0.01),), "simulator")
    one = context(shares=np.ones(1), capacity_hint=np.full(1, NAN), static_weights=np.ones(1))
    assert estimate_capacity(idle, one).tolist() == [200.0]


def test_hot_cold_names_the_hottest_then_the_coldest() -> None:
    # Utilisation: 300/1000, 200/400, 100/200, 0/400 -> hottest 1 (ties: first), coldest 3.
    assert hot_cold_critical(fleet(), context()) == [1, 3]


def test_make_policy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'nope'.*cost_aware.*least_request"):
        make_policy("nope")
    with pytest.raises(ValueError, match="unknown policy 'topk'"):
        make_policy("topk")  # the benchmark's, in the lab
    assert make_policy("static") is not make_policy("static")
