"""`balanceiq bench train`: sample throughput, time to a target reward, calibration error.

* ``env_steps_per_s``: the same PPO config and batch, one run per runner count in the same
  process: env steps per second of *sampling* (RLlib's ``env_runner_sampling_timer``), so
  the learner's update time, which does not parallelise across env runners here, is
  measured separately; ``ratio`` is 2 runners over 1.
* ``seconds_to_target_reward``: wall time of training from a fresh start (the imitation
  warm start included, when the RLlib config has one, as ``balanceiq train`` runs it)
  until the mean episode return on the target scenario reaches the target: the return of the best
  static heuristic (equal, static or cost-aware weights) on the same scenario and seed
  (``null``, with the best return reached, if the iteration budget runs out first).
* ``calibration_error``: a live exploration recording on a real testbed with injected
  backend parameters, the simulator fitted to it (:mod:`balanceiq.sim.calibrate`), and the
  relative error of fitted capacity and latency against the injected truth.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from rich.console import Console

from balanceiq.train import build_algo_config, load_algo_config, warm_start


def _timer(result: dict[str, Any], name: str) -> float | None:
    node = result.get("timers", {}).get(name)
    return float(node) if isinstance(node, (int, float)) else None


def _lifetime_steps(result: dict[str, Any]) -> float | None:
    for node in (result, result.get("env_runners", {})):
        v = node.get("num_env_steps_sampled_lifetime")
        if isinstance(v, (int, float)):
            return float(v)
    return None


def run_train_bench(
    *, runners: tuple[int, ...] = (1, 2), iterations: int = 4, console: Console | None = None
) -> dict[str, Any]:
    import ray

    console = console or Console(stderr=True)
    cfg = load_algo_config(None)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = {"bench": "train", "iterations": iterations, "runs": {}}
    try:
        for r in runners:
            algo = build_algo_config(cfg, scenarios=None, num_env_runners=r).build_algo()
            try:
                with console.status(f"PPO with {r} env runner(s)"):
                    last = _lifetime_steps(algo.train())  # warm-up: actors, connectors, first compile
                    sample_rates, iter_s, wall_rates = [], [], []
                    for _ in range(iterations):
                        t0 = time.monotonic()
                        result = algo.train()
                        iter_s.append(time.monotonic() - t0)
                        # Steps from the lifetime counter's delta: the per-iteration
                        # ``num_env_steps_sampled`` is not summed over runners consistently.
                        now = _lifetime_steps(result)
                        steps = (now - last) if now is not None and last is not None else None
                        last = now
                        sampling = _timer(result, "env_runner_sampling_timer")
                        if steps and sampling:
                            sample_rates.append(float(steps) / sampling)
                        if steps:
                            wall_rates.append(float(steps) / iter_s[-1])
            finally:
                algo.stop()
            out["runs"][str(r)] = {
                "env_steps_per_s_sampling": round(statistics.fmean(sample_rates), 1) if sample_rates else None,
                "env_steps_per_s_wall": round(statistics.fmean(wall_rates), 1) if wall_rates else None,
                "iteration_s": round(statistics.fmean(iter_s), 2),
            }
    finally:
        if own_ray:
            ray.shutdown()
    one, two = out["runs"].get("1", {}), out["runs"].get("2", {})
    if one.get("env_steps_per_s_sampling") and two.get("env_steps_per_s_sampling"):
        out["sampling_speedup_2_over_1"] = round(two["env_steps_per_s_sampling"] / one["env_steps_per_s_sampling"], 3)
        out["iteration_speedup_2_over_1"] = round(one["iteration_s"] / two["iteration_s"], 3)
    return out


def baseline_return(scenario: str, env_config: dict[str, Any], seed: int = 0) -> dict[str, float]:
    """Episode return of each static heuristic on ``scenario``: what PPO must reach."""
    import numpy as np

    from balanceiq.policy.baselines import PolicyContext, make_policy
    from balanceiq.sim.env import FleetEnv

    out: dict[str, float] = {}
    for name in ("equal", "static", "cost_aware"):
        env = FleetEnv({**env_config, "scenarios": [scenario], "seed": seed})
        env.reset(seed=seed)
        assert env.sim is not None
        policy = make_policy(name)
        total, done = 0.0, False
        while not done:
            obs = env.last_obs
            ctx = PolicyContext(
                shares=env.shares,
                capacity_hint=env.capacity_estimate(),
                static_weights=np.asarray(env.sim.static_weights, dtype=np.float64),
                demand_rps=float(np.nansum([e.rps for e in obs.endpoints])),
                k=env.k,
            )
            _, r, _, truncated, _ = env.step_shares(np.asarray(policy.decide(obs, ctx).shares, dtype=np.float64))
            total += r
            done = truncated
        out[name] = round(total, 3)
    return out


def run_time_to_target(
    *, scenario: str = "degrade", max_iterations: int = 40, num_env_runners: int = 2, console: Console | None = None
) -> dict[str, Any]:
    import ray

    console = console or Console(stderr=True)
    cfg = load_algo_config(None)
    baselines = baseline_return(scenario, cfg.get("env_config", {}))
    target = max(baselines.values())
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    history: list[float] = []
    reached: float | None = None
    imitation: dict[str, Any] | None = None
    t0 = time.monotonic()
    try:
        algo_config = build_algo_config(cfg, scenarios=[scenario], num_env_runners=num_env_runners)
        algo = algo_config.build_algo()
        try:
            if cfg.get("imitation"):
                # As `balanceiq train` does: the clock includes the warm start.
                imitation = warm_start(algo, cfg, dict(algo_config.env_config), console=console)
            with console.status(f"PPO on {scenario} until return >= {target:.1f}") as status:
                for i in range(max_iterations):
                    result = algo.train()
                    ret = result.get("env_runners", {}).get("episode_return_mean")
                    if isinstance(ret, (int, float)):
                        history.append(round(float(ret), 2))
                        status.update(f"PPO on {scenario}: iteration {i + 1}, return {ret:.1f} (target {target:.1f})")
                        if ret >= target:
                            reached = time.monotonic() - t0
                            break
        finally:
            algo.stop()
    finally:
        if own_ray:
            ray.shutdown()
    return {
        "scenario": scenario,
        "target_return": target,
        "baseline_returns": baselines,
        "seconds": round(reached, 1) if reached is not None else None,
        "imitation_s": imitation["seconds"] if imitation else None,
        "iterations": len(history),
        "max_iterations": max_iterations,
        "best_return": max(history) if history else None,
        "returns": history,
    }


# Injected into the testbed's backends for the calibration check: (base latency ms, slots).
CALIBRATION_TRUTH = ((20.0, 2), (40.0, 2), (30.0, 3), (60.0, 4))


def run_calibration_error(
    *, duration_s: float = 60.0, rate_rps: float = 120.0, console: Console | None = None
) -> dict[str, Any]:
    """Record exploration on a testbed with injected backends, fit, compare with the truth."""
    import tempfile
    from pathlib import Path

    from balanceiq.config import BackendProfile
    from balanceiq.sim.calibrate import calibrate
    from balanceiq.testbed.record import ExplorationPlan, record_exploration
    from balanceiq_lab.bench.calibration import calibration_error
    from balanceiq_lab.bench.settings import settings_on_free_ports

    console = console or Console(stderr=True)
    s = settings_on_free_ports(len(CALIBRATION_TRUTH))
    overrides = {
        ep.address: BackendProfile(base_latency_ms=b, concurrency=c)
        for ep, (b, c) in zip(s.clusters[0].endpoints, CALIBRATION_TRUTH)
    }
    s = s.model_copy(update={"testbed": s.testbed.model_copy(update={"overrides": overrides})})
    with tempfile.TemporaryDirectory(prefix="balanceiq-calib-") as tmp:
        rec_path = Path(tmp) / "recording.jsonl"
        rec = record_exploration(
            s,
            rec_path,
            duration_s=duration_s,
            rate_rps=rate_rps,
            plan=ExplorationPlan(hold_s=4.0, seed=0),
            workdir=Path(tmp) / "work",
            console=console,
        )
        err = calibration_error(calibrate(rec_path), rec["truth"])
    return {"duration_s": duration_s, "rate_rps": rate_rps, "injected": [list(t) for t in CALIBRATION_TRUTH], **err}


def run_full_train_bench(
    *, iterations: int = 4, target_iterations: int = 40, calibration_s: float = 60.0, console: Console | None = None
) -> dict[str, Any]:
    """Everything #6 asks of ``balanceiq bench train``, in one JSON object."""
    console = console or Console(stderr=True)
    throughput = run_train_bench(iterations=iterations, console=console)
    one = throughput["runs"].get("1", {}).get("env_steps_per_s_sampling")
    two = throughput["runs"].get("2", {}).get("env_steps_per_s_sampling")
    return {
        "bench": "train",
        "env_steps_per_s": {"runners_1": one, "runners_2": two, "ratio": throughput.get("sampling_speedup_2_over_1")},
        "throughput": throughput,
        "seconds_to_target_reward": run_time_to_target(max_iterations=target_iterations, console=console),
        "calibration_error": run_calibration_error(duration_s=calibration_s, console=console),
    }
