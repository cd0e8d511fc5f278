"""The benchmark harness: the whole-run totals, and agreement with the promotion gate it was split from."""

from __future__ import annotations

import numpy as np
import pytest

from balanceiq.sim.evaluate import episode_reward
from balanceiq.sim.fleet import BASE_ERROR
from balanceiq.sim.scenario import scenario_from_dict
from balanceiq_lab.bench.arms import RunSim, run_pair
from balanceiq_lab.bench.baselines import make_policy


def test_the_run_summary_counts_every_request_since_it_was_cleared() -> None:
    eps = [
        {"name": n, "cloud": c, "region": "r1", "capacity_rps": cap, "base_latency_ms": 10.0, "cost_per_million": 0.3}
        for n, c, cap in (("a", "aws", 100.0), ("b", "gcp", 1000.0))
    ]
    demand = {"base_rps": 100.0, "diurnal_amplitude": 0.0, "noise": 0.0}
    sim = RunSim(scenario_from_dict({"name": "t", "duration_s": 100, "endpoints": eps, "demand": demand}))
    first = sim.step(np.array([1.0, 0.0]))  # everything on the small endpoint: slow
    sim.clear_run()
    steps = [sim.step(np.array([0.0, 1.0])) for _ in range(5)]  # then on the big one
    run = sim.run_summary()
    assert run["p99_ms"] == pytest.approx(steps[-1].p99_ms, rel=sim.grid_ratio - 1)
    assert run["p99_ms"] < first.p99_ms
    assert run["cost_per_million"] == pytest.approx(0.3) and run["error_rate"] == pytest.approx(BASE_ERROR)


def test_the_gates_episode_reward_is_the_benchmarks_reward() -> None:
    for name in ("static", "hot_cold"):
        assert (
            episode_reward("degrade", make_policy(name), 1) == run_pair("degrade", make_policy(name), seed=1)["reward"]
        )
