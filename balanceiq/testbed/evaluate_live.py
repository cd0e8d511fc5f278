"""The live half of the promotion gate: :func:`evaluate_checkpoints_live` runs the candidate and the serving checkpoint
on one private LiveEnv (a live scenario replayed per episode), paired because live rewards are noisy: the same offset
and seed for both, the order alternated per episode so a drift favours neither, only measured rewards counted; the
result has :func:`~balanceiq.sim.evaluate.evaluate_checkpoints`'s shape."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from balanceiq.exceptions import BalanceIQError, PolicyError
from balanceiq.policy.checkpoint import SHIPPED, RLPolicy, load_module
from balanceiq.testbed.fleet import resolve_fleet
from balanceiq.testbed.live_config import LiveEnvConfig
from balanceiq.testbed.live_env import LiveEnv

# A compressed replay of the live benchmark's scenario: short enough to run twice per checkpoint inside a training run.
DEFAULT_LIVE_EVAL: dict[str, Any] = {
    "scenario": "degrade_and_dearer",
    "decision_interval_s": 1.0,
    "episode_steps": 15,
    "scenario_speed": 10.0,
    "scenario_offset_s": 0.0,
    "load_rps": 80.0,
}


def live_eval_config(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The defaults above, overridden; validated now (a ConfigError names the field) so a
    typo fails when the run is asked for, not minutes later after training."""
    cfg = {**DEFAULT_LIVE_EVAL, **dict(overrides or {})}
    if cfg.get("mode", "private") != "private":
        raise PolicyError("live evaluation needs its own testbed (mode: private): it must not move a fleet's traffic")
    LiveEnvConfig.from_env_config(cfg)
    if cfg.get("scenario"):
        # An unknown name fails here, naming it.
        resolve_fleet(cfg.get("fleet"), "live evaluation").scenario(cfg["scenario"])
    return cfg


def _episode(env: LiveEnv, policy: RLPolicy, seed: int) -> dict[str, Any]:
    policy.seed = seed
    policy.reset()
    rows, info = env.reset(seed=seed)
    rewards: list[float] = []
    blind = 0
    done = False
    while not done:
        rows, r, _, done, info = env.step(policy.critical_from_rows(rows, len(env.addresses), env.k))
        if info["reward_measured"]:
            rewards.append(float(r))
        else:
            blind += 1
    if not rewards:
        raise BalanceIQError("live evaluation saw no traffic: every step was blind (is the testbed's load running?)")
    return {"reward": float(statistics.fmean(rewards)), "steps": len(rewards) + blind, "blind_steps": blind}


def evaluate_checkpoints_live(
    candidate: Path | str,
    serving: Path | str | None,
    live: Mapping[str, Any] | None = None,
    *,
    episodes: int = 2,
    seed: int = 0,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Mean per-decision reward of both checkpoints over ``episodes`` paired episodes."""
    if episodes < 1:
        raise PolicyError(f"episodes must be >= 1, got {episodes}")
    cfg = live_eval_config(live)
    # Load both first: a bad checkpoint fails before a testbed is started for nothing.
    policies = {"candidate": RLPolicy(load_module(candidate)), "serving": RLPolicy(load_module(serving or SHIPPED))}
    env = LiveEnv(cfg)
    log: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for ep in range(episodes):
            order = ("candidate", "serving") if ep % 2 == 0 else ("serving", "candidate")
            for name in order:
                row = {"episode": ep, "checkpoint": name, **_episode(env, policies[name], seed + ep)}
                log.append(row)
                if on_episode is not None:
                    on_episode(row)
    finally:
        env.close()
    scenario = str(cfg.get("scenario") or "steady")
    key = f"live:{Path(scenario).stem if scenario.endswith(('.yaml', '.yml')) else scenario}"
    means = {name: float(statistics.fmean(r["reward"] for r in log if r["checkpoint"] == name)) for name in policies}
    return {
        "scenarios": {key: means},
        "candidate": means["candidate"],
        "serving": means["serving"],
        "episodes": log,
        "live_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items() if k != "settings"},
        "seconds": round(time.monotonic() - t0, 1),
    }
