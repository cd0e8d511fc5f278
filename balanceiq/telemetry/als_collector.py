"""Envoy access-log entries folded into per-endpoint latency histograms and counts. Latency runs from
the first byte sent upstream to the last received (else the last sent downstream): network and backend
time, not Envoy's own. With retries an entry names only the final attempt. An entry with a host but no
timing still counts in ``balanceiq_upstream_rq_total``: an error is a real outcome, a made-up duration
is not. Feed one log kind (HCM ``access_log`` or router ``upstream_log``), not both, or requests count twice."""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
from collections import Counter as Tally
from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from balanceiq.telemetry import jsonbody

log = logging.getLogger(__name__)

# A quantile is off by at most its bucket's width: fine steps up to 110 ms, where loopback and
# in-region backends live; coarser above, since each bucket is one series per endpoint.
_BUCKETS_TEXT = (
    "0.001 0.0025 0.005 0.0075 0.01 0.0125 0.015 0.0175 0.02 0.025 0.03 0.035 0.04 0.045 0.05 0.06 0.07 0.08 "
    "0.09 0.1 0.11 0.125 0.15 0.175 0.2 0.25 0.3 0.4 0.5 0.75 1 2.5 5 10"
)
BUCKETS: tuple[float, ...] = tuple(float(b) for b in _BUCKETS_TEXT.split())

# no_upstream: no host picked; malformed: not a socket address; intermediate: a periodic
# entry (the final one counts the stream); cardinality: past ``max_endpoints``, so churning
# endpoints cannot grow Prometheus without bound.
DROP_REASONS = ("no_upstream", "malformed", "intermediate", "cardinality", "tcp")
# Envoy's standard per-response load report (ORCA, native HTTP form), when a backend sends it.
ORCA_HEADER = "endpoint-load-metrics"
SNAPSHOT_FORMAT = "balanceiq-als-snapshot/1"

# NotSet: Envoy versions before access_log_type existed only logged at stream end.
_FINAL_TYPES = frozenset(accesslog_pb2.AccessLogType.Value(t) for t in ("NotSet", "DownstreamEnd", "UpstreamEnd"))
_CODE_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def format_endpoint(address: address_pb2.Address) -> str | None:
    """``ip:port`` (``[v6]:port``) of a socket address; None for pipes, named ports etc."""
    if address.WhichOneof("address") != "socket_address":
        return None
    sa = address.socket_address
    if not sa.address or sa.WhichOneof("port_specifier") != "port_value":
        return None
    host = f"[{sa.address}]" if ":" in sa.address else sa.address
    return f"{host}:{sa.port_value}"


def upstream_seconds(common: accesslog_pb2.AccessLogCommon) -> float | None:
    """Upstream time of one entry (see the module docstring), or None if not measured."""
    if not common.HasField("time_to_first_upstream_tx_byte"):
        return None
    if common.HasField("time_to_last_upstream_rx_byte"):
        end = common.time_to_last_upstream_rx_byte
    elif common.HasField("time_to_last_downstream_tx_byte"):
        end = common.time_to_last_downstream_tx_byte
    else:
        return None
    # Integer nanoseconds first: two float seconds would lose sub-microsecond precision.
    ns = end.ToNanoseconds() - common.time_to_first_upstream_tx_byte.ToNanoseconds()
    return ns / 1_000_000_000 if ns >= 0 else None


