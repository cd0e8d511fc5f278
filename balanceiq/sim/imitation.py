"""Imitation warm start: behaviour-clone a teacher before PPO refines it (PPO from random scores spends most of its
budget discovering which endpoints the LP needs in the critical set). The default teacher (``gap``) names the K
endpoints furthest from the decision core's fleet-wide optimum, which knows price, the SLO and headroom; the older
``hot_cold`` (:func:`~balanceiq.policy.baselines.hot_cold_critical`) ranks by load alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.signal import lfilter

from balanceiq.policy.baselines import available_mask, hot_cold_critical
from balanceiq.policy.decide import optimum_gap
from balanceiq.sim.env import FleetEnv

TEACHERS = ("gap", "hot_cold")


@dataclass
class Demonstrations:
    """States (encoded observations), the teacher's ordered choices, and returns."""

    obs: np.ndarray  # [M, n_max, F] float32
    actions: np.ndarray  # [M, K] int64
    returns: np.ndarray  # [M] float32
    teacher_return: float  # mean episode return of the behaviour that collected them


def collect(
    env_config: dict[str, Any],
    *,
    episodes: int = 24,
    explore: float = 0.2,
    gamma: float = 0.9,
    seed: int = 0,
    teacher: str = "gap",
    on_episode: Callable[[int], None] | None = None,
) -> Demonstrations:
    """Roll out the teacher and label every state with its ordered choice and discounted
    return; with probability ``explore`` a random action is taken instead (DAgger-style, so
    the data covers states a slipping clone must recover from)."""
    if teacher not in TEACHERS:
        raise ValueError(f"unknown imitation teacher {teacher!r}; known: {', '.join(TEACHERS)}")
    rng = np.random.default_rng(seed)
    env = FleetEnv({**env_config, "seed": seed})
    obs_rows: list[np.ndarray] = []
    labels: list[list[int]] = []
    returns: list[float] = []
    totals: list[float] = []
    for ep in range(episodes):
        rows, _ = env.reset(seed=seed + ep)
        assert env.sim is not None
        rewards: list[float] = []
        done = False
        while not done:
            n = env.sim.n
            label = _teacher_choice(env, teacher)
            # The label must be a full K-tuple for the log-likelihood; pad with distinct
            # unused endpoints when N < K would leave it short (never with padding rows).
            label += [i for i in range(n) if i not in label][: env.k - len(label)]
            action = rng.choice(n, size=min(env.k, n), replace=False).tolist() if rng.random() < explore else label
            obs_rows.append(rows)
            labels.append(label[: env.k])
            rows, r, _, done, _ = env.step(np.asarray(action + action[:1] * (env.k - len(action)), dtype=np.int64))
            rewards.append(float(r))
        returns.extend(lfilter([1.0], [1.0, -gamma], rewards[::-1])[::-1])  # g_t = r_t + gamma g_{t+1}
        totals.append(float(sum(rewards)))
        if on_episode is not None:
            on_episode(ep + 1)
    return Demonstrations(
        obs=np.stack(obs_rows).astype(np.float32),
        actions=np.asarray(labels, dtype=np.int64),
        returns=np.asarray(returns, dtype=np.float32),
        teacher_return=float(np.mean(totals)),
    )


def _teacher_choice(env: Any, teacher: str) -> list[int]:
    """The teacher's ordered choice of critical endpoints in the env's current state."""
    if teacher == "hot_cold":
        return hot_cold_critical(env.last_obs, replace(env.context(), capacity_hint=env.capacity_estimate()))
    gap = optimum_gap(env.last_obs, env.context(), env.knobs(), env.core_state)
    gap = np.where(available_mask(env.last_obs), gap, -np.inf)
    return [int(i) for i in np.argsort(-gap, kind="stable")[: env.k] if gap[i] > -np.inf]


def pretrain(
    module: Any,
    demos: Demonstrations,
    *,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 256,
    value_coeff: float = 0.1,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Fit ``module`` in place: maximise the Plackett-Luce log-likelihood of the teacher's choices (the distribution PPO
    samples from) and regress the value head on the returns, so PPO's first advantages are not noise from an untrained
    critic. ``agreement``: the share of states where the module's top K are the teacher's K (as a set)."""
    import torch
    from ray.rllib.core.columns import Columns

    from balanceiq.policy.distribution import PlackettLuce

    torch.manual_seed(seed)
    obs = torch.from_numpy(demos.obs)
    act = torch.from_numpy(demos.actions)
    ret = torch.from_numpy(demos.returns)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    k, m = act.shape[1], obs.shape[0]
    losses: list[float] = []
    for epoch in range(epochs):
        perm = torch.randperm(m)
        total = 0.0
        for start in range(0, m, batch_size):
            idx = perm[start : start + batch_size]
            batch = {Columns.OBS: obs[idx]}
            scores = module._forward(batch)[Columns.ACTION_DIST_INPUTS]
            nll = -PlackettLuce(scores, k=k).logp(act[idx]).mean()
            v = module.compute_values(batch)
            loss = nll + value_coeff * torch.nn.functional.smooth_l1_loss(v, ret[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            total += float(nll.detach()) * len(idx)
        losses.append(total / m)
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1])
    module.eval()
    with torch.no_grad():
        scores = module._forward({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        top = torch.topk(scores, k, dim=-1).indices.sort(-1).values
        agree = float((top == act.sort(-1).values).all(-1).float().mean())
    return {
        "states": int(m),
        "epochs": epochs,
        "nll_first": losses[0],
        "nll_last": losses[-1],
        "agreement": agree,
        "teacher_return": demos.teacher_return,
    }
