"""The API's own counters and the xDS server's bad-request counters, for ``GET /metrics``.

The controller's metrics (:mod:`balanceiq.control.metrics`) say what it decided; these
say what was refused at the edges: API responses by route and status code (every 4xx
and 5xx is visible there), requests refused for a missing or wrong token, the xDS
requests the server refused or ignored, by reason, and telemetry reads that failed. A registry of its own, exposed
after the controller's on the same page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class _XdsBadRequests(Collector):
    """Read from the xDS server's status at scrape time (it counts; this only shows)."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def describe(self) -> Iterator[CounterMetricFamily]:
        # Names only: registering must not call the (possibly remote) xDS server.
        yield from self._families({})

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield from self._families(self._status())

    def _families(self, status: Mapping[str, Any]) -> Iterator[CounterMetricFamily]:
        refused = CounterMetricFamily(
            "balanceiq_xds_requests_refused",
            "xDS requests that ended their stream with an error status",
            labels=["reason"],
        )
        ignored = CounterMetricFamily(
            "balanceiq_xds_requests_ignored", "xDS requests not acted on, as the protocol says", labels=["reason"]
        )
        for reason, n in sorted((status.get("requests_refused") or {}).items()):
            refused.add_metric([str(reason)], float(n))
        for reason, n in sorted((status.get("requests_ignored") or {}).items()):
            ignored.add_metric([str(reason)], float(n))
        yield refused
        yield ignored


class _TelemetryFailures(Collector):
    def __init__(self, failures: Callable[[], Mapping[str, int]]) -> None:
        self._failures = failures

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield from self._families({})

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield from self._families(self._failures())

    def _families(self, failures: Mapping[str, int]) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(
            "balanceiq_telemetry_failures",
            "Telemetry reads that failed, by source (-bug: not a TelemetryError)",
            labels=["source"],
        )
        for source, n in sorted(failures.items()):
            fam.add_metric([str(source)], float(n))
        yield fam


class ApiMetrics:
    def __init__(
        self, xds_status: Callable[[], Mapping[str, Any]], telemetry_failures: Callable[[], Mapping[str, int]] = dict
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Labelled by route template, not path, so a scan of random URLs adds no series.
        self.responses = Counter(
            "balanceiq_api_responses",
            "API responses by method, route and status code",
            ["method", "route", "code"],
            registry=r,
        )
        self.auth_failures = Counter(
            "balanceiq_api_auth_failures",
            "Requests refused for a missing or wrong bearer token",
            ["reason"],
            registry=r,
        )
        for reason in ("missing", "invalid"):
            self.auth_failures.labels(reason)
        r.register(_XdsBadRequests(xds_status))
        r.register(_TelemetryFailures(telemetry_failures))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
