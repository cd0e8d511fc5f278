"""A bounded PPO run on the simulator (real local Ray, RLlib new API stack)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from balanceiq.policy.baselines import PolicyContext
from balanceiq.policy.checkpoint import RLPolicy
from balanceiq.policy.decide import decide
from balanceiq.sim.env import FleetEnv
from balanceiq.train import train

pytestmark = pytest.mark.slow


@functools.cache
def _ppo_env_config() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((Path(__file__).resolve().parents[2] / "rllib_configs" / "ppo.yaml").read_text())[
        "env_config"
    ]


def episode_reward(choose, seed: int) -> float:  # type: ignore[no-untyped-def]
    """One episode of ``degrade`` on the env PPO trains on (``ppo.yaml``'s env_config):
    with the core's own rules off there (``force_breaching: false``), random picks are
    the policy's real competitor; with them on, the core re-optimises whatever the picks
    miss (the endpoint furthest from the optimum joins every decision) and random picks
    score close to any policy."""
    env = FleetEnv({**_ppo_env_config(), "scenarios": ["degrade"], "n_max": 16, "episode_steps": 60})
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    total, done = 0.0, False
    while not done:
        crit = choose(env, rng)
        shares, info = env.apply_critical(crit)
        _, r, _, done, _ = env.step_shares(shares, info)
        total += r
    return total


def test_bounded_ppo_improves_over_random_on_degrade(tmp_path: Path) -> None:
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "rllib_configs" / "ppo.yaml").read_text())
    cfg["training"].update({"train_batch_size_per_learner": 1000, "minibatch_size": 200, "num_epochs": 6})
    cfg.pop("imitation", None)  # PPO alone must learn; the warm start is tested below
    small = tmp_path / "ppo.yaml"
    small.write_text(yaml.safe_dump(cfg))
    summary = train(
        scenarios=["degrade"],
        iterations=8,
        checkpoint_dir=tmp_path / "ckpt",
        num_env_runners=1,
        config_path=small,
        seed=0,
    )
    assert summary["module_class"] == "CriticalEndpointModule"
    assert json.loads((tmp_path / "ckpt" / "training_summary.json").read_text())["iterations"] == 8

    # The distribution PPO optimised (greedy top-K of a barely trained policy can lock
    # onto one pair; the shipped, longer-trained policy runs greedy).
    policy = RLPolicy.from_checkpoint(tmp_path / "ckpt", mode="sample")

    def trained(env: FleetEnv, rng: np.random.Generator) -> list[int]:
        ctx = PolicyContext(
            shares=env.shares,
            capacity_hint=env.capacity_estimate(),
            static_weights=np.ones(env.sim.n),
            demand_rps=0.0,
            k=env.k,
        )
        return list(
            decide(env.last_obs, ctx, policy.scores(env.last_obs, ctx), policy.knobs(ctx), policy.state).critical
        )

    def random(env: FleetEnv, rng: np.random.Generator) -> list[int]:
        return [int(i) for i in rng.choice(env.sim.n, size=env.k, replace=False)]

    seeds = [11, 12, 13]
    trained_r = np.mean([episode_reward(trained, s) for s in seeds])
    random_r = np.mean([episode_reward(random, s) for s in seeds])
    print(f"trained {trained_r:.1f} vs random {random_r:.1f} (return per 60-decision episode)")
    assert trained_r > random_r


def test_imitation_warm_start_reaches_the_env_runners(tmp_path: Path) -> None:
    """With the warm start, the very first PPO iteration already samples from the cloned
    heuristic: its episodes must beat random critical sets on the same scenario."""
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "rllib_configs" / "ppo.yaml").read_text())
    cfg["training"].update({"train_batch_size_per_learner": 600, "minibatch_size": 200, "num_epochs": 1})
    cfg["imitation"] = {"episodes": 12, "epochs": 40, "lr": 0.003, "explore": 0.2}
    small = tmp_path / "ppo.yaml"
    small.write_text(yaml.safe_dump(cfg))
    summary = train(
        scenarios=["degrade"],
        iterations=1,
        checkpoint_dir=tmp_path / "ckpt",
        num_env_runners=1,
        config_path=small,
        seed=0,
    )
    fit = summary["imitation"]
    assert fit["states"] == 12 * 60 and fit["nll_last"] < fit["nll_first"]

    def random(env: FleetEnv, rng: np.random.Generator) -> list[int]:
        return [int(i) for i in rng.choice(env.sim.n, size=env.k, replace=False)]

    random_r = np.mean([episode_reward(random, s) for s in (11, 12, 13)])
    print(f"first iteration {summary['first_return']:.1f} vs random {random_r:.1f}; fit {fit}")
    assert summary["first_return"] > random_r
