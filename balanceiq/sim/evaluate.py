"""The promotion gate: :func:`evaluate_checkpoints` runs a candidate and the serving
checkpoint through the same scenarios and seeds, and :func:`promotion_decision` says whether
the candidate may replace the serving one: better on average by a margin and not clearly
worse on any scenario (winning on average by wrecking one situation is no improvement)."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from balanceiq.policy.checkpoint import SHIPPED, RLPolicy
from balanceiq.sim.env import FleetEnv
from balanceiq.sim.scenario import SCENARIOS, load_scenario

# The gate runs every shipped scenario, those held out of training in rllib_configs/ppo.yaml
# included: a candidate that generalises better can still have forgotten a training scenario.
GATE_SCENARIOS = tuple(SCENARIOS)


def episode_reward(scenario: str, policy: Any, seed: int = 0) -> float:
    """Mean reward per decision of ``policy`` over one whole ``scenario`` (FleetEnv's
    defaults, observation noise 0.05; padded to N only, baselines never read padding)."""
    n_max = len(load_scenario(scenario).endpoints)
    env = FleetEnv({"scenarios": [scenario], "n_max": n_max, "episode_steps": 10**9, "seed": seed, "obs_noise": 0.05})
    env.reset(seed=seed)
    policy.reset()
    rewards: list[float] = []
    done = False
    while not done:
        ctx = replace(env.context(), capacity_hint=env.capacity_estimate())
        _, r, _, done, _ = env.step_shares(np.asarray(policy.decide(env.last_obs, ctx).shares, dtype=np.float64))
        rewards.append(r)
    return float(statistics.fmean(rewards))


def evaluate_checkpoints(
    candidate: Path | str,
    serving: Path | str | None,
    *,
    scenarios: tuple[str, ...] = GATE_SCENARIOS,
    seeds: tuple[int, ...] = (0,),
) -> dict[str, Any]:
    """Mean reward of both checkpoints per scenario (same seeds; each policy as it serves,
    greedy top-K), plus the means over all scenarios."""
    out: dict[str, Any] = {"scenarios": {}, "seeds": list(seeds)}
    for name, ckpt in (("candidate", candidate), ("serving", serving or SHIPPED)):
        policy = RLPolicy.from_checkpoint(ckpt)
        for sc in scenarios:
            rewards = [episode_reward(sc, policy, seed) for seed in seeds]
            out["scenarios"].setdefault(sc, {})[name] = float(statistics.fmean(rewards))
    for name in ("candidate", "serving"):
        out[name] = float(statistics.fmean(v[name] for v in out["scenarios"].values()))
    return out


def promotion_decision(
    evaluation: dict[str, Any], *, margin: float = 0.02, worst_regression: float = 0.25
) -> tuple[bool, str]:
    """``(promote, reason)``: better by ``margin`` on average, and no scenario worse by more than ``worst_regression``;
    both relative per scenario, so a scenario with a large reward scale (many endpoints) does not drown the others."""
    cand, serv = evaluation["candidate"], evaluation["serving"]
    if not (np.isfinite(cand) and np.isfinite(serv)):
        return False, "evaluation produced a non-finite reward"
    regressions = {
        sc: (v["candidate"] - v["serving"]) / max(abs(v["serving"]), 1e-9) for sc, v in evaluation["scenarios"].items()
    }
    worst = min(regressions, key=lambda k: regressions[k])
    if regressions[worst] < -worst_regression:
        return False, (
            f"rejected: worse on {worst} by {-regressions[worst]:.0%} "
            f"({evaluation['scenarios'][worst]['candidate']:.3f} vs {evaluation['scenarios'][worst]['serving']:.3f})"
        )
    gain = float(statistics.fmean(regressions.values()))
    if gain <= margin:
        return (
            False,
            f"rejected: {gain:+.1%} mean relative reward change vs the serving checkpoint (needs > {margin:+.0%})",
        )
    return True, f"promoted: {gain:+.1%} mean relative reward change vs the serving checkpoint"


def merge_evaluations(*evaluations: dict[str, Any]) -> dict[str, Any]:
    """One evaluation from several (the simulator's and the live testbed's): the scenarios side by side, the means
    recomputed over all of them, so the gate weighs a live scenario like any held-back simulated one."""
    merged: dict[str, Any] = {"scenarios": {}}
    for ev in evaluations:
        for sc, v in ev["scenarios"].items():
            if sc in merged["scenarios"]:
                raise ValueError(f"scenario {sc!r} evaluated twice")
            merged["scenarios"][sc] = dict(v)
        for key, value in ev.items():
            if key not in ("scenarios", "candidate", "serving"):
                merged.setdefault(key, value)
    for name in ("candidate", "serving"):
        merged[name] = float(statistics.fmean(v[name] for v in merged["scenarios"].values()))
    return merged
