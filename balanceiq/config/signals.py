"""Telemetry settings and the default PromQL for each signal."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from balanceiq.config.base import HttpUrlStr, Port, PosFloat, StrictBool, _cross_field_error, _Model, _not_blank


class PrometheusConfig(_Model):
    """The Prometheus server the controller queries for telemetry."""

    url: HttpUrlStr = "http://127.0.0.1:9090"
    """Prometheus http(s) base URL."""

    scrape_interval_s: PosFloat = 1.0
    """Testbed scrape interval (s)."""


def _default_queries(recording_rules: bool = True) -> dict[str, SignalQuery]:
    def envoy(expr: str) -> SignalQuery:
        return SignalQuery(promql=expr, endpoint_label="envoy_endpoint_address")

    sel = 'envoy_cluster_name="$cluster"'
    by = "sum by (envoy_endpoint_address)"
    if recording_rules:
        # Precomputed by the recording rules in prometheus/rules.yml: a lookup, not a quantile per query.
        latency = {p: f'balanceiq:upstream_rq_time_ms:p{p}{{cluster="$cluster"}}' for p in (50, 95)}
    else:
        rate = 'sum by (endpoint, le) (rate(balanceiq_upstream_rq_time_seconds_bucket{cluster="$cluster"}[$window]))'
        latency = {p: f"histogram_quantile({p / 100}, {rate}) * 1000" for p in (50, 95)}
    return {
        "rps": envoy(f"{by} (rate(envoy_cluster_endpoint_rq_total{{{sel}}}[$window]))"),
        # A connect failure counts in rq_error but never in rq_total: the error rate is
        # errors / (success + errors), in Python, so idle reads "no traffic" and dead 1.0.
        "errors": envoy(f"{by} (rate(envoy_cluster_endpoint_rq_error{{{sel}}}[$window]))"),
        "success": envoy(f"{by} (rate(envoy_cluster_endpoint_rq_success{{{sel}}}[$window]))"),
        # The window's mean, not the last sample: Little's law needs the mean of a bursty gauge.
        "inflight": envoy(f"{by} (avg_over_time(envoy_cluster_endpoint_rq_active{{{sel}}}[$window]))"),
        "healthy": envoy(f"min by (envoy_endpoint_address) (envoy_cluster_endpoint_healthy{{{sel}}})"),
        "last_sample": envoy(f"max by (envoy_endpoint_address) (timestamp(envoy_cluster_endpoint_rq_total{{{sel}}}))"),
        # Latency from BalanceIQ's ALS exporter: Envoy's view of each upstream request.
        **{f"p{p}_ms": SignalQuery(promql=q, endpoint_label="endpoint") for p, q in latency.items()},
        # ORCA load reports, as Envoy logs them to the ALS exporter; optional (nan without).
        "saturation": SignalQuery(
            promql='max by (endpoint) (avg_over_time(balanceiq_upstream_orca_utilization{cluster="$cluster"}[$window]))',
            endpoint_label="endpoint",
        ),
    }


class SignalQuery(_Model):
    """One PromQL template giving one value per endpoint."""

    promql: str
    """PromQL; $cluster and $window are substituted."""

    endpoint_label: str
    """Label holding the endpoint's host:port."""

    @field_validator("promql")
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            string.Template(value).substitute(cluster="c", window="1s")
        except (KeyError, ValueError) as exc:
            raise ValueError(f"bad placeholder in PromQL template ({exc}); use $cluster, $window, $$") from None
        return _not_blank(value, "promql")


SIGNALS = ("rps", "errors", "success", "inflight", "healthy", "last_sample", "p50_ms", "p95_ms", "saturation")

# For ``telemetry.queries.saturation`` on backends exporting these gauges (the testbed's do).
BACKEND_SATURATION = SignalQuery(
    promql="max by (backend) (backend_inflight_requests / backend_concurrency_limit)", endpoint_label="backend"
)


class TelemetryConfig(_Model):
    """How observations are read: PromQL per signal, windows, the ALS latency source."""

    window_s: PosFloat = 10.0
    """Rate window in seconds."""

    stale_after_s: PosFloat = 10.0
    """Samples older than this are stale."""

    timeout_s: PosFloat = 2.0
    """Timeout of one Prometheus query."""

    queries: dict[str, SignalQuery] = Field(default_factory=dict)
    """PromQL per signal."""

    als_enabled: StrictBool = True
    """Envoy streams access logs for latency."""

    als_sample_percent: float = Field(default=100.0, gt=0, le=100)
    """Share of requests logged."""

    als_grpc_port: Port = 9977
    """ALS gRPC port."""

    als_metrics_port: Port = 9978
    """ALS /metrics port."""

    recording_rules: StrictBool = True
    """Read latency quantiles from BalanceIQ's recording rules."""

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
            if unknown := sorted(str(k) for k in given if k not in SIGNALS):
                message = f"unknown signal(s) {', '.join(unknown)}; known: {', '.join(SIGNALS)}"
                raise _cross_field_error([(("queries",), message)])
            return {**data, "queries": {**defaults, **given}}
        return data

    @property
    def window(self) -> str:
        """The window as a PromQL duration (``10s``, ``2500ms``: no fractional units)."""
        ms = round(self.window_s * 1000)
        return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"