def code_class(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    if not entry.response.HasField("response_code"):
        return "none"
    return _CODE_CLASSES.get(entry.response.response_code.value // 100, "none")


def orca_utilization(value: str) -> float | None:
    """Utilisation from an ORCA ``endpoint-load-metrics`` header in its TEXT or JSON form
    (``application_utilization``, else ``cpu_utilization``); None when absent or odd."""
    text = value.strip()
    kind, body = text[:5].upper(), text[5:]
    fields: dict[str, object] = {}
    if kind == "TEXT ":
        fields = {k.strip(): v.strip() for k, sep, v in (item.partition(":") for item in body.split(",")) if sep}
    elif kind == "JSON ":
        try:
            data = jsonbody.loads(body)
        except (ValueError, RecursionError):
            return None
        if isinstance(data, dict):
            fields = {k: v for k, v in data.items() if type(v) in (int, float)}
        # Protobuf JSON spells them in camelCase.
        fields.setdefault("application_utilization", fields.get("applicationUtilization"))
        fields.setdefault("cpu_utilization", fields.get("cpuUtilization"))
    for key in ("application_utilization", "cpu_utilization"):
        try:
            u = float(fields[key])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError, OverflowError):
            continue
        if math.isfinite(u) and 0.0 <= u <= 100.0:
            return u
    return None


def parse_entry(entry: accesslog_pb2.HTTPAccessLogEntry) -> tuple[str, str, str, float | None] | str:
    """``(cluster, endpoint, code_class, seconds | None)``, or the reason to drop it."""
    common = entry.common_properties
    if common.access_log_type not in _FINAL_TYPES:
        return "intermediate"
    if not common.upstream_cluster or not common.HasField("upstream_remote_address"):
        return "no_upstream"
    endpoint = format_endpoint(common.upstream_remote_address)
    if endpoint is None:
        return "malformed"
    return common.upstream_cluster, endpoint, code_class(entry), upstream_seconds(common)


class _Series:
    """One (cluster, endpoint): its metric children cached (``labels()`` is the costly part),
    and the same numbers kept plainly, so /snapshot is a JSON dump, not a registry walk."""

    __slots__ = ("buckets", "classes", "collector", "counts", "hist", "key", "last_util", "orca")

    def __init__(self, collector: AlsCollector, cluster: str, endpoint: str) -> None:
        self.collector = collector
        self.key = (cluster, endpoint)
        self.hist = collector.rq_time.labels(cluster, endpoint)
        self.orca: Any = None  # the gauge's child, made on the first report
        self.counts: dict[str, Any] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # per bucket (not cumulative); last: +Inf
        self.classes: Tally[str] = Tally()
        self.last_util: float | None = None

    def add(self, klass: str, seconds: float | None, utilization: float | None) -> None:
        child = self.counts.get(klass)
        if child is None:
            child = self.counts[klass] = self.collector.rq_total.labels(*self.key, klass)
        child.inc()
        self.classes[klass] += 1
        if seconds is not None and math.isfinite(seconds):
            self.hist.observe(seconds)
            self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1  # le is inclusive
        if utilization is not None:
            if self.orca is None:
                self.orca = self.collector.orca.labels(*self.key)
            self.orca.set(utilization)
            self.last_util = utilization

    def to_json(self) -> dict[str, Any]:
        cluster, endpoint = self.key
        cumulative = list(itertools.accumulate(self.buckets))
        return dict(
            cluster=cluster, endpoint=endpoint, buckets=cumulative, codes=dict(self.classes), orca=self.last_util
        )


class AlsCollector:
    """Thread-safe aggregation of access-log entries into per-endpoint metrics, in its own registry."""

    def __init__(self, *, max_endpoints: int = 10_000) -> None:
        if max_endpoints < 0:
            raise ValueError(f"max_endpoints must be >= 0, got {max_endpoints}")
        self.max_endpoints = max_endpoints
        self.registry = reg = CollectorRegistry()
        self.rq_time = Histogram(
            "balanceiq_upstream_rq_time_seconds",
            "Upstream time per request (first byte sent upstream to last byte received), from Envoy's access log.",
            ["cluster", "endpoint"],
            buckets=BUCKETS,
            registry=reg,
        )
        self.rq_total = Counter(
            "balanceiq_upstream_rq_total",
            "Requests an upstream endpoint served, by response class (none: no response).",
            ["cluster", "endpoint", "code_class"],
            registry=reg,
        )
        self.entries = Counter("balanceiq_als_entries_total", "HTTP access-log entries received.", registry=reg)
        self.dropped = Counter(
            "balanceiq_als_dropped_total",
            "Access-log entries not attributed to an endpoint, by reason.",
            ["reason"],
            registry=reg,
        )
        self.streams = Gauge("balanceiq_als_streams", "ALS streams open now (0: no Envoy is sending).", registry=reg)
        self.series_gauge = Gauge("balanceiq_als_series", "(cluster, endpoint) series in use.", registry=reg)
        self.orca = Gauge(
            "balanceiq_upstream_orca_utilization",
            "The endpoint's last ORCA load report (endpoint-load-metrics: application, else "
            "CPU utilisation), as Envoy logged it; absent for endpoints that send none.",
            ["cluster", "endpoint"],
            registry=reg,
        )
        # Every reason exported from the start: rate() over a series born at the first drop misses it.
        self._drop_children = {r: self.dropped.labels(r) for r in DROP_REASONS}
        self._series: dict[tuple[str, str], _Series] = {}
        self._lock = threading.Lock()

    def observe_entries(self, entries: Iterable[accesslog_pb2.HTTPAccessLogEntry]) -> int:
        """Fold a batch in under one lock; returns how many were attributed to an endpoint."""
        parsed: list[tuple[str, str, str, float | None, float | None]] = []
        drops: Tally[str] = Tally()
        n = 0
        for entry in entries:
            n += 1
            try:
                row = parse_entry(entry)
                if isinstance(row, str):
                    drops[row] += 1
                    continue
                orca = entry.response.response_headers.get(ORCA_HEADER)
                parsed.append((*row, orca_utilization(orca) if orca else None))
            except Exception:  # one odd entry must not end Envoy's stream
                log.debug("unparsable access-log entry", exc_info=True)
                drops["malformed"] += 1
        observed = 0
        with self._lock:
            series = self._series
            for cluster, endpoint, klass, seconds, util in parsed:
                s = series.get((cluster, endpoint))
                if s is None:
                    if len(series) >= self.max_endpoints:
                        drops["cardinality"] += 1
                        continue
                    s = series[(cluster, endpoint)] = _Series(self, cluster, endpoint)
                    self.series_gauge.set(len(series))
                s.add(klass, seconds, util)
                observed += 1
        self.entries.inc(n)
        for reason, k in drops.items():
            self._drop_children[reason].inc(k)
        return observed

    def observe_message(self, message: als_pb2.StreamAccessLogsMessage) -> int:
        """One ``StreamAccessLogsMessage``: HTTP entries are folded in, TCP ones dropped."""
        which = message.WhichOneof("log_entries")
        if which == "http_logs":
            return self.observe_entries(message.http_logs.log_entry)
        if which == "tcp_logs" and (k := len(message.tcp_logs.log_entry)):
            self.entries.inc(k)
            self._drop_children["tcp"].inc(k)
        return 0

    def snapshot(self) -> dict[str, Any]:
        """What ``/snapshot`` serves: per endpoint, cumulative latency buckets (seconds; the
        last is +Inf), requests by response class and the last ORCA report."""
        with self._lock:
            series = [s.to_json() for s in self._series.values()]
        return {"format": SNAPSHOT_FORMAT, "bounds": list(BUCKETS), "series": series}
