"""FleetSim: determinism, the queueing model, events, aggregates and observations."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balanceiq.sim.fleet import BASE_ERROR, FleetSim, StepResult
from balanceiq.sim.queue import TIMEOUT_MS
from balanceiq.sim.scenario import Scenario, load_scenario, scenario_from_dict
from balanceiq.telemetry.observation import NO_TRAFFIC, Observation
from balanceiq_lab.bench.arms import RunSim


def _scenario(
    endpoints: list[dict[str, Any]], base_rps: float, events: list[dict[str, Any]] | None = None, **demand: Any
) -> Scenario:
    return scenario_from_dict(
        {
            "name": "t",
            "duration_s": 100,
            "endpoints": endpoints,
            "demand": {"base_rps": base_rps, "diurnal_amplitude": 0.0, "noise": 0.0, **demand},
            "events": events or [],
        }
    )


def _ep(name: str, cap: float, base: float = 10.0, cost: float = 0.3, cloud: str = "aws") -> dict[str, Any]:
    return {
        "name": name,
        "cloud": cloud,
        "region": "r1",
        "capacity_rps": cap,
        "base_latency_ms": base,
        "cost_per_million": cost,
    }


def _two(base_rps: float = 100.0, events: list[dict[str, Any]] | None = None) -> FleetSim:
    return FleetSim(_scenario([_ep("a", 100.0), _ep("b", 1000.0, cloud="gcp")], base_rps, events))


def _run(sim: FleetSim, steps: int, shares: np.ndarray | None = None) -> list[StepResult]:
    s = np.ones(sim.n) if shares is None else shares
    return [sim.step(s) for _ in range(steps)]


def _same(a: StepResult, b: StepResult) -> bool:
    for f in fields(StepResult):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True):
            return False
    return True


def _without_events(sc: Scenario) -> Scenario:
    return sc.model_copy(update={"events": []})


# ------------------------------------------------------------------ determinism


def test_same_seed_same_trajectory_and_reset_replays() -> None:
    a, b = FleetSim("failure", seed=11), FleetSim("failure", seed=11)
    ra, rb = _run(a, 300), _run(b, 300)
    assert all(_same(x, y) for x, y in zip(ra, rb, strict=True))
    a.reset()
    assert a.t == 0.0
    assert all(_same(x, y) for x, y in zip(_run(a, 300), ra, strict=True))


def test_different_seed_different_demand() -> None:
    a, b = FleetSim("steady", seed=1), FleetSim("steady", seed=2)
    da = [r.demand_rps for r in _run(a, 50)]
    db = [r.demand_rps for r in _run(b, 50)]
    assert da != db
    a.reset(seed=2)
    assert [r.demand_rps for r in _run(a, 50)] == db


def test_observing_with_noise_does_not_change_the_run() -> None:
    quiet, noisy = FleetSim("brownout", seed=3), FleetSim("brownout", seed=3, obs_noise=0.2)
    for _ in range(40):
        r1, r2 = quiet.step(np.ones(8)), noisy.step(np.ones(8))
        noisy.observation(r2)
        assert _same(r1, r2)


def test_seed_defaults_to_the_scenarios() -> None:
    sc = load_scenario("steady")
    assert FleetSim(sc).seed == sc.seed
    assert [r.demand_rps for r in _run(FleetSim(sc), 5)] == [r.demand_rps for r in _run(FleetSim(sc, seed=sc.seed), 5)]


def test_demand_is_diurnal_with_mean_one_noise() -> None:
    sc = load_scenario("steady")
    sim = FleetSim(sc)
    demand = np.array([r.demand_rps for r in _run(sim, 600)])
    t = np.arange(600.0)
    d = sc.demand
    shape = d.base_rps * (1 + d.diurnal_amplitude * np.sin(2 * np.pi * t / d.diurnal_period_s + d.phase))
    ratio = demand / shape
    assert abs(ratio.mean() - 1) < 0.01
    assert 0.03 < ratio.std() < 0.07
    assert demand[150] > demand[0] > demand[450]


# ------------------------------------------------------------------ queueing model


def test_mm1_quantiles_match_closed_form() -> None:
    sim = _two(base_rps=100.0)
    r = sim.step(np.array([0.5, 0.5]))  # a: 50 rps on mu=100 -> rho 0.5
    rate_per_ms = 100 * (1 - 0.5) / 1000
    for q, got in ((0.5, r.endpoint_p50_ms[0]), (0.95, r.endpoint_p95_ms[0]), (0.99, r.endpoint_p99_ms[0])):
        assert got == pytest.approx(10 + -math.log(1 - q) / rate_per_ms)
    assert r.utilization[0] == pytest.approx(0.5)
    assert r.endpoint_error_rate[0] == pytest.approx(BASE_ERROR)
    # Little's law: in flight = rate x mean time in system.
    assert r.inflight[0] == pytest.approx(50 * (0.010 + 1 / (100 * 0.5)), rel=1e-6)


def test_latency_rises_monotonically_with_load() -> None:
    sim = _two(base_rps=200.0)
    loads = np.linspace(0.05, 0.95, 60)  # share of 200 rps sent to "a" (mu = 100): rho 0.1 .. 1.9
    rows = []
    for f in loads:
        r = sim.step(np.array([f, 1 - f]))
        rows.append((r.endpoint_p50_ms[0], r.endpoint_p95_ms[0], r.endpoint_p99_ms[0], r.endpoint_error_rate[0]))
    arr = np.array(rows)
    assert np.all(np.diff(arr, axis=0) >= -1e-9), "latency and errors never fall as load rises"
    below = loads * 2 < 0.98
    assert np.all(np.diff(arr[below, 0]) > 0) and np.all(np.diff(arr[below, 2]) > 0)
    assert np.all(arr[:, 0] <= arr[:, 1]) and np.all(arr[:, 1] <= arr[:, 2])
    # The wait beyond base is capped at the timeout, reached by 110% utilisation.
    assert arr[-1, 0] == pytest.approx(10 + TIMEOUT_MS)
    assert arr.max() <= 10 + TIMEOUT_MS + 1e-9


@pytest.mark.parametrize("rho", [1.2, 1.5, 2.0, 4.0])
def test_overload_sheds_the_excess(rho: float) -> None:
    sim = _two(base_rps=100.0 * rho)
    r = sim.step(np.array([1.0, 0.0]))
    assert r.utilization[0] == pytest.approx(rho)
    assert r.endpoint_error_rate[0] == pytest.approx(1 - 1 / rho, abs=2 * BASE_ERROR)
    assert r.served_rps[0] == pytest.approx(100 * (1 - BASE_ERROR))
    assert r.error_rate == pytest.approx(r.endpoint_error_rate[0])
    assert r.max_utilization == pytest.approx(rho)


def test_below_capacity_only_base_errors() -> None:
    r = _two(base_rps=90.0).step(np.array([1.0, 0.0]))
    assert r.endpoint_error_rate[0] == pytest.approx(BASE_ERROR)
    assert r.error_rate == pytest.approx(BASE_ERROR)


# ------------------------------------------------------------------ events


def test_failure_only_during_the_event_then_recovers() -> None:
    sim = RunSim("failure")
    i = sim.names.index("aws-use1-a")
    base_cap = sim.base_capacity_rps[i]
    shares = sim.base_capacity_rps.copy()
    for _ in range(400):
        t = sim.t
        cap, up = sim.capacity()[i], sim.available()[i]
        r = sim.step(shares)
        down = 150 <= t < 270
        assert r.t == t
        assert up == (not down) and bool(r.available[i]) == (not down)
        if down:
            assert cap == 0 and r.capacity_rps[i] == 0
            assert r.endpoint_error_rate[i] == 1.0 and r.served_rps[i] == 0
            assert r.utilization[i] == math.inf
            assert r.endpoint_p99_ms[i] == sim.base_latency_ms[i], "fails fast"
            assert r.max_utilization < 1, "the dead endpoint does not count"
            assert r.error_rate > 0.1
        else:
            assert cap == base_cap
            assert r.endpoint_error_rate[i] < 0.01


def test_failed_endpoint_without_traffic_is_not_saturated() -> None:
    sim = FleetSim("failure")
    i = sim.names.index("aws-use1-a")
    _run(sim, 150)
    shares = sim.base_capacity_rps.copy()
    shares[i] = 0
    r = sim.step(shares)
    assert r.utilization[i] == 0 and r.error_rate < 0.01
    assert math.isnan(r.endpoint_error_rate[i])


def test_degrade_halves_capacity_at_the_event_time() -> None:
    sim = RunSim("degrade")
    i = sim.names.index("gcp-usc1-a")
    caps = []
    for _ in range(600):
        caps.append(sim.capacity()[i])
        sim.step(np.ones(sim.n))
    assert set(caps[:150]) == {400.0} and set(caps[150:]) == {200.0}
    others = np.delete(sim.capacity(), i)
    assert np.array_equal(others, np.delete(sim.base_capacity_rps, i))


def test_cost_shift_triples_aws_cost() -> None:
    sim = RunSim("cost_shift")
    aws = np.array([e.cloud == "aws" for e in sim.scenario.endpoints])
    before = sim.cost()
    _run(sim, 200)
    assert not np.array_equal(sim.cost(), before)
    r = sim.step(np.ones(sim.n))
    assert np.allclose(r.endpoint_cost_per_million[aws], 3 * before[aws])
    assert np.array_equal(r.endpoint_cost_per_million[~aws], before[~aws])
    # Fleet cost is weighted by what was served, so an even split now costs more.
    assert r.cost_per_million > float(before @ np.ones(sim.n)) / sim.n


def test_flash_crowd_multiplies_demand_only_in_its_window() -> None:
    sc = load_scenario("flash_crowd")
    crowd, calm = RunSim(sc), FleetSim(_without_events(sc))
    for _ in range(600):
        t = crowd.t
        announced = crowd.demand_rps()
        r1, r2 = crowd.step(np.ones(8)), calm.step(np.ones(8))
        assert r1.demand_rps == announced
        expected = 1.6 if 200 <= t < 260 else 1.0
        assert r1.demand_rps / r2.demand_rps == pytest.approx(expected)


def test_brownout_moves_the_tail_not_the_median() -> None:
    sc = load_scenario("brownout")
    brown, clean = FleetSim(sc), FleetSim(_without_events(sc))
    i = brown.names.index("azure-eus-a")
    shares = brown.base_capacity_rps.copy()
    for _ in range(300):
        t = brown.t
        rb, rc = brown.step(shares), clean.step(shares)
        if t < 150:
            assert np.array_equal(rb.endpoint_p99_ms, rc.endpoint_p99_ms)
            # The fleet quantile grid is wider when a scenario has brownouts.
            assert rb.p99_ms == pytest.approx(rc.p99_ms, rel=brown.grid_ratio - 1)
            continue
        sojourn_p50 = rc.endpoint_p50_ms[i] - brown.base_latency_ms[i]
        assert abs(rb.endpoint_p50_ms[i] - rc.endpoint_p50_ms[i]) <= 0.25 * sojourn_p50
        grow99 = rb.endpoint_p99_ms[i] - rc.endpoint_p99_ms[i]
        grow95 = rb.endpoint_p95_ms[i] - rc.endpoint_p95_ms[i]
        assert 0.75 * 300 <= grow99 <= 300 and 0.75 * 300 <= grow95 <= 300
        assert rb.endpoint_error_rate[i] == rc.endpoint_error_rate[i]
        assert rb.p99_ms > rc.p99_ms + 50
        assert rb.p50_ms == pytest.approx(rc.p50_ms, rel=0.05)


def test_runs_past_duration_with_open_ended_events_in_force() -> None:
    sim = FleetSim("degrade")
    _run(sim, 600)
    assert sim.done
    i = sim.names.index("gcp-usc1-a")
    r = _run(sim, 50)[-1]
    assert r.capacity_rps[i] == 200 and sim.t == 650


# ------------------------------------------------------------------ shares


@pytest.mark.parametrize(
    ("shares", "fragment"),
    [
        ([0.5, math.nan], "NaN at index [1]"),
        ([-0.1, 1.1], "negative at index [0]"),
        ([math.inf, 1.0], "infinity"),
        ([0.0, 0.0], "sum to 0"),
        ([1.0, 0.0, 0.0], "shape (2,)"),
    ],
)
def test_bad_shares_are_rejected(shares: list[float], fragment: str) -> None:
    sim = _two()
    with pytest.raises(ValueError) as info:
        sim.step(np.array(shares))
    assert fragment in str(info.value)
    assert sim.t == 0, "a rejected step does not advance time"


def test_shares_are_normalised() -> None:
    a, b = _two(), _two()
    assert _same(a.step(np.array([3.0, 1.0])), b.step(np.array([0.75, 0.25])))


# ------------------------------------------------------------------ aggregates


@pytest.mark.parametrize("scenario", ["heterogeneous", "brownout", "failure", "many_endpoints"])
def test_all_traffic_on_one_endpoint_gives_its_quantiles(scenario: str) -> None:
    sim = RunSim(scenario)
    _run(sim, 200)
    rng = np.random.default_rng(0)
    for i in rng.choice(sim.n, size=min(sim.n, 8), replace=False):
        if not sim.available()[i]:
            continue
        shares = np.zeros(sim.n)
        shares[i] = 1.0
        r = sim.step(shares)
        tol = sim.grid_ratio - 1
        for agg, ep in (
            (r.p50_ms, r.endpoint_p50_ms[i]),
            (r.p95_ms, r.endpoint_p95_ms[i]),
            (r.p99_ms, r.endpoint_p99_ms[i]),
        ):
            assert agg == pytest.approx(ep, rel=tol)
        assert r.error_rate == pytest.approx(r.endpoint_error_rate[i])
        assert r.cost_per_million == pytest.approx(r.endpoint_cost_per_million[i])


_BASES = {name: load_scenario(name) for name in ("heterogeneous", "brownout", "failure")}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(_BASES)),
    start=st.sampled_from([0, 160, 320]),
    scale=st.floats(0.2, 2.5),
    raw=st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8).filter(lambda xs: sum(xs) > 1e-3),
)
def test_fleet_quantiles_are_ordered_and_between_endpoint_quantiles(
    name: str, start: int, scale: float, raw: list[float]
) -> None:
    base = _BASES[name]
    demand = base.demand.model_copy(update={"base_rps": base.demand.base_rps * scale})
    sim = FleetSim(base.model_copy(update={"demand": demand}))
    _run(sim, start)
    r = sim.step(np.array(raw))
    assert r.p50_ms <= r.p95_ms <= r.p99_ms
    used = r.offered_rps > 0
    tol = sim.grid_ratio
    for agg, ep in ((r.p50_ms, r.endpoint_p50_ms), (r.p95_ms, r.endpoint_p95_ms), (r.p99_ms, r.endpoint_p99_ms)):
        lo, hi = float(ep[used].min()), float(ep[used].max())
        assert lo / tol <= agg <= hi * tol
    assert 0.0 <= r.error_rate <= 1.0
    errs = r.endpoint_error_rate[used]
    assert errs.min() - 1e-12 <= r.error_rate <= errs.max() + 1e-12
    assert r.demand_rps == pytest.approx(float(r.offered_rps.sum()))
    assert math.isfinite(r.cost_per_million) and math.isfinite(r.max_utilization)


def test_all_traffic_on_a_dead_endpoint_still_gives_finite_aggregates() -> None:
    sim = FleetSim("failure")
    i = sim.names.index("aws-use1-a")
    _run(sim, 150)
    shares = np.zeros(sim.n)
    shares[i] = 1.0
    r = sim.step(shares)
    assert r.error_rate == 1.0
    assert r.p50_ms == pytest.approx(sim.base_latency_ms[i], rel=sim.grid_ratio - 1)
    assert r.cost_per_million == r.endpoint_cost_per_million[i], "priced at the offered split when nothing is served"
    assert r.max_utilization == 0.0


def test_results_cannot_corrupt_the_simulator() -> None:
    sim = RunSim("degrade")
    r = sim.step(np.ones(sim.n))
    with pytest.raises(ValueError):
        r.capacity_rps[0] = 1.0
    sim.capacity()[0] = 1.0
    sim.available()[0] = False
    assert sim.capacity()[0] == sim.base_capacity_rps[0] and sim.available()[0]


def test_load_scenario_accepts_a_path_object_for_a_shipped_name() -> None:
    assert FleetSim(Path("steady")).scenario == load_scenario("steady")


# ------------------------------------------------------------------ observation


def test_observation_matches_the_live_contract() -> None:
    sim = FleetSim("failure", obs_noise=0.0)
    _run(sim, 160)
    shares = np.ones(sim.n)
    shares[2] = 0.0
    r = sim.step(shares)
    obs = sim.observation(r, weights=np.arange(1, sim.n + 1))
    assert isinstance(obs, Observation)
    assert obs.source == "simulator" and obs.cluster == "failure"
    assert obs.addresses == sim.names
    assert obs.window_s == sim.step_s and obs.timestamp == r.t + sim.step_s
    e = obs.by_address()
    quiet = e[sim.names[2]]
    assert quiet.flags == {NO_TRAFFIC} and not quiet.usable
    assert math.isnan(quiet.p50_ms) and math.isnan(quiet.p95_ms) and math.isnan(quiet.error_rate)
    assert quiet.rps == 0 and quiet.saturation == 0
    dead = e["aws-use1-a"]
    assert dead.healthy is False and dead.error_rate == 1.0 and dead.saturation == 10.0
    alive = e[sim.names[1]]
    assert alive.healthy is True and alive.flags == frozenset() and alive.usable
    assert alive.p95_ms == r.endpoint_p95_ms[1] and alive.rps == r.offered_rps[1]
    assert alive.cost_per_million == r.endpoint_cost_per_million[1]
    assert [x.weight for x in obs.endpoints] == list(range(1, sim.n + 1))
    features, valid = obs.to_array()
    assert features.shape == (sim.n, 9)
    assert not valid[2, :3].any() and valid[1].all()


def test_observation_defaults_to_static_weights_and_noise_keeps_order() -> None:
    sim = FleetSim("heterogeneous", obs_noise=0.3)
    r = sim.step(np.ones(sim.n))
    obs = sim.observation(r)
    assert [x.weight for x in obs.endpoints] == [1.0] * sim.n
    p95 = np.array([x.p95_ms for x in obs.endpoints])
    assert not np.allclose(p95, r.endpoint_p95_ms), "noise is applied"
    assert np.allclose(p95, r.endpoint_p95_ms, rtol=2.0)
    assert all(x.p50_ms <= x.p95_ms and 0 <= x.error_rate <= 1 for x in obs.endpoints)
    with pytest.raises(ValueError, match="shape"):
        sim.observation(r, weights=np.ones(3))


# ------------------------------------------------------------------ servers, errors, load reports


def test_slots_lost_errors_and_a_client_timeout() -> None:
    events = [
        {"at_s": 10, "target": "b", "kind": "servers", "value": 0.5},
        {"at_s": 20, "target": "a", "kind": "errors", "value": 0.2},
    ]
    eps = [{**_ep("a", 100.0), "servers": 4, "service_cv": 0.5}, {**_ep("b", 400.0, cloud="gcp"), "servers": 8}]
    sc = _scenario(eps, 200.0, events).model_copy(update={"timeout_ms": 500.0})
    sim = RunSim(sc)
    before = _run(sim, 10, np.array([0.3, 0.7]))[-1]
    slots = _run(sim, 10, np.array([0.3, 0.7]))[-1]
    assert list(sim._seg.servers) == [4, 4] and sim.capacity()[1] == pytest.approx(200.0)
    assert slots.endpoint_p99_ms[1] > before.endpoint_p99_ms[1]  # the same work on half the slots
    errs = _run(sim, 5, np.array([0.3, 0.7]))[-1]
    assert errs.endpoint_error_rate[0] == pytest.approx(0.2 + BASE_ERROR)
    overloaded = sim.step(np.array([0.0, 1.0]))  # 200 rps on 200 rps of capacity
    assert overloaded.endpoint_p99_ms[1] <= 10.0 + 500.0 + 1e-9


def test_without_load_reports_observations_carry_no_saturation() -> None:
    sim = FleetSim(_scenario([_ep("a", 100.0), _ep("b", 1000.0, cloud="gcp")], 100.0), saturation=False)
    obs = sim.observation(sim.step(np.array([0.5, 0.5])))
    assert all(math.isnan(e.saturation) for e in obs.endpoints)
    assert all(e.inflight > 0 and e.rps > 0 for e in obs.endpoints)
