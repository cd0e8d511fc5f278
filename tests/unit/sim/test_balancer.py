"""Envoy's balancers: the split and, for the least-request ones, the waits they cause."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from balanceiq.policy.lp import least_request_weights
from balanceiq.sim.balancer import IN_FLIGHT_MAX, _arrivals, _chain, orca_weights, split
from balanceiq.sim.fleet import FleetSim
from balanceiq.sim.scenario import scenario_from_dict

CAP = np.array([100.0, 300.0, 50.0, 200.0])
SERVERS = np.array([1.0, 4.0, 1.0, 8.0])
UP = np.ones(4, dtype=bool)


def _erlang_c(c: int, a: float) -> float:
    """P(wait) in an M/M/c queue offered ``a`` erlangs."""
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b / (1.0 - a / c * (1.0 - b))


def test_round_robin_is_the_weights() -> None:
    w = np.array([0.1, 0.2, 0.3, 0.4])
    assert split("round_robin", w, 500.0, CAP, UP, SERVERS).shares is w


def test_two_choices_match_a_direct_count() -> None:
    """Each endpoint's share of requests by counting every ordered pair of draws."""
    rng = np.random.default_rng(3)
    x = rng.dirichlet(np.ones(6), size=4)
    want = np.zeros(4)
    for i in range(4):
        for j in range(4):
            for a in range(6):
                for b in range(6):
                    p = x[i, a] * x[j, b] / 16
                    if i == j or a < b:
                        want[i] += p
                    elif a == b:
                        want[i] += p / 2
                        want[j] += p / 2
                    else:
                        want[j] += p
    got = (x * _arrivals(x, 1.0, np.full(4, 0.25), equal=True)).sum(axis=1)
    assert got == pytest.approx(want, rel=1e-12)


def test_chains_are_in_detailed_balance() -> None:
    rate = np.random.default_rng(1).uniform(10, 200, size=(4, IN_FLIGHT_MAX))
    x = _chain(rate, SERVERS, CAP / SERVERS)
    k = np.arange(1, IN_FLIGHT_MAX)
    deaths = np.minimum(k[None, :], SERVERS[:, None]) * (CAP / SERVERS)[:, None]
    assert x[:, :-1] * rate[:, :-1] == pytest.approx(x[:, 1:] * deaths, rel=1e-9)
    assert x.sum(axis=1) == pytest.approx(1.0)


def test_two_choices_favour_big_endpoints_and_keep_queues_short() -> None:
    sp = split("least_request", np.full(4, 0.25), 400.0, CAP, UP, SERVERS)
    s = sp.shares
    assert s.sum() == pytest.approx(1.0)
    assert s[1] == s.max() and s[2] == s.min() and np.all(s >= 1 / 16)
    assert sp.p_wait is not None and sp.wait_ms is not None
    # Sent work when idle, an endpoint waits less often than one fed blindly at its load.
    for i in range(4):
        blind = _erlang_c(int(SERVERS[i]), s[i] * 400.0 / (CAP[i] / SERVERS[i]))
        assert sp.p_wait[i] < blind


def test_unequal_weights_steer_traffic() -> None:
    base = split("least_request", np.array([0.25, 0.25, 0.25, 0.24]), 300.0, CAP, UP, SERVERS).shares
    more = split("least_request", np.array([0.5, 0.2, 0.2, 0.1]), 300.0, CAP, UP, SERVERS).shares
    assert more[0] > base[0] and more[3] < base[3]
    assert more.sum() == pytest.approx(1.0)


def test_a_warm_start_gives_the_same_answer() -> None:
    state: dict[str, np.ndarray] = {}
    cold = split("least_request", np.full(4, 0.25), 350.0, CAP, UP, SERVERS, state).shares
    warm = split("least_request", np.full(4, 0.25), 350.0, CAP, UP, SERVERS, state).shares
    assert warm == pytest.approx(cold, abs=1e-6) and "chains" in state


def test_orca_weights_are_one_report_each_as_envoy_takes_it() -> None:
    """Envoy's weight is ``qps / utilisation`` of the endpoint's last report, an integer, at least 1,
    the median where no report came; the backends report slots in use (all of them while requests
    queue) and no errors."""
    load, rng = np.array([50.4, 150.0, 0.5, 0.0]), np.random.default_rng(0)
    busy = load / CAP
    one = orca_weights(load, CAP, np.ones(4), busy, np.zeros(4, bool), rng)
    assert one.tolist() == [50.0, 150.0, 1.0, 50.0]  # a one-slot backend always reports 1: its traffic
    queued = orca_weights(load, CAP, SERVERS, busy, np.ones(4, bool), rng)
    assert queued.tolist() == [50.0, 150.0, 1.0, 50.0]  # every slot in use behind a queue
    draws = np.array([orca_weights(load, CAP, SERVERS, busy, np.zeros(4, bool), rng) for _ in range(400)])
    busy = SERVERS[1] * load[1] / draws[:, 1]  # 1 + Binomial(3, 0.5) slots in use: 1..4, by chance
    assert set(np.round(busy).astype(int)) == {1, 2, 3, 4} and busy.mean() == pytest.approx(2.5, abs=0.15)
    assert np.all(draws == np.floor(draws)) and np.all(draws >= 1.0)


