"""Sample testbed backend: real sockets on 127.0.0.1, real aiohttp client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from balanceiq.exceptions import ConfigError
from balanceiq_lab.errors import BackendError
from balanceiq_lab.testbed.backend import (
    ORCA_HEADER,
    Backend,
    BackendSettings,
    main,
    run_backends,
)

# Slack for scheduler noise on a busy CI machine; still far below the effects tested.
# Upper bounds only separate "queued" from "not queued"; generous, because a busy CI
# machine delays event loops by tens of ms (speed itself is benchmarked, not tested).
MARGIN_S = 0.5


def make_settings(**overrides: Any) -> BackendSettings:
    values: dict[str, Any] = {
        "name": "b1",
        "port": 0,
        "cloud": "aws",
        "region": "us-east-1",
        "base_latency_ms": 0.0,
        "jitter_ms": 0.0,
        "concurrency": 64,
    }
    values.update(overrides)
    return BackendSettings(**values)


@contextlib.asynccontextmanager
async def running(**overrides: Any) -> AsyncIterator[Backend]:
    backend = Backend(make_settings(**overrides))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def get_status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def scrape(session: aiohttp.ClientSession, backend: Backend) -> dict[tuple, float]:
    """Samples keyed by (sample name, sorted labels)."""
    async with session.get(backend.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def parse_orca_text(value: str) -> dict[str, float]:
    """Parse the way Envoy's ORCA parser does: 'TEXT ' prefix, ',' entries, 'k:v' pairs."""
    assert value.startswith("TEXT ")
    out = {}
    for entry in value[len("TEXT ") :].split(","):
        key, _, raw = entry.strip().partition(":")
        assert key and raw, entry
        assert key not in out, f"duplicate {key}"
        out[key] = float(raw)
    return out


