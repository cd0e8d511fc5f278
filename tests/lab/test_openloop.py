"""The open-loop generator: the schedule, latency from the intended send time, errors
counted (never dropped), and its own overhead. In-process backends, no Envoy: fast."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from balanceiq.testbed.ports import free_ports
from balanceiq_lab.errors import BenchError
from balanceiq_lab.openloop import (
    NOT_SENT,
    TRANSPORT_ERROR,
    OpenLoopResult,
    arrival_schedule,
    latency_summary,
    run_open_loop,
)
from balanceiq_lab.testbed.backend import Backend, BackendSettings


def _backend(name: str = "b1", *, latency_ms: float = 0.0, concurrency: int = 1000, error_rate: float = 0.0) -> Backend:
    return Backend(
        BackendSettings(
            name=name,
            port=0,
            cloud="aws",
            region="r",
            base_latency_ms=latency_ms,
            jitter_ms=0.0,
            concurrency=concurrency,
            error_rate=error_rate,
            seed=1,
        )
    )


def fifo_latencies(intended_s: np.ndarray, service_s: float) -> np.ndarray:
    """One FIFO server, constant service time, empty at the start: each request's
    completion minus its intended send time (ms). What an honest generator must see."""
    done = 0.0
    out = []
    for t in intended_s:
        done = max(t, done) + service_s
        out.append((done - t) * 1000)
    return np.array(out)


# -- the schedule -----------------------------------------------------------------------------


def test_constant_schedule_is_exact() -> None:
    s = arrival_schedule(50, 2.0, arrivals="constant")
    assert len(s) == 100
    assert s[0] == 0.0 and np.allclose(np.diff(s), 0.02) and s[-1] < 2.0
    assert len(arrival_schedule(3, 1.0, arrivals="constant")) == 3  # 0, 1/3, 2/3


def test_poisson_schedule_is_seeded_and_has_the_rate() -> None:
    a = arrival_schedule(200, 50.0, arrivals="poisson", seed=7)
    b = arrival_schedule(200, 50.0, arrivals="poisson", seed=7)
    c = arrival_schedule(200, 50.0, arrivals="poisson", seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a[:100], c[:100])
    assert np.all(np.diff(a) >= 0) and a[0] >= 0 and a[-1] < 50.0
    # 10,000 expected arrivals: the count is within 4 sigma, and gaps are exponential (CV ~ 1).
    assert abs(len(a) - 10_000) < 4 * 100
    gaps = np.diff(a)
    assert abs(gaps.mean() - 1 / 200) < 0.0003
    assert 0.95 < gaps.std() / gaps.mean() < 1.05


@pytest.mark.parametrize(
    ("rate", "duration", "arrivals", "needle"),
    [
        (0, 1, "constant", "rate"),
        (-1, 1, "poisson", "rate"),
        (float("nan"), 1, "poisson", "rate"),
        (10, 0, "constant", "duration"),
        (10, 1, "bursty", "arrivals"),
        (1e6, 1e3, "constant", "at most"),
    ],
)
def test_bad_schedules_are_refused(rate: float, duration: float, arrivals: str, needle: str) -> None:
    with pytest.raises(BenchError, match=needle):
        arrival_schedule(rate, duration, arrivals=arrivals)


def test_latency_summary_handles_empty_and_nan() -> None:
    assert latency_summary([])["p99"] is None
    s = latency_summary([1.0, float("nan"), 3.0])
    assert s["n"] == 2 and s["max"] == 3.0 and s["p50"] == 2.0


# -- what one run measures ------------------------------------------------------------------------


async def test_fixed_delay_shows_up_in_every_latency() -> None:
    async with _backend(latency_ms=40.0) as b:
        res = await run_open_loop(b.url + "/", arrival_schedule(50, 1.0, arrivals="constant"))
    assert len(res) == 50 and res.ok.all() and (res.status == 200).all()
    assert res.backend_names() == ["b1"] * 50
    assert res.latency_ms.min() >= 40.0 and np.median(res.latency_ms) < 40.0 + 15.0
    s = res.summary()
    assert s["errors"] == 0 and s["error_rate"] == 0.0 and 40.0 <= s["latency_ms"]["p50"] < 55.0


async def test_queueing_is_measured_from_the_intended_send_time() -> None:
    """Coordinated omission: a backend that serves one request at a time, 40 ms each,
    offered 50 req/s, falls behind by 20 ms per request. Every queued request's latency
    must include its wait (request i: ~40 + 20 i ms), not just its 40 ms of service."""
    schedule = arrival_schedule(50, 1.0, arrivals="constant")
    async with _backend(latency_ms=40.0, concurrency=1) as b:
        res = await run_open_loop(b.url + "/", schedule)
    assert res.ok.all()
    # The real service time is the 40 ms sleep plus a little (timer slack, HTTP): take it
    # from the spacing of completions, which a FIFO server at capacity sets.
    service_s = float(np.median(np.diff(np.sort(res.completed_s))))
    assert 0.040 <= service_s < 0.060
    expected = fifo_latencies(schedule, service_s)
    assert expected[-1] > 1000  # the last one waited ~1 s
    # Lower bound, whatever the box does: a FIFO server needing >= 40 ms per request
    # cannot answer request i sooner than the queue model with 40 ms allows, so a
    # generator that timed from its own (late) send would fall below it.
    assert np.all(res.latency_ms >= fifo_latencies(schedule, 0.040) - 5.0)
    # Upper bound: the model plus the stalls of a loaded box (a stall delays the whole
    # queue behind it by the same amount).
    assert (res.latency_ms - expected).max() < 250.0, (res.latency_ms[-5:], expected[-5:])
    # A closed-loop view (latency = service only) would have reported ~40 ms throughout.
    assert np.percentile(res.latency_ms, 90) > 800
    # Each was sent (nearly) on time, so the wait is the backend's queue, and it is in the number.
    assert np.percentile(res.schedule_lag_ms(), 99) < 50.0


async def test_requests_beyond_max_inflight_are_errors_not_dropped() -> None:
    schedule = arrival_schedule(100, 0.5, arrivals="constant")  # 50 requests, 10 ms apart
    async with _backend(latency_ms=1000.0) as b:
        res = await run_open_loop(b.url + "/", schedule, max_inflight=3, timeout_s=2.0)
    assert len(res) == 50
    not_sent = res.status == NOT_SENT
    # The first 3 went out; every later one (all due within 0.5 s) found 3 outstanding.
    assert int((~not_sent).sum()) == 3 and int(not_sent.sum()) == 47
    assert np.all(np.isnan(res.sent_s[not_sent])) and np.all(res.latency_ms[not_sent] == 2000.0)
    s = res.summary()
    assert s["errors"] == 47 and s["error_kinds"] == {"not_sent_max_inflight": 47}
    assert res.overhead()["not_sent"] == 47 and res.peak_inflight == 3


async def test_backend_errors_and_transport_errors_are_counted() -> None:
    async with _backend(error_rate=1.0) as b:
        res = await run_open_loop(b.url + "/", arrival_schedule(100, 0.2, arrivals="constant"))
    assert (res.status == 503).all() and res.summary()["errors"] == 20
    assert res.summary()["error_kinds"] == {"HTTP 503": 20} and res.backend_names()[0] == "b1"
    dead = free_ports(1)[0]  # nothing listens there
    res = await run_open_loop(f"http://127.0.0.1:{dead}/", arrival_schedule(100, 0.1, arrivals="constant"))
    assert (res.status == TRANSPORT_ERROR).all() and res.summary()["error_rate"] == 1.0
    assert res.error_kinds and all(e >= 0 for e in res.error.tolist())
    assert np.all(res.backend == -1)


async def test_the_schedule_starts_at_start_wall_and_lag_is_small() -> None:
    async with _backend() as b:
        start = time.time() + 0.3
        res = await run_open_loop(b.url + "/", arrival_schedule(100, 1.0, arrivals="poisson", seed=3), start_wall=start)
    assert res.start_wall == start
    assert np.nanmin(res.sent_s) >= res.intended_s[0] - 1e-6  # nothing left before its time
    lag = res.schedule_lag_ms()
    assert lag.min() >= 0 and np.percentile(lag, 50) < 5.0
    o = res.overhead()
    assert o["cpu_ms_per_request"] is not None and o["cpu_ms_per_request"] > 0
    assert o["schedule_lag_ms"]["p99"] is not None


async def test_stop_ends_the_schedule_and_keeps_only_what_was_due() -> None:
    """A fault test runs load until its fault has played out, not for a fixed time."""
    import asyncio
    import threading

    stop = threading.Event()
    async with _backend() as b:
        task = asyncio.ensure_future(
            run_open_loop(b.url + "/", arrival_schedule(100, 30.0, arrivals="constant"), stop=stop)
        )
        await asyncio.sleep(0.5)
        stop.set()
        t = time.monotonic()
        res = await asyncio.wait_for(task, 5)
    assert time.monotonic() - t < 1.0  # not the 30 s schedule
    # ~50 of the 3,000 were due; every array is cut to them, and they all completed.
    assert 20 <= len(res) <= 80 and len(res.status) == len(res.latency_ms) == len(res.sent_s) == len(res)
    assert res.ok.all() and res.intended_s[-1] < 1.0


async def test_only_loopback() -> None:
    with pytest.raises(BenchError, match="loopback"):
        await run_open_loop("http://192.0.2.1:80/", [0.0])
    with pytest.raises(BenchError, match="non-decreasing"):
        await run_open_loop("http://127.0.0.1:1/", [0.2, 0.1])


async def test_json_round_trip() -> None:
    async with _backend(error_rate=0.5) as b:
        res = await run_open_loop(b.url + "/", arrival_schedule(100, 0.2, arrivals="constant"))
    back = OpenLoopResult.from_json(json.loads(json.dumps(res.to_json())))
    assert np.array_equal(back.status, res.status) and np.array_equal(back.backend, res.backend)
    assert np.allclose(back.latency_ms, res.latency_ms, atol=1e-3) and back.backends == res.backends
    assert back.summary()["errors"] == res.summary()["errors"]
    assert back.error_kinds == res.error_kinds and back.start_wall == res.start_wall


def test_cli_runs_in_its_own_process(tmp_path: Path) -> None:
    """``python -m balanceiq_lab.openloop``: ready, t=0 from stdin, result as JSON."""
    from balanceiq_lab.testbed.testbed import BackendsProcess

    spec = [
        {
            "name": "zero",
            "host": "127.0.0.1",
            "port": free_ports(1)[0],
            "cloud": "aws",
            "region": "r",
            "base_latency_ms": 5.0,
            "jitter_ms": 0.0,
            "concurrency": 100,
        }
    ]
    bp = BackendsProcess(spec, tmp_path / "b").start()
    try:
        out = tmp_path / "res.json"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "balanceiq_lab.openloop",
                "--url",
                bp.urls[0] + "/",
                "--rate",
                "100",
                "--duration",
                "0.5",
                "--arrivals",
                "constant",
                "--start-at",
                "-",
                "--out",
                str(out),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        start = time.time() + 0.2
        out_text, _ = proc.communicate(f"{start!r}\n", timeout=30)
        assert proc.returncode == 0, out_text
        res = OpenLoopResult.from_json(json.loads(out.read_text()))
        assert len(res) == 50 and res.ok.all() and res.start_wall == start and res.arrivals == "constant"
        assert res.latency_ms.min() >= 5.0
    finally:
        bp.stop()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "balanceiq_lab.openloop",
            "--url",
            "http://10.0.0.1/",
            "--rate",
            "1",
            "--duration",
            "1",
            "--out",
            str(tmp_path / "x.json"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "loopback" in bad.stderr
