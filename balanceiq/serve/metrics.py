"""What was refused at the edges, for ``GET /metrics``: API responses by route and status, token
failures, xDS requests refused or ignored, failed telemetry reads."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

from balanceiq.control.metrics import Counted, Family

_XDS_FAMILIES: list[Family] = [
    (
        "balanceiq_xds_requests_refused",
        "xDS requests that ended their stream with an error status",
        "reason",
        "requests_refused",
    ),
    ("balanceiq_xds_requests_ignored", "xDS requests not acted on, as the protocol says", "reason", "requests_ignored"),
]
_TELEMETRY_FAMILIES: list[Family] = [
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
        r.register(Counted(xds_status, _XDS_FAMILIES))
        r.register(Counted(telemetry_failures, _TELEMETRY_FAMILIES))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