async def test_latency_is_at_least_base_and_not_much_more(session):
    async with running(base_latency_ms=30, jitter_ms=1.0) as b:
        await get_status(session, b.url)  # connection setup is not what is measured
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            async with session.get(b.url + "/") as resp:
                body = await resp.json()
                assert resp.status == 200
                assert resp.headers["x-backend"] == "b1"
            times.append(time.perf_counter() - t0)
        assert body == {"backend": "b1", "cloud": "aws", "region": "us-east-1", "port": b.port}
        assert min(times) >= 0.030
        assert sorted(times)[len(times) // 2] < 0.031 + MARGIN_S


async def test_concurrency_limit_queues_requests(session):
    async with running(base_latency_ms=50, concurrency=2) as b:
        await get_status(session, b.url + "/healthz")
        max_queue = 0.0

        async def poll_queue(done: asyncio.Event) -> None:
            nonlocal max_queue
            while not done.is_set():
                samples = await scrape(session, b)
                max_queue = max(max_queue, samples[("backend_queue_depth", (("backend", "b1"),))])
                await asyncio.sleep(0.01)

        done = asyncio.Event()
        poller = asyncio.create_task(poll_queue(done))
        t0 = time.perf_counter()
        codes = await asyncio.gather(*(get_status(session, b.url + "/work") for _ in range(6)))
        elapsed = time.perf_counter() - t0
        done.set()
        await poller

        assert codes == [200] * 6
        # 6 requests through 2 slots of 50 ms: at least three waves.
        assert elapsed >= 0.150
        assert max_queue > 0
        samples = await scrape(session, b)
        key = (("backend", "b1"), ("code", "200"))
        assert samples[("backend_request_duration_seconds_count", key)] == 6
        # Durations count from arrival, so queueing shows: 2x50 + 2x100 + 2x150 ms.
        assert samples[("backend_request_duration_seconds_sum", key)] >= 0.59
        assert samples[("backend_queue_depth", (("backend", "b1"),))] == 0
        assert samples[("backend_inflight_requests", (("backend", "b1"),))] == 0


async def test_raising_concurrency_admits_queued_requests(session):
    async with running(base_latency_ms=400, concurrency=1) as b:
        await get_status(session, b.url + "/healthz")
        t0 = time.perf_counter()
        work = asyncio.gather(*(get_status(session, b.url) for _ in range(3)))
        await asyncio.sleep(0.05)
        async with session.post(b.url + "/control", json={"concurrency": 3}) as resp:
            assert resp.status == 200
        assert await work == [200] * 3
        # Serial would take 1.2 s; after the resize the two waiters run together (~0.45 s).
        assert time.perf_counter() - t0 < 0.450 + MARGIN_S


async def test_error_rate_one_fails_everything(session):
    async with running(error_rate=1.0) as b:
        for _ in range(20):
            async with session.get(b.url + "/x") as resp:
                assert resp.status == 503
                assert resp.headers["x-backend"] == "b1"
        samples = await scrape(session, b)
        assert samples[("backend_requests_total", (("backend", "b1"), ("code", "503")))] == 20
        assert samples.get(("backend_requests_total", (("backend", "b1"), ("code", "200")))) == 0


async def test_seeded_error_rate_is_close_and_reproducible(session):
    async def count_errors() -> int:
        async with running(error_rate=0.2, seed=1234) as b:
            codes = await asyncio.gather(*(get_status(session, b.url) for _ in range(500)))
        assert set(codes) <= {200, 503}
        return codes.count(503)

    first = await count_errors()
    assert 0.12 <= first / 500 <= 0.28
    assert await count_errors() == first


async def test_metrics_exposition(session):
    async with running(
        name="m1", cloud="gcp", region="europe-west1", cost_per_million_requests=0.4, concurrency=8
    ) as b:
        for _ in range(5):
            assert await get_status(session, b.url) == 200
        async with session.post(b.url + "/control", json={"error_rate": 1.0}) as resp:
            assert resp.status == 200
        for _ in range(3):
            assert await get_status(session, b.url + "/api/v1/thing") == 503

        async with session.get(b.url + "/metrics") as resp:
            assert resp.content_type == "text/plain"
            text = await resp.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["backend_request_duration_seconds"].type == "histogram"
        assert families["backend_requests"].type == "counter"

        samples = await scrape(session, b)
        bl = ("backend", "m1")
        counts = {
            code: samples[("backend_request_duration_seconds_count", (bl, ("code", code)))] for code in ("200", "503")
        }
        assert counts == {"200": 5, "503": 3}
        assert samples[("backend_requests_total", (bl, ("code", "200")))] == 5
        bounds = {dict(labels)["le"] for name, labels in samples if name == "backend_request_duration_seconds_bucket"}
        assert {"0.005", "0.01", "0.015", "0.05", "0.5", "5.0", "+Inf"} <= bounds
        assert samples[("backend_concurrency_limit", (bl,))] == 8
        assert samples[("backend_cost_per_million_requests", (bl,))] == 0.4
        info = (bl, ("cloud", "gcp"), ("region", "europe-west1"))
        assert samples[("backend_info", info)] == 1
        assert samples[("backend_inflight_requests", (bl,))] == 0
        # /metrics, /healthz and /control are not counted as served traffic.
        assert sum(counts.values()) == 8


async def test_two_backends_keep_separate_registries(session):
    async with running(name="a") as a, running(name="b") as b:
        await get_status(session, a.url)
        samples = await scrape(session, b)
        assert not any(dict(labels).get("backend") == "a" for _, labels in samples)
        assert samples[("backend_requests_total", (("backend", "b"), ("code", "200")))] == 0


async def test_control_get_and_post(session):
    async with running(base_latency_ms=1, seed=3) as b:
        async with session.get(b.url + "/control") as resp:
            state = await resp.json()
        assert state["name"] == "b1"
        assert state["port"] == b.port
        assert state["healthy"] is True
        assert state["seed"] == 3

        update = {
            "base_latency_ms": 2.5,
            "error_rate": 1,
            "orca": True,
            "tail_prob": 0.1,
            "tail_ms": 200,
            "extra_latency_ms": 3,
            "cost_per_million_requests": 1.5,
        }
        async with session.post(b.url + "/control", json=update) as resp:
            assert resp.status == 200
            posted = await resp.json()
        async with session.get(b.url + "/control") as resp:
            state = await resp.json()
        assert posted == state
        for key, value in update.items():
            assert state[key] == value
        assert b.settings.error_rate == 1
        assert await get_status(session, b.url) == 503


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"jitter_ms": 3, "error_rate": 1.5}, "error_rate"),
        ({"jitter_ms": 3, "bogus": 1}, "bogus"),
        ({"concurrency": "4"}, "concurrency"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 2.5}, "concurrency"),
        ({"base_latency_ms": True}, "base_latency_ms"),
        ({"base_latency_ms": -1}, "base_latency_ms"),
        ({"tail_prob": None}, "tail_prob"),
        ({"orca": 1}, "orca"),
        ({"healthy": "no"}, "healthy"),
        ({"name": "other"}, "name"),
        ([1, 2], ""),
        ("not json", ""),
    ],
)
async def test_control_rejects_invalid_update_atomically(session, body, field):
    async with running() as b:
        async with session.get(b.url + "/control") as resp:
            before = await resp.json()
        data = body if isinstance(body, str) else json.dumps(body)
        async with session.post(b.url + "/control", data=data) as resp:
            assert resp.status == 400
            err = await resp.json()
        assert err["field"] == field
        if field:
            assert field in err["error"]
        async with session.get(b.url + "/control") as resp:
            assert await resp.json() == before


async def test_healthz_toggles(session):
    async with running() as b:
        async with session.get(b.url + "/healthz") as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
        async with session.post(b.url + "/control", json={"healthy": False}) as resp:
            assert resp.status == 200
        assert await get_status(session, b.url + "/healthz") == 503
        # Unhealthy is a probe signal only; traffic is still served.
        assert await get_status(session, b.url) == 200
        async with session.post(b.url + "/control", json={"healthy": True}) as resp:
            assert resp.status == 200
        assert await get_status(session, b.url + "/healthz") == 200


