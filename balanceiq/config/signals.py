"""Telemetry settings and the default PromQL for each signal (Envoy's own metrics, and the
ALS exporter's latency histograms)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from balanceiq.config.base import (
    Port,
    PosFloat,
    StrictBool,
    _cross_field_error,
    _http_url,
    _Model,
    _not_blank,
)


class PrometheusConfig(_Model):
    """The Prometheus server the controller queries for telemetry."""

    url: str = Field(default="http://127.0.0.1:9090", description="Prometheus http(s) base URL.")
    """Base URL of the Prometheus HTTP API (without ``/api/v1``). The testbed starts its
    own Prometheus on this host and port."""

    scrape_interval_s: PosFloat = Field(default=1.0, description="Testbed scrape interval (s).")
    """How often the testbed's Prometheus scrapes Envoy, the backends and the ALS
    exporter. 1-2 s keeps observations fresh enough for a 5 s control interval."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _http_url(value)


def _envoy_query(expr: str) -> SignalQuery:
    return SignalQuery(promql=expr, endpoint_label="envoy_endpoint_address")


_ENVOY_SEL = 'envoy_cluster_name="$cluster"'


def _raw_latency() -> dict[str, SignalQuery]:
    rate = 'sum by (endpoint, le) (rate(balanceiq_upstream_rq_time_seconds_bucket{cluster="$cluster"}[$window]))'
    return {
        name: SignalQuery(promql=f"histogram_quantile({q}, {rate}) * 1000", endpoint_label="endpoint")
        for name, q in (("p50_ms", "0.5"), ("p95_ms", "0.95"))
    }


def _recorded_latency() -> dict[str, SignalQuery]:
    # Series precomputed by the recording rules in prometheus/rules.yml: quantiles over
    # 100 endpoints x 35 buckets cost Prometheus tens of ms per query, a lookup ~1 ms.
    return {
        name: SignalQuery(promql=f'balanceiq:upstream_rq_time_ms:{q}{{cluster="$cluster"}}', endpoint_label="endpoint")
        for name, q in (("p50_ms", "p50"), ("p95_ms", "p95"))
    }


def _default_queries(recording_rules: bool = True) -> dict[str, SignalQuery]:
    by = "sum by (envoy_endpoint_address)"
    return {
        "rps": _envoy_query(f"{by} (rate(envoy_cluster_endpoint_rq_total{{{_ENVOY_SEL}}}[$window]))"),
        # Envoy counts 5xx answers, timeouts and connect failures in rq_error, but a
        # connect failure never reaches rq_total: the error rate is errors over
        # completed (success + error) requests, computed in Python so an idle endpoint
        # reads "no traffic", not 0/0, and a dead one reads 1.0, not "idle".
        "errors": _envoy_query(f"{by} (rate(envoy_cluster_endpoint_rq_error{{{_ENVOY_SEL}}}[$window]))"),
        "success": _envoy_query(f"{by} (rate(envoy_cluster_endpoint_rq_success{{{_ENVOY_SEL}}}[$window]))"),
        # The mean over the window, not the gauge's last sample: Little's law (time in
        # system = mean in-flight / rate) needs the mean, and one sample of a bursty
        # gauge reads a queue at a tenth of an endpoint's capacity.
        "inflight": _envoy_query(f"{by} (avg_over_time(envoy_cluster_endpoint_rq_active{{{_ENVOY_SEL}}}[$window]))"),
        "healthy": _envoy_query(f"min by (envoy_endpoint_address) (envoy_cluster_endpoint_healthy{{{_ENVOY_SEL}}})"),
        "last_sample": _envoy_query(
            f"max by (envoy_endpoint_address) (timestamp(envoy_cluster_endpoint_rq_total{{{_ENVOY_SEL}}}))"
        ),
        # Latency from BalanceIQ's ALS exporter: Envoy's view of each upstream request.
        **(_recorded_latency() if recording_rules else _raw_latency()),
        # ORCA load reports (Envoy's standard endpoint-load-metrics header), as Envoy logs
        # them to the ALS exporter. Optional: an endpoint that sends none leaves saturation
        # unmeasured (nan) and the controller reads capacity from latency and in-flight
        # requests instead. Backends' own gauges can be used here too (BACKEND_SATURATION).
        "saturation": SignalQuery(
            promql='max by (endpoint) (avg_over_time(balanceiq_upstream_orca_utilization{cluster="$cluster"}[$window]))',
            endpoint_label="endpoint",
        ),
    }


