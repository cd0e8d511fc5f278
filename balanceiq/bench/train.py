"""`balanceiq bench train`: sample throughput with 1 vs 2 env runners, side by side.

Same PPO config, same batch, one run per runner count in the same process: env steps
per second of *sampling* (RLlib's ``env_runner_sampling_timer``), so the learner's update
time, which does not parallelise across env runners here, is measured separately.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from rich.console import Console

from balanceiq.train import build_algo_config, load_algo_config


def _timer(result: dict[str, Any], name: str) -> float | None:
    node = result.get("timers", {}).get(name)
    return float(node) if isinstance(node, (int, float)) else None


def run_train_bench(*, runners: tuple[int, ...] = (1, 2), iterations: int = 4, console: Console | None = None) -> dict[str, Any]:
    import ray

    console = console or Console(stderr=True)
    cfg = load_algo_config(None)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = {"bench": "train", "iterations": iterations, "runs": {}}
    try:
        for r in runners:
            algo = build_algo_config(cfg, scenarios=None, num_env_runners=r).build_algo()
            try:
                with console.status(f"PPO with {r} env runner(s)"):
                    algo.train()  # warm-up: actors, connectors, first compile
                    sample_rates, iter_s = [], []
                    for _ in range(iterations):
                        t0 = time.monotonic()
                        result = algo.train()
                        iter_s.append(time.monotonic() - t0)
                        steps = result.get("env_runners", {}).get("num_env_steps_sampled")
                        sampling = _timer(result, "env_runner_sampling_timer")
                        if steps and sampling:
                            sample_rates.append(float(steps) / sampling)
            finally:
                algo.stop()
            out["runs"][str(r)] = {
                "env_steps_per_s_sampling": round(statistics.fmean(sample_rates), 1) if sample_rates else None,
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