def test_cswrr_uses_its_weights_and_every_balancer_skips_down_endpoints() -> None:
    assert split("cswrr", CAP / CAP.sum(), 300.0, CAP, UP, SERVERS).shares == pytest.approx(CAP / CAP.sum())
    up = np.array([True, False, True, True])
    for name in ("cswrr", "least_request"):
        for w in (np.array([0.4, 0.1, 0.3, 0.2]), np.full(4, 0.25)):
            s = split(name, w, 200.0, CAP, up, SERVERS).shares
            assert s[1] == 0.0 and s.sum() == pytest.approx(1.0)


def test_no_demand_overload_and_unknown_balancers() -> None:
    s = split("least_request", np.array([0.5, 0.5, 0.0, 0.0]), 0.0, CAP, UP, SERVERS).shares
    assert s == pytest.approx([0.5, 0.5, 0.0, 0.0])
    s = split("least_request", np.full(4, 0.25), 1e5, CAP, UP, SERVERS).shares
    assert s.sum() == pytest.approx(1.0) and np.all(s > 0)
    with pytest.raises(ValueError, match="unknown balancer 'maglev'; known: round_robin, least_request, cswrr"):
        split("maglev", np.full(4, 0.25), 1.0, CAP, UP, SERVERS)


CAP3, SLOTS3 = np.array([100.0, 100.0, 50.0]), np.array([1, 4, 1])


def _three(demand: float) -> FleetSim:
    """One fast slot, four slots and one slow slot (100, 100 and 50 req/s), exponential service."""
    ep = {"cloud": "aws", "region": "r", "base_latency_ms": 1.0, "cost_per_million": 1.0}
    eps = [
        {**ep, "name": f"e{i}", "capacity_rps": float(c), "servers": int(s)}
        for i, (c, s) in enumerate(zip(CAP3, SLOTS3))
    ]
    demand_cfg = {"base_rps": demand, "diurnal_amplitude": 0.0, "noise": 0.0}
    return FleetSim(
        scenario_from_dict(
            {"name": "t", "duration_s": 30, "timeout_ms": 10_000, "endpoints": eps, "demand": demand_cfg}
        )
    )


