"""The benchmark's baselines: valid decisions, Top-K and the oracle, and every name known."""

from __future__ import annotations

import numpy as np
import pytest
from policy_cases import assert_valid, context, fleet, nothing_measured  # tests/ is on sys.path

from balanceiq.policy.baselines import BASELINES, Policy
from balanceiq_lab.bench.baselines import BENCH_BASELINES, Oracle, TopKHeuristic, make_policy

LAB_ONLY = sorted(set(BENCH_BASELINES) - set(BASELINES))


@pytest.mark.parametrize("name", LAB_ONLY)
def test_every_bench_baseline_returns_a_valid_decision(name: str) -> None:
    policy = make_policy(name)
    assert isinstance(policy, Policy)
    assert policy.name == name
    policy.reset()
    for _ in range(3):
        assert_valid(policy.decide(fleet(), context()), 4)
    assert_valid(
        make_policy(name).decide(fleet(healthy=(True, False, True, None)), context()),
        4,
        np.array([1, 0, 1, 1], dtype=bool),
    )


@pytest.mark.parametrize("name", LAB_ONLY)
def test_bench_baselines_survive_a_fleet_with_nothing_measured(name: str) -> None:
    obs, ctx = nothing_measured()
    assert_valid(make_policy(name).decide(obs, ctx), 3)


def test_topk_picks_the_most_utilised_and_runs_the_lp() -> None:
    d = TopKHeuristic().decide(fleet(), context())
    # Utilisation: 300/1000, 200/400, 100/200, 0/400 -> endpoints 1 and 2 are critical.
    assert d.critical == (1, 2)
    assert d.info["lp_status"] == "optimal"
    assert d.shares[[0, 3]] == pytest.approx([0.4, 0.1], abs=0)


def test_oracle_uses_true_capacity_and_needs_it() -> None:
    d = Oracle().decide(fleet(), context())
    assert d.critical == (0, 1, 2, 3)
    assert d.info["lp_status"] == "optimal"
    with pytest.raises(ValueError, match="true_capacity"):
        Oracle().decide(fleet(), context(true_capacity=None))


def test_context_must_match_the_observation() -> None:
    with pytest.raises(ValueError, match="capacity_hint"):
        TopKHeuristic().decide(fleet(), context(capacity_hint=np.ones(3)))


def test_make_policy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'nope'.*cost_aware.*oracle.*topk"):
        make_policy("nope")
    assert make_policy("topk") is not make_policy("topk")
