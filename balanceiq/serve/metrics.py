"""What was refused at the edges, for ``GET /metrics``: API responses by route and status, token
failures, xDS requests refused or ignored, failed telemetry reads."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

from balanceiq.control.metrics import Counted

_XDS_REQUESTS = {
    "requests_refused": "xDS requests that ended their stream with an error status",
    "requests_ignored": "xDS requests not acted on, as the protocol says",
}
_TELEMETRY_FAILURES = "Telemetry reads that failed, by source (-bug: not a TelemetryError)"


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
        r.register(Counted(xds_status, [(f"balanceiq_xds_{k}", doc, "reason", k) for k, doc in _XDS_REQUESTS.items()]))
        r.register(Counted(telemetry_failures, [("balanceiq_telemetry_failures", _TELEMETRY_FAILURES, "source", None)]))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