def _envoy_edf(weights: np.ndarray, demand: float, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Envoy's weighted LEAST_REQUEST as its source has it (an EDF schedule; the picked host goes
    back in with ``weight / (active + 1)`` at pick time) before FIFO backends: shares and each
    endpoint's p99 (ms, the sim's 1 ms base included)."""
    rng = np.random.default_rng(3)
    active, free, queues = np.zeros(3, int), SLOTS3.copy(), [[], [], []]
    edf = [(1.0 / weights[i], i, i) for i in range(3)]
    events, order, lat = [(rng.exponential(1 / demand), 0, -1, 0.0)], 3, [[], [], []]
    while (ev := heapq.heappop(events))[0] < seconds:
        t, arrival, h, t0 = ev[0], ev[1] == 0, ev[2], ev[3]
        if arrival:
            deadline, _, h = heapq.heappop(edf)
            order += 1
            heapq.heappush(edf, (deadline + (active[h] + 1) / weights[h], order, h))
            active[h] += 1
            queues[h].append(t)
            heapq.heappush(events, (t + rng.exponential(1 / demand), 0, -1, 0.0))
        else:
            active[h] -= 1
            free[h] += 1
            lat[h].append(1.0 + 1000.0 * (t - t0))
        if free[h] and queues[h]:
            free[h] -= 1
            heapq.heappush(events, (t + rng.exponential(SLOTS3[h] / CAP3[h]), 1, h, queues[h].pop(0)))
    count = np.array([len(x) for x in lat], dtype=np.float64)
    return count / count.sum(), np.array([np.percentile(x, 99) for x in lat])


@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [0.6, 0.25, 0.15], [0.5, 0.3, 0.2]])
def test_weighted_least_request_matches_envoys_schedule_near_capacity(weights: list[float]) -> None:
    """At weights that fill the fast one-slot endpoint to 95-100 %, the chain's split and
    latency agree with a discrete-event run of Envoy's own algorithm: Envoy sends it less the
    more it holds, so its queue stays short (the blind-arrival overload, seconds, is wrong)."""
    w, sim = np.array(weights), _three(200.0)
    res = [sim.step(w, "least_request") for _ in range(2)][-1]
    shares, p99 = _envoy_edf(w, 200.0, 300.0)
    assert res.utilization[0] > 0.94
    assert res.offered_rps / 200.0 == pytest.approx(shares, abs=0.03)
    assert res.endpoint_p99_ms == pytest.approx(p99, rel=0.3)


def test_least_request_compensation_settles_near_capacity() -> None:
    """The controller scales each weight by the requests the endpoint holds (from its median
    latency); Envoy divides the weight by its active requests, the same requests. So the
    latency the simulator reports must agree with the in-flight count its balancer divides
    by (Little's law), and the loop settles instead of running away to the timeout."""
    demand = 0.95 * 250.0
    sim = _three(demand)
    target, held = np.array([0.4, 0.4, 0.2]), np.zeros(3)
    for _ in range(20):
        res = sim.step(least_request_weights(target, held, demand).astype(np.float64), "least_request")
        held = res.endpoint_p50_ms / 1000.0
        assert res.p99_ms < 1000.0
    chains = sim._lb_state["chains"]
    assert res.inflight == pytest.approx(chains @ np.arange(IN_FLIGHT_MAX), rel=0.1)
    assert res.offered_rps / demand == pytest.approx(target, abs=0.03)


def _fleet(eps: list[dict], rps: float, events: list[dict] | None = None) -> FleetSim:
    ep = {"cloud": "aws", "region": "r", "base_latency_ms": 1.0, "cost_per_million": 1.0, "service_cv": 0.3}
    eps = [{**ep, **e} for e in eps]
    demand = {"base_rps": rps, "diurnal_amplitude": 0.0, "noise": 0.0}
    cfg = {"name": "t", "duration_s": 60, "timeout_ms": 10_000, "endpoints": eps, "demand": demand}
    return FleetSim(scenario_from_dict({**cfg, "events": events or []}))


def _cswrr_fleet() -> FleetSim:
    """A one-slot endpoint (10 req/s) and a four-slot one (100 req/s) at 40 req/s."""
    eps = [{"name": "one", "capacity_rps": 10.0, "servers": 1}, {"name": "four", "capacity_rps": 100.0, "servers": 4}]
    return _fleet(eps, 40.0)


def test_cswrr_carries_the_backlog_of_its_blackout() -> None:
    """Envoy holds CSWRR at equal weights for its 10 s blackout: the one-slot endpoint gets 20 req/s
    against 10 and queues ~100 requests (its queue is unbounded). Its reports then say 1 (its traffic
    over a full slot), the four-slot one's more, so the weights shift, but the queue is still there:
    requests wait seconds behind it until it has drained at what it serves beyond what it gets."""
    sim = _cswrr_fleet()
    for _ in range(10):
        sim.step(np.ones(2), "cswrr")
    assert sim._backlog[0] == pytest.approx(100.0, abs=5.0) and sim._backlog[1] < 1.0
    left, p50 = [sim._backlog[0]], []
    for _ in range(40):
        res = sim.step(np.ones(2), "cswrr")
        left.append(sim._backlog[0])
        p50.append(res.endpoint_p50_ms[0])
        if min(left[-2:]) > 30.0:  # served at capacity while the queue is long
            assert left[-1] == pytest.approx(left[-2] + res.offered_rps[0] - 0.98 * 10.0)
        assert res.endpoint_p99_ms[1] < 200.0
    assert p50[0] > 5_000.0 and left[-1] < 2.0 and p50[-1] < 500.0
    assert p50[1] < p50[0] and p50[2] < p50[1]  # the wait is the queue ahead: it falls as it drains


def test_cswrr_queues_settle_to_equilibrium_and_take_time_to_build() -> None:
    """At a steady load each endpoint's queue is the M/G/c equilibrium the other balancers assume; one
    second at 110 % of capacity adds the ~10 requests that second brings, not the equilibrium queue of
    a saturated endpoint (seconds) nor the overload ramp."""
    burst = [{"at_s": 20, "duration_s": 1, "target": "all", "kind": "demand", "value": 1.1 / 0.7}]
    one = [{"name": "a", "capacity_rps": 100.0, "servers": 4}]
    cs, rr = (
        [sim.step(np.ones(1), b) for _ in range(22)]
        for b, sim in (("cswrr", _fleet(one, 70.0, burst)), ("round_robin", _fleet(one, 70.0, burst)))
    )
    assert cs[19].endpoint_p99_ms[0] == pytest.approx(rr[19].endpoint_p99_ms[0], rel=0.01)
    assert rr[20].endpoint_p99_ms[0] > 5_000.0 and 150.0 < cs[20].endpoint_p99_ms[0] < 600.0
    assert rr[21].endpoint_p99_ms[0] < cs[21].endpoint_p99_ms[0] < cs[20].endpoint_p99_ms[0]


def test_round_robin_and_least_request_keep_no_backlog() -> None:
    for balancer in ("round_robin", "least_request"):
        sim = _cswrr_fleet()
        for _ in range(12):
            sim.step(np.ones(2), balancer)
        assert not sim._backlog.any()
