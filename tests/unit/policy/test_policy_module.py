"""The RLModule: N-agnostic scoring, padding masked, and a checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from balanceiq.exceptions import PolicyError
from balanceiq.policy.baselines import PolicyContext
from balanceiq.policy.checkpoint import RLPolicy, load_module, scores
from balanceiq.policy.decide import decide
from balanceiq.policy.distribution import NEG
from balanceiq.policy.features import N_FEATURES
from balanceiq.policy.module import CriticalEndpointModule
from balanceiq.sim.env import FleetEnv
from balanceiq.telemetry.observation import Observation


def critical(policy: RLPolicy, obs: Observation, ctx: PolicyContext) -> list[int]:
    """The decision core's critical set under ``policy``: the forced endpoints (with ``force_breaching``),
    then the K highest scores (``greedy``) or a seeded Plackett-Luce draw (``sample``)."""
    return list(decide(obs, ctx, policy.scores(obs, ctx), policy.knobs(ctx), policy.state).critical)


def make_module(n_max: int = 16, k: int = 3) -> CriticalEndpointModule:
    torch.manual_seed(0)
    return CriticalEndpointModule(
        observation_space=gym.spaces.Box(0.0, 20.0, (n_max, N_FEATURES), np.float32),
        action_space=gym.spaces.MultiDiscrete([n_max] * k),
        model_config={"hidden_dim": 32},
    )


def test_scores_any_n_and_masks_padding() -> None:
    m = make_module()
    env = FleetEnv({"scenarios": ["heterogeneous"], "n_max": 16})
    obs, _ = env.reset(seed=3)
    out = m.forward_inference({Columns.OBS: torch.from_numpy(obs[None])})
    logits = out[Columns.ACTION_DIST_INPUTS][0]
    n = env.sim.n
    assert (logits[n:] == NEG).all() and (logits[:n] > NEG / 2).all()
    # The same weights score 120 endpoints: nothing in the network depends on N.
    big = FleetEnv({"scenarios": ["many_endpoints"], "n_max": 128})
    obs_big, _ = big.reset(seed=3)
    assert scores(m, obs_big[: big.sim.n]).shape == (big.sim.n,)


def test_checkpoint_round_trip_gives_identical_deterministic_actions(tmp_path: Path) -> None:
    m = make_module()
    m.save_to_path(str(tmp_path / "module"))
    loaded = load_module(tmp_path / "module")
    assert isinstance(loaded, CriticalEndpointModule)
    env = FleetEnv({"scenarios": ["degrade"], "n_max": 16})
    obs, _ = env.reset(seed=5)
    for _ in range(10):
        a = (
            m.get_inference_action_dist_cls()
            .from_logits(m.forward_inference({Columns.OBS: torch.from_numpy(obs[None])})[Columns.ACTION_DIST_INPUTS])
            .to_deterministic()
            .sample()
        )
        b = (
            loaded.get_inference_action_dist_cls()
            .from_logits(
                loaded.forward_inference({Columns.OBS: torch.from_numpy(obs[None])})[Columns.ACTION_DIST_INPUTS]
            )
            .to_deterministic()
            .sample()
        )
        assert torch.equal(a, b)
        obs, *_ = env.step(a[0].numpy())


def test_loading_garbage_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no checkpoint"):
        load_module(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(PolicyError, match="cannot load a policy"):
        load_module(tmp_path / "junk")


def test_rl_policy_decides_valid_weights() -> None:
    policy = RLPolicy(make_module())
    env = FleetEnv({"scenarios": ["steady"], "n_max": 16})
    env.reset(seed=1)
    n = env.sim.n
    ctx = PolicyContext(
        shares=env.shares, capacity_hint=env.capacity_estimate(), static_weights=np.ones(n), demand_rps=100.0, k=2
    )
    d = policy.decide(env.last_obs, ctx)
    top = np.argsort(-policy.scores(env.last_obs, ctx), kind="stable")[:2]
    # The policy's K, plus at most the gap_k endpoint furthest from the optimum (nothing breaches).
    assert set(top.tolist()) <= set(d.critical) and len(d.critical) <= 2 + policy.knobs(ctx).gap_k
    assert abs(d.shares.sum() - 1) < 1e-9 and (d.weights >= 1).all()


def test_shipped_checkpoint_loads_as_our_module() -> None:
    from balanceiq.policy.checkpoint import SHIPPED

    module = load_module(SHIPPED)  # refuses RLlib's silent fallback to a default module
    assert isinstance(module, CriticalEndpointModule)
    env = FleetEnv({"scenarios": ["degrade"], "n_max": 16})
    obs, _ = env.reset(seed=0)
    s = scores(module, obs[: env.sim.n])
    assert s.shape == (env.sim.n,) and np.isfinite(s).all()


def test_a_checkpoint_path_with_a_nul_byte_is_a_policy_error() -> None:
    """Found by schemathesis through PUT /api/policy {"checkpoint": "\\u0000"}."""
    import pytest

    from balanceiq.exceptions import PolicyError
    from balanceiq.policy.checkpoint import load_module

    with pytest.raises(PolicyError, match="not a usable checkpoint path"):
        load_module("\x00")


def test_rl_policy_adds_slo_breachers_to_its_k() -> None:
    """What the controller does: breachers are critical whatever the scores say, and the
    policy still picks K more for their traffic to go to (``force_breaching=False``
    gives the policy's K alone)."""
    from policy_cases import window_breaching

    env = FleetEnv({"scenarios": ["heterogeneous"], "n_max": 16})
    env.reset(seed=0)
    n = env.sim.n
    hot = window_breaching(env.last_obs, 150.0)
    assert hot
    ctx = PolicyContext(
        shares=env.shares, capacity_hint=env.capacity_estimate(), static_weights=np.ones(n), demand_rps=100.0, k=2
    )
    forced = critical(RLPolicy(make_module()), env.last_obs, ctx)
    own = critical(RLPolicy(make_module(), force_breaching=False), env.last_obs, ctx)
    assert forced[: len(hot)] == hot and len(own) == 2
    # Then the policy's K, then at most gap_k (1) furthest from the fleet-wide optimum.
    assert len(forced) <= len(hot) + 2 + 1
    assert (
        forced[len(hot) : len(hot) + 2]
        == [
            i
            for i in critical(
                RLPolicy(make_module(), force_breaching=False), env.last_obs, PolicyContext(**{**ctx.__dict__, "k": n})
            )
            if i not in hot
        ][:2]
    )
