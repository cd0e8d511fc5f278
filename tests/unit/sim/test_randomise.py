"""Random fleets for training: valid, reproducible, varied, and what FleetEnv trains on."""

from __future__ import annotations

import numpy as np
import pytest

from balanceiq.sim.env import FleetEnv
from balanceiq.sim.randomise import LOAD, random_scenario
from balanceiq_lab.bench.arms import RunSim


def test_the_same_seed_draws_the_same_fleet_and_others_differ() -> None:
    assert random_scenario(7) == random_scenario(7)
    assert random_scenario(7) != random_scenario(8)


def test_fleets_span_the_sizes_loads_and_events_asked_for() -> None:
    sizes, kinds = [], set()
    for seed in range(60):
        sc = random_scenario(seed, endpoints=(3, 40))
        sizes.append(len(sc.endpoints))
        capacity = sum(e.capacity_rps for e in sc.endpoints)
        assert LOAD[0] <= sc.demand.base_rps / capacity <= LOAD[1]
        assert 2 <= len(sc.events) <= 3 and all(
            0.25 * sc.duration_s <= e.at_s <= 0.8 * sc.duration_s for e in sc.events
        )
        prices = [e.cost_per_million for e in sc.endpoints]
        assert max(prices) / min(prices) <= 20.0 + 1e-6
        kinds |= {e.kind for e in sc.events}
        sim = RunSim(sc)
        for _ in range(int(sc.duration_s)):
            r = sim.step(sim.capacity() + 1e-9)
            assert np.isfinite(r.p99_ms) and 0 <= r.error_rate <= 1
    assert min(sizes) == 3 and max(sizes) >= 30 and np.median(sizes) < 20  # log-uniform
    assert kinds == {"capacity", "servers", "errors", "tail_latency", "cost", "demand"}


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"endpoints must be a range within 1..4096, got \(5, 2\)"):
        random_scenario(0, endpoints=(5, 2))


def test_fleet_env_trains_on_random_fleets_when_asked() -> None:
    env = FleetEnv({"scenarios": ["steady"], "random_fleets": 1.0, "random_endpoints": [3, 12], "seed": 3})
    names = set()
    for seed in range(4):
        env.reset(seed=seed)
        assert env.sim is not None and 3 <= env.sim.n <= 12
        names.add(env.sim.scenario.name)
        env.step(env.action_space.sample())
    assert len(names) == 4 and all(n.startswith("random-") for n in names)
    with pytest.raises(ValueError, match=r"random_fleets is a share of episodes, 0\.\.1, got 2\.0"):
        FleetEnv({"random_fleets": 2.0})
