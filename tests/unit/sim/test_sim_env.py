"""The gymnasium environment: API conformance and CFR-RL semantics."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from policy_cases import window_breaching  # tests/ is on sys.path

from balanceiq.sim.env import FleetEnv


def test_passes_gymnasium_env_checker() -> None:
    check_env(FleetEnv({"scenarios": ["degrade"], "n_max": 16}), skip_render_check=True)


def test_only_critical_endpoints_move() -> None:
    env = FleetEnv({"scenarios": ["heterogeneous"], "n_max": 16, "k": 2, "force_breaching": False})
    env.reset(seed=0)
    before = env.shares.copy()
    # Padding indices and repeats are ignored; the LP touches only endpoints 1 and 4.
    _, _, _, _, info = env.step(np.array([1, 15]))
    assert info["critical"] == [1]
    _, _, _, _, info = env.step(np.array([4, 1]))
    assert info["critical"] == [4, 1]
    moved = np.flatnonzero(np.abs(env.shares - before) > 1e-12)
    assert set(moved) <= {1, 4}
    assert abs(env.shares.sum() - 1) < 1e-9


def test_episodes_end_and_rewards_are_finite() -> None:
    env = FleetEnv({"scenarios": ["failure"], "n_max": 16, "episode_steps": 20})
    obs, _ = env.reset(seed=2)
    total, steps, done = 0.0, 0, False
    while not done:
        obs, r, term, trunc, _ = env.step(env.action_space.sample())
        assert np.isfinite(r) and env.observation_space.contains(obs)
        total += r
        steps += 1
        done = term or trunc
    assert steps == 20 and np.isfinite(total)


def test_slo_breachers_join_the_agents_picks() -> None:
    """As in the controller: the heterogeneous fleet's static split overloads some
    endpoints, and they are re-split whatever the agent names."""
    env = FleetEnv({"scenarios": ["heterogeneous"], "n_max": 16, "k": 2})
    env.reset(seed=0)
    hot = window_breaching(env.last_obs, env.weights.slo_ms)
    calm = [i for i in range(env.sim.n) if i not in hot]
    assert hot and len(calm) >= 2
    before = env.shares.copy()
    _, _, _, _, info = env.step(np.array(calm[:2]))
    # Then at most one more: the endpoint furthest from the fleet-wide optimum.
    assert info["critical"][: len(hot) + 2] == [*hot, *calm[:2]] and len(info["critical"]) <= len(hot) + 3
    assert all(env.shares[i] < before[i] for i in hot)


def test_least_request_env_pushes_the_controllers_weights_and_refuses_unknown_balancers() -> None:
    env = FleetEnv({"scenarios": ["heterogeneous"], "balancer": "least_request", "saturation": False})
    env.reset(seed=0)
    env.step(env.action_space.sample())
    shares = env.shares.copy()
    weights = env.envoy_weights(shares)
    # Scaled by the requests each endpoint holds: not the split itself, but the same support.
    assert not np.allclose(weights / weights.sum(), shares) and np.array_equal(weights > 0, shares > 0)
    assert FleetEnv({"scenarios": ["heterogeneous"], "balancer": "round_robin"}).envoy_weights(shares) is shares
    with pytest.raises(ValueError, match="unknown balancer 'maglev'; known: round_robin, least_request, cswrr"):
        FleetEnv({"balancer": "maglev"})


def test_capacity_hints_are_the_scenarios_capacities_unless_withheld() -> None:
    known = FleetEnv({"scenarios": ["heterogeneous"]})
    known.reset(seed=0)
    blind = FleetEnv({"scenarios": ["heterogeneous"], "capacity_hints": False})
    blind.reset(seed=0)
    assert known.sim is not None
    caps = [e.capacity_rps for e in known.sim.scenario.endpoints]
    assert np.array_equal(known.context().capacity_hint, caps)
    # As on a live suite fleet: the controller learns capacity from what it observes.
    assert np.isnan(blind.context().capacity_hint).all()
    assert np.isfinite(blind.capacity_estimate()).all()
