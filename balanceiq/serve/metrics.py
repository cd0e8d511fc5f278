"""What was refused at the edges, for ``GET /metrics`` after the controller's metrics:
API responses by route and status, token failures, xDS requests refused or ignored,
failed telemetry reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_Family = tuple[str, str, str, str | None]


class _Counted(Collector):
    """Counters another part keeps, read at scrape time: ``(name, help, label, key)`` per
    family, ``key`` naming the counts in what ``read()`` returns (``None``: all of it)."""

    def __init__(self, read: Callable[[], Mapping[str, Any]], specs: list[_Family]) -> None:
        self._read = read
        self._specs = specs

    def describe(self) -> Iterator[CounterMetricFamily]:
        # Names only: registering must not call the (possibly remote) xDS server.
        yield from self._families({})

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield from self._families(self._read())

    def _families(self, data: Mapping[str, Any]) -> Iterator[CounterMetricFamily]:
        for name, doc, label, key in self._specs:
            fam = CounterMetricFamily(name, doc, labels=[label])
            for k, n in sorted((data if key is None else data.get(key) or {}).items()):
                fam.add_metric([str(k)], float(n))
            yield fam


_XDS_FAMILIES: list[_Family] = [
    (
        "balanceiq_xds_requests_refused",
        "xDS requests that ended their stream with an error status",
        "reason",
        "requests_refused",
    ),
    ("balanceiq_xds_requests_ignored", "xDS requests not acted on, as the protocol says", "reason", "requests_ignored"),
]
_TELEMETRY_FAMILIES: list[_Family] = [
    (
        "balanceiq_telemetry_failures",
        "Telemetry reads that failed, by source (-bug: not a TelemetryError)",
        "source",
        None,
    ),
]


class ApiMetrics:
    def __init__(
        self, xds_status: Callable[[], Mapping[str, Any]], telemetry_failures: Callable[[], Mapping[str, int]]
    ) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
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
        r.register(_Counted(xds_status, _XDS_FAMILIES))
        r.register(_Counted(telemetry_failures, _TELEMETRY_FAMILIES))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
