"""The simulator twin of a suite fleet, and its agreement with live results."""

from __future__ import annotations

import math

import numpy as np
import pytest

from balanceiq_lab.bench import arms
from balanceiq_lab.bench.arms import RunSim
from balanceiq_lab.bench.suite import draw_fleet, truth
from balanceiq_lab.bench.twin import agreement, fleet_scenario, live_arms, run_twin, spearman
from balanceiq_lab.errors import BenchError


@pytest.mark.parametrize("seed", [0, 1, 2005])
def test_the_twin_has_the_fleets_capacity_and_prices_at_every_moment(seed: int) -> None:
    fleet = draw_fleet(seed)
    sim = RunSim(fleet_scenario(fleet, warmup_s=10.0))
    addresses = [ep.address for ep in fleet.settings.clusters[0].endpoints]
    for t in np.arange(0.0, 10.0 + fleet.duration_s, 1.0):
        while sim.t < t - 1e-9:
            sim.step(np.ones(sim.n))
        want = truth(fleet, max(0.0, t - 10.0))
        assert sim.capacity() == pytest.approx([want[a]["capacity_rps"] for a in addresses], rel=1e-6)
        assert sim.cost() == pytest.approx([want[a]["price"] for a in addresses], rel=1e-6)
    assert sim.timeout_ms > 9000 and list(sim.servers) == [b.concurrency for b in fleet.backends]


def test_run_twin_reports_each_arm_over_the_measured_run() -> None:
    r = run_twin(draw_fleet(3), ["round_robin", "least_request"])
    for arm in ("round_robin", "least_request"):
        assert set(r[arm]) == {"p50_ms", "p99_ms", "error_rate", "cost_per_million", "traffic_moved", "reversals"}
        assert 0 < r[arm]["p50_ms"] <= r[arm]["p99_ms"] and math.isfinite(r[arm]["cost_per_million"])


def test_the_twins_controller_has_no_capacity_hints_as_on_a_suite_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    hints: list[np.ndarray] = []
    real = arms._pair_env

    def spy(*args: object) -> object:
        env = real(*args)  # type: ignore[arg-type]
        hints.append(env.hint.copy())
        return env

    monkeypatch.setattr(arms, "_pair_env", spy)
    run_twin(draw_fleet(3), ["least_request", "balanceiq_lr"])
    assert len(hints) == 2 and all(np.isnan(h).all() for h in hints)


def test_agreement_and_spearman() -> None:
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(math.sqrt(3) / 2)
    sim = {7: {"a": {"p99_ms": 100.0}, "b": {"p99_ms": 200.0}, "c": {"p99_ms": 400.0}}}
    live = {7: {"a": {"p99_ms": 120.0}, "b": {"p99_ms": 150.0}, "c": {"p99_ms": 900.0}, "d": {"p99_ms": 1.0}}}
    out = agreement(sim, live)
    assert out["fleets"]["7"]["arms"] == ["a", "b", "c"] and out["fleets"]["7"]["spearman"] == pytest.approx(1.0)
    assert out["p99_within_30pct_fraction"] == pytest.approx(1 / 3)  # 0.83 in; 1.33 and 0.44 out
    assert out["p99_sim_over_live_geomean"]["c"] == pytest.approx(400 / 900, abs=1e-3)


def test_live_results_must_be_a_suite() -> None:
    assert live_arms({"fleets": [{"seed": 4, "arms": {"x": {"p99_ms": 1.0}}}]}) == {4: {"x": {"p99_ms": 1.0}}}
    with pytest.raises(BenchError, match="not a `bench live --suite --json` result"):
        live_arms({"bench": "live"})
