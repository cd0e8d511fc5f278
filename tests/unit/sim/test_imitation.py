"""Behaviour cloning of a teacher (the optimum gap, or hot/cold): labels, returns, and a fit that learns."""

from __future__ import annotations

import numpy as np
import pytest

from balanceiq.policy.baselines import PolicyContext, hot_cold_critical
from balanceiq.policy.decide import optimum_gap
from balanceiq.sim.env import FleetEnv
from balanceiq.sim.imitation import collect, pretrain

ENV = {"scenarios": ["heterogeneous"], "n_max": 16, "k": 2, "episode_steps": 20}


def test_demonstrations_label_every_state_with_the_teachers_ordered_choice() -> None:
    demos = collect(ENV, episodes=2, explore=0.0, gamma=0.9, seed=3, teacher="hot_cold")
    assert demos.obs.shape == (40, 16, demos.obs.shape[2]) and demos.actions.shape == (40, 2)
    # Re-run the teacher on the same seeded episode: the labels are its choices.
    env = FleetEnv({**ENV, "seed": 3})
    env.reset(seed=3)
    assert env.sim is not None
    obs = env.last_obs
    ctx = PolicyContext(
        shares=env.shares,
        capacity_hint=env.capacity_estimate(),
        static_weights=np.asarray(env.sim.static_weights, dtype=np.float64),
        demand_rps=float(np.nansum([e.rps for e in obs.endpoints])),
        k=2,
    )
    assert demos.actions[0].tolist() == hot_cold_critical(obs, ctx)
    # Hottest first, coldest second: the encoded utilisation column orders them so.
    util = demos.obs[0, :, -4]
    assert util[demos.actions[0, 0]] == pytest.approx(util[: env.sim.n].max())
    assert util[demos.actions[0, 1]] == pytest.approx(util[: env.sim.n].min())
    # Discounted returns: the last state of an episode returns just its own reward.
    assert demos.returns.shape == (40,) and np.all(np.isfinite(demos.returns)) and np.all(demos.returns < 0)


def test_pretraining_raises_the_likelihood_of_the_teachers_choices() -> None:
    from balanceiq.policy.module import CriticalEndpointModule

    demos = collect(ENV, episodes=6, explore=0.2, seed=0)
    env = FleetEnv(ENV)
    module = CriticalEndpointModule(
        observation_space=env.observation_space, action_space=env.action_space, model_config={"hidden_dim": 32}
    )
    fit = pretrain(module, demos, epochs=40, lr=3e-3, batch_size=64, seed=0)
    assert fit["states"] == 120 and fit["nll_last"] < fit["nll_first"] - 0.3
    # Better than chance at naming the teacher's pair (1 in C(6,2) = 15 by chance).
    assert fit["agreement"] > 1 / 15


def test_the_gap_teacher_names_the_endpoints_furthest_from_the_fleet_wide_optimum() -> None:
    demos = collect(ENV, episodes=1, explore=0.0, gamma=0.9, seed=5)
    env = FleetEnv({**ENV, "seed": 5})
    env.reset(seed=5)
    gap = optimum_gap(env.last_obs, env.context(), env.knobs(), env.core_state)
    first = demos.actions[0].tolist()
    assert gap[first[0]] == pytest.approx(gap.max()) and gap[first[0]] > 0.01
    assert gap[first[1]] == pytest.approx(np.sort(gap)[-2])
    # The teacher's picks are what the env then re-optimises: both are in its critical set.
    assert set(first) <= set(env.decide(first).critical)


def test_an_unknown_teacher_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown imitation teacher 'best'; known: gap, hot_cold"):
        collect(ENV, episodes=1, teacher="best")
