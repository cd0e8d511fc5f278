"""ALS latency against a real Envoy, real sample backends, the ALS exporter and an in-process xDS server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from balanceiq.config import Settings
from balanceiq.telemetry.observation import quantile_from_buckets
from balanceiq_lab.stack import Stack
from balanceiq_lab.testbed.load import run_load_sync
from balanceiq_lab.testbed.testbed import backend_specs

pytestmark = pytest.mark.slow

HIST = "balanceiq_upstream_rq_time_seconds"


def base_latency_ms(stack: Stack) -> dict[str, float]:
    return {s["name"]: s["base_latency_ms"] for s in backend_specs(stack.settings)}


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def stack_factory(ports_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    with ExitStack() as stop:

        def make(
            sample_percent: float, tweak: Callable[[dict[str, Any]], None] | None = None, orca: bool = False
        ) -> Stack:
            # Envoy's access log to the testbed's ALS exporter, sampled at sample_percent.
            tel = ports_settings.telemetry.model_copy(
                update={"als_enabled": True, "als_sample_percent": sample_percent}
            )
            stack = Stack(
                ports_settings.model_copy(update={"telemetry": tel}),
                tmp_path,
                # One health check marks hosts healthy; later ones would only add noise.
                health_check_interval_s=60,
                prometheus=False,
                orca=orca,
                envoy_bootstrap=tweak,
            )
            stop.enter_context(stack)
            stack.wait_routable(10)
            return stack

        yield make


def metrics_url(stack: Stack) -> str:
    assert stack.testbed.als is not None
    return stack.testbed.als.metrics_url


def scrape(stack: Stack) -> list[Any]:
    text = httpx.get(metrics_url(stack), timeout=5).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def counts(samples: list[Any], cluster: str) -> dict[str, float]:
    return {
        s.labels["endpoint"]: s.value for s in samples if s.name == f"{HIST}_count" and s.labels["cluster"] == cluster
    }


def buckets(samples: list[Any], cluster: str, endpoint: str) -> list[tuple[float, float]]:
    return [
        (float(s.labels["le"]), s.value)
        for s in samples
        if s.name == f"{HIST}_bucket" and s.labels["cluster"] == cluster and s.labels["endpoint"] == endpoint
    ]


def value(samples: list[Any], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and s.labels == labels)


def test_p50_per_endpoint_matches_backend_latency(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory(100.0)
    result = run_load_sync(stack.listen_url, total=300, concurrency=6, max_seconds=60)
    assert result.failed == 0 and result.backend_5xx == 0, result.to_json()
    sent = dict(result.by_backend)
    assert sum(sent.values()) == 300 and set(sent) == set(base_latency_ms(stack))

    # Envoy flushes its ALS buffer every 0.2 s: the counts must match within a few flushes.
    wait_until(lambda: counts(scrape(stack), stack.cluster) == sent, 5, f"ALS counts {sent}")

    samples = scrape(stack)
    assert value(samples, "balanceiq_als_entries_total") == 300
    assert value(samples, "balanceiq_als_dropped_total", reason="no_upstream") == 0
    for addr, base_ms in base_latency_ms(stack).items():
        ok = value(samples, "balanceiq_upstream_rq_total", cluster=stack.cluster, endpoint=addr, code_class="2xx")
        assert ok == sent[addr]
        p50_ms = quantile_from_buckets(buckets(samples, stack.cluster, addr), 0.5) * 1000
        assert abs(p50_ms - base_ms) <= 10, (addr, p50_ms, base_ms)
    # These backends send no ORCA reports: no utilisation series appears.
    assert not [x for x in samples if x.name == "balanceiq_upstream_orca_utilization"]


def test_orca_load_reports_reach_the_exporter(stack_factory: Callable[..., Stack]) -> None:
    """Backends that send endpoint-load-metrics: Envoy logs the header, the exporter keeps
    each endpoint's last utilisation (what the default saturation query reads)."""
    stack = stack_factory(100.0, orca=True)
    result = run_load_sync(stack.listen_url, total=120, concurrency=6, max_seconds=60)
    assert result.failed == 0, result.to_json()
    sent = dict(result.by_backend)
    wait_until(lambda: counts(scrape(stack), stack.cluster) == sent, 5, f"ALS counts {sent}")
    util = {x.labels["endpoint"]: x.value for x in scrape(stack) if x.name == "balanceiq_upstream_orca_utilization"}
    assert set(util) == set(sent), (util, sent)
    # The testbed reports in-flight over its concurrency limit, counting the request itself.
    assert all(0.0 < u <= 1.0 for u in util.values()), util


def test_runtime_sampling_at_10_percent(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory(10.0)
    result = run_load_sync(stack.listen_url, total=1000, concurrency=12, max_seconds=60)
    assert result.failed == 0, result.to_json()
    assert sum(result.by_backend.values()) == 1000

    # The sampled total is unknown in advance: wait until it stops changing for well over
    # one flush interval (bounded, as everything here).
    last: list[float] = [-1.0]
    stable_since = [time.monotonic()]

    def settled() -> bool:
        total = sum(counts(scrape(stack), stack.cluster).values())
        now = time.monotonic()
        if total != last[0]:
            last[0], stable_since[0] = total, now
        return total > 0 and now - stable_since[0] >= 1.0

    wait_until(settled, 5, "the sampled ALS count to settle")
    samples = scrape(stack)
    total = sum(counts(samples, stack.cluster).values())
    assert 30 <= total <= 200, total
    # Every sampled entry had an upstream: the counter of entries and the histogram agree.
    assert value(samples, "balanceiq_als_entries_total") == total


def test_envoy_own_503_is_dropped_not_observed(stack_factory: Callable[..., Stack]) -> None:
    """No upstream host (Envoy's "no healthy upstream"): dropped, never a latency sample."""

    def empty_route(bootstrap: dict[str, Any]) -> None:
        res = bootstrap["static_resources"]
        res["clusters"].append(
            {
                "name": "empty",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "empty", "endpoints": []},
            }
        )
        hcm = res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        routes.insert(0, {"match": {"prefix": "/none"}, "route": {"cluster": "empty"}})

    stack = stack_factory(100.0, empty_route)
    bad = run_load_sync(f"{stack.listen_url}/none", total=20, concurrency=2, max_seconds=30)
    assert bad.by_status == {503: 20}, bad.to_json()
    good = run_load_sync(stack.listen_url, total=30, concurrency=3, max_seconds=30)
    assert sum(good.by_backend.values()) == 30, good.to_json()

    def arrived() -> bool:
        samples = scrape(stack)
        return value(samples, "balanceiq_als_entries_total") == 50

    wait_until(arrived, 5, "all 50 ALS entries")
    samples = scrape(stack)
    assert value(samples, "balanceiq_als_dropped_total", reason="no_upstream") == 20
    assert counts(samples, "empty") == {}
    assert counts(samples, stack.cluster) == dict(good.by_backend)