async def test_orca_header(session):
    async with running(concurrency=4) as b:
        async with session.get(b.url) as resp:
            assert ORCA_HEADER not in resp.headers
        async with session.post(b.url + "/control", json={"orca": True}) as resp:
            assert resp.status == 200
        async with session.get(b.url) as resp:
            raw = resp.headers[ORCA_HEADER]
        assert re.fullmatch(
            r"TEXT cpu_utilization:[0-9.]+,rps_fractional:[0-9.]+,application_utilization:[0-9.]+",
            raw,
        )
        report = parse_orca_text(raw)
        assert set(report) == {"cpu_utilization", "rps_fractional", "application_utilization"}
        assert report["cpu_utilization"] == pytest.approx(0.25)  # itself, 1 of 4 slots
        assert report["application_utilization"] == report["cpu_utilization"]
        assert report["rps_fractional"] >= 1.0

        # Shrinking the limit under load must still report utilisation clipped to 1.
        async with session.post(b.url + "/control", json={"base_latency_ms": 60, "concurrency": 4}) as resp:
            assert resp.status == 200

        async def orca_of_one() -> dict[str, float]:
            async with session.get(b.url) as resp:
                return parse_orca_text(resp.headers[ORCA_HEADER])

        pending = asyncio.gather(*(orca_of_one() for _ in range(4)))
        await asyncio.sleep(0.02)
        async with session.post(b.url + "/control", json={"concurrency": 1}) as resp:
            assert resp.status == 200
        reports = await pending
        assert all(0.0 <= r["cpu_utilization"] <= 1.0 for r in reports)
        assert max(r["cpu_utilization"] for r in reports) == 1.0


async def test_port_in_use_raises_backend_error():
    async with running() as first:
        second = Backend(make_settings(name="b2", port=first.port))
        with pytest.raises(BackendError, match=f"127.0.0.1:{first.port}") as info:
            await second.start()
        assert isinstance(info.value.__cause__, OSError)
        assert not second.started
        await second.stop()  # harmless when never started


async def test_run_backends_starts_all_or_none(session):
    backends = await run_backends([make_settings(name="x1"), make_settings(name="x2")])
    try:
        assert len({b.url for b in backends}) == 2
        for b in backends:
            async with session.get(b.url) as resp:
                assert (await resp.json())["backend"] == b.settings.name
    finally:
        for b in backends:
            await b.stop()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    async with running(name="holder") as holder:
        with pytest.raises(BackendError):
            await run_backends([make_settings(name="ok", port=free_port), make_settings(port=holder.port)])
    # The backend that did start was stopped again, so its port is free.
    with socket.socket() as again:
        again.bind(("127.0.0.1", free_port))


def test_settings_validation():
    with pytest.raises(ConfigError) as info:
        make_settings(error_rate=2.0, concurrency=0)
    assert {p for p, _ in info.value.problems} == {"error_rate", "concurrency"}
    with pytest.raises(ConfigError) as info:
        BackendSettings.from_dict({"name": "a", "bogus": 1}, source="spec")
    fields = {p for p, _ in info.value.problems}
    assert "bogus" in fields and "port" in fields


def test_backend_copies_settings():
    settings = make_settings()
    backend = Backend(settings)
    backend.apply({"error_rate": 0.5})
    assert settings.error_rate == 0.0


def test_main_rejects_bad_spec_and_taken_port(capsys):
    assert main(["--spec", "[]"]) == 2
    assert main(["--spec", '[{"name": "a"}]']) == 2
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = [
            "--name",
            "b",
            "--port",
            str(port),
            "--cloud",
            "aws",
            "--region",
            "r",
            "--latency-ms",
            "1",
            "--concurrency",
            "1",
        ]
        assert main(args) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err


async def _run_cli(args: list[str], n_ready: int, session: aiohttp.ClientSession) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "balanceiq_lab.testbed.backend",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=os.getcwd(),
    )
    try:
        urls = []
        for _ in range(n_ready):
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
            assert line.startswith(b"ready "), (line, await proc.stderr.read())
            urls.append(line.decode().split()[1])
        for url in urls:
            async with session.get(url) as resp:
                assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=10)
        assert proc.returncode == 0, err.decode()
        assert out == b""
        return urls
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def test_cli_single_backend_ready_and_sigterm(session):
    args = [
        "--name",
        "c1",
        "--port",
        "0",
        "--cloud",
        "aws",
        "--region",
        "us-east-1",
        "--latency-ms",
        "2",
        "--concurrency",
        "4",
        "--error-rate",
        "0",
        "--cost",
        "0.4",
        "--orca",
    ]
    [url] = await _run_cli(args, 1, session)
    assert url.startswith("http://127.0.0.1:")


async def test_cli_spec_runs_several_backends(session):
    spec = [
        {"name": f"s{i}", "port": 0, "cloud": c, "region": "r1", "base_latency_ms": 1, "concurrency": 4}
        for i, c in enumerate(["aws", "gcp", "azure"])
    ]
    urls = await _run_cli(["--spec", json.dumps(spec)], 3, session)
    assert len(set(urls)) == 3
