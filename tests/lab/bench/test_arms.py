"""The benchmark harness agrees with the promotion gate it was split from."""

from __future__ import annotations

from balanceiq.sim.evaluate import episode_reward
from balanceiq_lab.bench.arms import run_pair
from balanceiq_lab.bench.baselines import make_policy


def test_the_gates_episode_reward_is_the_benchmarks_reward() -> None:
    for name in ("static", "hot_cold"):
        assert (
            episode_reward("degrade", make_policy(name), 1) == run_pair("degrade", make_policy(name), seed=1)["reward"]
        )