class SignalQuery(_Model):
    """One PromQL template giving one value per endpoint."""

    promql: str = Field(description="PromQL; $cluster and $window are substituted.")
    """An instant-vector PromQL expression. ``$cluster`` becomes the cluster name and
    ``$window`` the rate window (e.g. ``10s``); ``$$`` is a literal ``$``."""

    endpoint_label: str = Field(description="Label holding the endpoint's host:port.")
    """The result label whose value is the endpoint address (``host:port``)."""

    @field_validator("promql")
    @classmethod
    def _check_template(cls, value: str) -> str:
        import string

        try:
            string.Template(value).substitute(cluster="c", window="1s")
        except (KeyError, ValueError) as exc:
            raise ValueError(f"bad placeholder in PromQL template ({exc}); use $cluster, $window, $$") from None
        return _not_blank(value, "promql")


SIGNALS = ("rps", "errors", "success", "inflight", "healthy", "last_sample", "p50_ms", "p95_ms", "saturation")

# The testbed backends' private gauges (in-flight over concurrency limit), for
# ``telemetry.queries.saturation`` on a fleet whose services export such gauges.
BACKEND_SATURATION = SignalQuery(
    promql="max by (backend) (backend_inflight_requests / backend_concurrency_limit)",
    endpoint_label="backend",
)


class TelemetryConfig(_Model):
    """How observations are read: PromQL per signal, windows, the ALS latency source."""

    window_s: PosFloat = Field(default=10.0, description="Rate window in seconds.")
    """Window of ``rate()`` and of latency quantiles. At least 4 scrape intervals, or
    rates are noise; longer smooths more and reacts later."""

    stale_after_s: PosFloat = Field(default=10.0, description="Samples older than this are stale.")
    """An endpoint whose newest sample is older than this is flagged stale."""

    timeout_s: PosFloat = Field(default=2.0, description="Timeout of one Prometheus query.")
    """Per-query timeout; past it, the observation falls back to Envoy's admin."""

    queries: dict[str, SignalQuery] = Field(default_factory=dict, description="PromQL per signal.")
    """PromQL per signal (rps, errors, success, inflight, healthy, last_sample, p50_ms,
    p95_ms, saturation). Entries given here replace the defaults one by one."""

    als_enabled: StrictBool = Field(default=True, description="Envoy streams access logs for latency.")
    """Configure Envoy's gRPC access log service so BalanceIQ measures each endpoint's
    latency as Envoy sees it (works for any backend)."""

    als_sample_percent: float = Field(default=100.0, gt=0, le=100, description="Share of requests logged.")
    """Percentage of requests Envoy streams to the ALS (sampled in Envoy, so the cost
    is bounded at high request rates)."""

    als_grpc_port: Port = Field(default=9977, description="ALS gRPC port.")
    """Port of the access log gRPC server Envoy streams to."""

    als_metrics_port: Port = Field(default=9978, description="ALS /metrics port.")
    """Port where the ALS exporter serves per-endpoint latency histograms."""

    recording_rules: StrictBool = Field(
        default=True, description="Read latency quantiles from BalanceIQ's recording rules."
    )
    """Read p50/p95 from series precomputed by the recording rules in
    ``prometheus/rules.yml`` (the testbed's Prometheus loads them). Set false for a
    Prometheus without those rules: the quantiles are then computed at query time,
    which costs tens of ms per observation at 100 endpoints."""

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        rules = data.get("recording_rules", True)
        defaults = _default_queries(rules if isinstance(rules, bool) else True)
        given = data.get("queries")
        if given is None:
            return {**data, "queries": defaults}
        if isinstance(given, Mapping):
            # str() first: YAML keys may be ints or None, which do not sort with strings.
            unknown = sorted(str(k) for k in given if k not in SIGNALS)
            if unknown:
                message = f"unknown signal(s) {', '.join(unknown)}; known: {', '.join(SIGNALS)}"
                raise _cross_field_error([(("queries",), message)])
            return {**data, "queries": {**defaults, **given}}
        return data

    @property
    def window(self) -> str:
        """The window as a PromQL duration (``10s``, ``2500ms``: no fractional units)."""
        ms = round(self.window_s * 1000)
        return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"
