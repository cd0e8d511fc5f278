"""The M/G/c latency model against closed forms and a discrete-event queue."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest

from balanceiq.sim import queue

LEVELS = np.array([0.5, 0.95, 0.99])


def _q(cap: float, servers: int, cv: float, load: float, tail_prob: float = 0.0, tail_ms: float = 0.0, **kw: float):
    one = lambda x: np.array([float(x)])  # noqa: E731
    ev = kw.get("event_tail_ms")
    tail = None if ev is None else (one(ev), one(queue.TAIL_FRACTION))
    return queue.build(one(cap), one(servers), one(cv), one(tail_prob), one(tail_ms), one(load), tail)


def _simulate(servers: int, core_ms: float, cv: float, tail_prob: float, tail_ms: float, rate: float) -> np.ndarray:
    """Sojourn times (ms) of a FIFO queue with ``servers`` slots, Poisson arrivals."""
    rng = np.random.default_rng(7)
    n = 200_000
    arrivals = np.cumsum(rng.exponential(1000.0 / rate, n))
    exp_ms = cv * core_ms
    service = (core_ms - exp_ms) + rng.exponential(exp_ms, n) + (rng.random(n) < tail_prob) * tail_ms
    free = [0.0] * servers
    out = np.empty(n)
    for i in range(n):
        start = max(heapq.heappop(free), arrivals[i])
        heapq.heappush(free, start + service[i])
        out[i] = start + service[i] - arrivals[i]
    return out[n // 10 :]


def test_one_exponential_server_is_the_mm1_sojourn_exactly() -> None:
    q = _q(100.0, 1, 1.0, 50.0)
    rate = 100 * 0.5 / 1000
    assert queue.quantiles(q, LEVELS)[0] == pytest.approx([-math.log(1 - p) / rate for p in LEVELS], rel=1e-9)
    assert queue.mean(q)[0] == pytest.approx(1 / rate, rel=1e-9)


@pytest.mark.parametrize(
    ("servers", "core_ms", "cv", "tail_prob", "tail_ms", "util", "rel"),
    [
        (8, 20.0, 0.5, 0.0, 0.0, 0.8, 0.12),
        (4, 10.0, 1.0, 0.0, 0.0, 0.9, 0.12),
        (1, 20.0, 0.5, 0.0, 0.0, 0.7, 0.12),
        # A rare slow tail makes waits bursty, which Allen-Cunneen only averages.
        (8, 20.0, 0.5, 0.03, 300.0, 0.7, 0.3),
    ],
)
def test_multi_server_queues_match_a_discrete_event_queue(
    servers: int, core_ms: float, cv: float, tail_prob: float, tail_ms: float, util: float, rel: float
) -> None:
    cap = 1000.0 * servers / (core_ms + tail_prob * tail_ms)
    q = _q(cap, servers, cv, util * cap, tail_prob, tail_ms)
    got = queue.quantiles(q, LEVELS)[0]
    want = np.percentile(_simulate(servers, core_ms, cv, tail_prob, tail_ms, util * cap), [50, 95, 99])
    assert got == pytest.approx(want, rel=rel)
    # The M/M/1 model it replaces overstates a multi-slot backend's p95 by far more.
    mm1 = -math.log(0.05) / (cap * (1 - util) / 1000)
    if servers > 1:
        assert abs(got[1] - want[1]) < 0.5 * abs(mm1 - want[1])


def test_quantiles_rise_with_load_and_stop_at_the_timeout() -> None:
    loads = np.linspace(1.0, 150.0, 80)
    rows = np.array([queue.quantiles(_q(100.0, 4, 0.6, x), LEVELS)[0] for x in loads])
    assert np.all(np.diff(rows, axis=0) >= -1e-9)
    assert np.all(rows[:, 0] <= rows[:, 1]) and np.all(rows[:, 1] <= rows[:, 2])
    assert rows[-1] == pytest.approx([queue.TIMEOUT_MS] * 3)
    assert rows.max() <= queue.TIMEOUT_MS


def test_a_tail_event_moves_the_tail_not_the_median() -> None:
    clean = queue.quantiles(_q(100.0, 4, 0.6, 50.0), LEVELS)[0]
    slow = queue.quantiles(_q(100.0, 4, 0.6, 50.0, event_tail_ms=300.0), LEVELS)[0]
    assert slow[0] == pytest.approx(clean[0], rel=0.25)
    assert 0.75 * 300 <= slow[2] - clean[2] <= 300


def test_survival_and_mean_agree() -> None:
    q = _q(200.0, 8, 0.4, 170.0, 0.02, 150.0)
    x = np.linspace(0.0, queue.TIMEOUT_MS, 200_001)
    s = queue.survival(q, x[None, :])[0]
    assert np.all(np.diff(s) <= 1e-12) and s[0] == pytest.approx(1.0) and s[-1] == 0.0
    assert queue.mean(q)[0] == pytest.approx(np.trapezoid(s, x), rel=1e-3)


def test_a_balancers_waits_replace_the_overload_and_only_the_excess_times_out() -> None:
    """With a least-request balancer's waits, utilisation near 1 adds nothing to them (the
    balancer holds the queue where the chain says); past capacity the excess, and only it,
    waits out the timeout (the backends' queues are unbounded)."""
    one = lambda x: np.array([float(x)])  # noqa: E731
    wait = (one(0.4), one(30.0))

    def q(load: float) -> queue.Queue:
        return queue.build(one(100.0), one(4), one(0.6), one(0.0), one(0.0), one(load), wait=wait)

    calm, full = queue.quantiles(q(50.0), LEVELS)[0], queue.quantiles(q(99.0), LEVELS)[0]
    assert full == pytest.approx(calm, rel=1e-12)
    over = q(125.0)  # a fifth of its requests have nowhere to go
    got = queue.quantiles(over, LEVELS)[0]
    assert got[0] < 2 * calm[0] and got[2] == pytest.approx(queue.TIMEOUT_MS)
    assert queue.mean(over)[0] == pytest.approx(0.8 * queue.mean(q(50.0))[0] + 0.2 * queue.TIMEOUT_MS, rel=1e-9)
