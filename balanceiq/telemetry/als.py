"""Per-endpoint upstream latency from Envoy's gRPC Access Log Service (ALS).

Envoy's per-endpoint stats (``track_cluster_stats.per_endpoint_stats``) carry counters
and gauges but no latency histogram, so p50/p95 per endpoint cannot come from Envoy's
``/stats/prometheus``. Every HTTP access-log entry, however, names the upstream host
that served the request and carries its timings. Envoy streams those entries to
:class:`AlsServer` (``StreamAccessLogs``); :class:`AlsCollector` folds them into
per-endpoint Prometheus histograms, served on our own ``/metrics`` for Prometheus to
scrape. Nothing here depends on the backends: any HTTP upstream gets a latency series.

What "latency" means here
    ``time_to_last_upstream_rx_byte - time_to_first_upstream_tx_byte`` (falling back to
    ``time_to_last_downstream_tx_byte`` when the upstream response never completed, e.g.
    an upstream reset or timeout). That is the backend's latency as Envoy sees it: the
    network both ways plus the backend's own queueing and service time. It excludes
    what happens in Envoy before the request is on the wire (waiting for a connection
    pool slot, connecting, filters), which is not the endpoint's doing and would blur
    the per-endpoint signal the controller acts on. With retries an entry names only
    the final attempt's host; per-attempt attribution needs router ``upstream_log``
    entries (see below).

Which entries count
    * entries without an upstream host (no healthy upstream, a 503 Envoy produced
      itself, a downstream reset before routing) are dropped (``reason="no_upstream"``):
      there was no endpoint to blame or credit;
    * an upstream that is not an ``ip:port`` socket address is ``reason="malformed"``;
    * periodic/intermediate entries (``access_log_type`` other than the end of a
      stream) are ``reason="intermediate"``, so a stream is never counted twice;
    * an entry with an upstream host but no upstream timing (connect failure, reset
      before the first byte went out) counts in ``balanceiq_upstream_rq_total``
      (usually as ``5xx`` or ``none``) but adds no latency sample: an error is a real
      outcome for the endpoint, a made-up duration is not.
    Feed the collector one log kind: HCM ``access_log`` entries (``DownstreamEnd``,
    what :func:`access_log_config` sets up) *or* router ``upstream_log`` entries
    (``UpstreamEnd``), not both, or requests are counted twice.

Sampling and cardinality
    Envoy samples before sending (a ``runtime_filter`` in :func:`access_log_config`;
    runtime key ``balanceiq.als_sample`` can change the share live). Counts and rates
    are then that share of the traffic; latency quantiles stay unbiased. ``AlsCollector(max_endpoints=...)`` bounds
    the number of ``(cluster, endpoint)`` series: entries for endpoints beyond it are
    dropped (``reason="cardinality"``) rather than growing Prometheus without bound
    while endpoints churn.

Metrics (own :class:`~prometheus_client.CollectorRegistry`, never the global one)
    ``balanceiq_upstream_rq_time_seconds{cluster,endpoint}`` histogram,
    ``balanceiq_upstream_rq_total{cluster,endpoint,code_class}`` (``1xx``..``5xx`` or
    ``none`` when no response was sent), ``balanceiq_als_entries_total``,
    ``balanceiq_als_dropped_total{reason}``, ``balanceiq_als_streams`` (streams open
    now: 0 means no Envoy is sending) and ``balanceiq_als_series`` (series in use).

CLI::

    python -m balanceiq.telemetry.als --grpc-port 9977 --metrics-port 9978 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import math
import signal
import socket
import sys
import threading
from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Any, NoReturn

import grpc
from aiohttp import web
from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from balanceiq.exceptions import TestbedError
from balanceiq.loop import LoopThread

log = logging.getLogger(__name__)

__all__ = [
    "BUCKETS",
    "ORCA_HEADER",
    "AlsCollector",
    "AlsServer",
    "access_log_config",
    "als_cluster_config",
    "main",
    "orca_utilization",
]

ALS_SERVICE = "envoy.service.accesslog.v3.AccessLogService"
HTTP_GRPC_ALS = "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
_HTTP_OPTS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# A quantile from buckets (histogram_quantile) is off by at most the width of the bucket
# it falls in: 2.5 ms steps to 20 ms, 5 ms to 50 ms and 10 ms to 110 ms keep it within
# +-10 ms there, where loopback and in-region backends live. Above, a bucket spans up to
# half its lower bound (0.5-0.75 s): each bucket is one series per endpoint, and max_endpoints
# series of 100+ buckets would cost Prometheus more than the precision is worth.
# Pass ``AlsCollector(buckets=...)`` for finer steps at higher latencies.
BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.0125,
    0.015,
    0.0175,
    0.02,
    0.025,
    0.03,
    0.035,
    0.04,
    0.045,
    0.05,
    0.06,
    0.07,
    0.08,
    0.09,
    0.1,
    0.11,
    0.125,
    0.15,
    0.175,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)

DROP_REASONS = ("no_upstream", "malformed", "intermediate", "cardinality", "tcp")

# Envoy's standard per-response load report (ORCA, native HTTP form). Envoy logs it when
# asked to (``additional_response_headers_to_log``); backends that do not send it simply
# leave the utilisation gauge absent.
ORCA_HEADER = "endpoint-load-metrics"
SNAPSHOT_FORMAT = "balanceiq-als-snapshot/1"
_ORCA_KEYS = ("application_utilization", "cpu_utilization")

_T = accesslog_pb2.AccessLogType
# NotSet: Envoy versions before access_log_type existed only logged at stream end.
_FINAL_TYPES = frozenset({_T.Value("NotSet"), _T.Value("DownstreamEnd"), _T.Value("UpstreamEnd")})
_CODE_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_NS = 1_000_000_000

_GRPC_OPTIONS = [
    # gRPC turns SO_REUSEPORT on by default; a second collector on the same port would
    # then silently take half of Envoy's streams.
    ("grpc.so_reuseport", 0),
    # ALS streams live as long as Envoy: keepalives find dead peers.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


# -- parsing one entry ------------------------------------------------------------------


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
    start = common.time_to_first_upstream_tx_byte
    # Integer nanoseconds first: two float seconds would lose sub-microsecond precision.
    ns = (end.seconds - start.seconds) * _NS + (end.nanos - start.nanos)
    return ns / _NS if ns >= 0 else None


def code_class(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    if not entry.response.HasField("response_code"):
        return "none"
    return _CODE_CLASSES.get(entry.response.response_code.value // 100, "none")


def orca_utilization(value: str) -> float | None:
    """Utilisation from an ORCA ``endpoint-load-metrics`` header in its TEXT or JSON form
    (``application_utilization``, else ``cpu_utilization``); None when absent or odd."""
    text = value.strip()
    fields: dict[str, str] = {}
    if text[:5].upper() == "TEXT ":
        for item in text[5:].split(","):
            key, sep, val = item.partition(":")
            if sep:
                fields[key.strip()] = val.strip()
    elif text[:5].upper() == "JSON ":
        import json

        try:
            data = json.loads(text[5:])
        except ValueError:
            return None
        if isinstance(data, dict):
            fields = {str(k): str(v) for k, v in data.items() if isinstance(v, (int, float))}
        # protobuf JSON uses camelCase
        for snake, camel in (
            ("application_utilization", "applicationUtilization"),
            ("cpu_utilization", "cpuUtilization"),
        ):
            if camel in fields and snake not in fields:
                fields[snake] = fields[camel]
    for key in _ORCA_KEYS:
        try:
            u = float(fields[key])
        except (KeyError, ValueError):
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


# -- aggregation --------------------------------------------------------------------------


class _Series:
    """Cached children of one (cluster, endpoint): ``labels()`` is the costly part."""

    __slots__ = ("bounds", "buckets", "classes", "counts", "hist", "key", "last_util", "orca", "orca_gauge", "rq_total")

    def __init__(self, collector: AlsCollector, cluster: str, endpoint: str) -> None:
        self.key = (cluster, endpoint)
        self.hist = collector.rq_time.labels(cluster, endpoint)
        self.rq_total = collector.rq_total
        self.orca_gauge = collector.orca
        self.orca: Any = None  # the gauge's child, made on the first report
        self.counts: dict[str, Any] = {}
        # The same numbers kept plainly for /snapshot: rendering them is a JSON dump, not
        # a walk over the registry (the exposition costs ~90 ms at 100 endpoints).
        self.bounds = collector.bounds
        self.buckets = [0] * (len(self.bounds) + 1)  # per bucket (not cumulative); last: +Inf
        self.classes: dict[str, int] = {}
        self.last_util: float | None = None

    def report(self, utilization: float) -> None:
        if self.orca is None:
            self.orca = self.orca_gauge.labels(*self.key)
        self.orca.set(utilization)
        self.last_util = utilization

    def count(self, klass: str, n: int = 1) -> None:
        child = self.counts.get(klass)
        if child is None:
            child = self.counts[klass] = self.rq_total.labels(*self.key, klass)
        child.inc(n)
        self.classes[klass] = self.classes.get(klass, 0) + n

    def observe(self, seconds: float) -> None:
        self.hist.observe(seconds)
        self.buckets[bisect.bisect_left(self.bounds, seconds)] += 1  # le is inclusive

    def to_json(self) -> dict[str, Any]:
        running, cumulative = 0, []
        for n in self.buckets:
            running += n
            cumulative.append(running)
        return {
            "cluster": self.key[0],
            "endpoint": self.key[1],
            "buckets": cumulative,
            "codes": dict(self.classes),
            "orca": self.last_util,
        }


class AlsCollector:
    """Thread-safe aggregation of access-log entries into per-endpoint metrics."""

    def __init__(
        self,
        *,
        max_endpoints: int = 10_000,
        buckets: Sequence[float] = BUCKETS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if max_endpoints < 0:
            raise ValueError(f"max_endpoints must be >= 0, got {max_endpoints}")
        self.max_endpoints = max_endpoints
        self.bounds = tuple(sorted(float(b) for b in buckets if math.isfinite(b)))
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.rq_time = Histogram(
            "balanceiq_upstream_rq_time_seconds",
            "Upstream time per request (first byte sent upstream to last byte received), from Envoy's access log.",
            ["cluster", "endpoint"],
            buckets=tuple(buckets),
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
        # Every reason exported from the start: a rate() over a series that appears only
        # on the first drop would miss that drop.
        self._drop_children = {r: self.dropped.labels(r) for r in DROP_REASONS}
        self._series: dict[tuple[str, str], _Series] = {}
        self._lock = threading.Lock()

    def observe_entry(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> bool:
        """Fold one entry in; True if it was attributed to an endpoint."""
        return self.observe_entries((entry,)) == 1

    def observe_entries(self, entries: Iterable[accesslog_pb2.HTTPAccessLogEntry]) -> int:
        """Fold a batch in under one lock; returns how many were attributed to an endpoint."""
        parsed: list[tuple[str, str, str, float | None, float | None]] = []
        drops: Tally[str] = Tally()
        n = 0
        for entry in entries:
            n += 1
            try:
                row = parse_entry(entry)
                orca = entry.response.response_headers.get(ORCA_HEADER) if not isinstance(row, str) else None
                util = orca_utilization(orca) if orca else None
            except Exception:  # one odd entry must not end Envoy's stream
                log.debug("unparsable access-log entry", exc_info=True)
                drops["malformed"] += 1
                continue
            if isinstance(row, str):
                drops[row] += 1
            else:
                parsed.append((*row, util))
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
                s.count(klass)
                if seconds is not None and math.isfinite(seconds):
                    s.observe(seconds)
                if util is not None:
                    s.report(util)
                observed += 1
        if n:
            self.entries.inc(n)
        for reason, k in drops.items():
            self._drop_children[reason].inc(k)
        return observed

    def observe_message(self, message: als_pb2.StreamAccessLogsMessage) -> int:
        """One ``StreamAccessLogsMessage``: HTTP entries are folded in, TCP ones dropped."""
        which = message.WhichOneof("log_entries")
        if which == "http_logs":
            return self.observe_entries(message.http_logs.log_entry)
        if which == "tcp_logs":
            k = len(message.tcp_logs.log_entry)
            if k:
                self.entries.inc(k)
                self._drop_children["tcp"].inc(k)
        return 0

    def series(self) -> list[tuple[str, str]]:
        """The (cluster, endpoint) pairs with a series, in first-seen order."""
        with self._lock:
            return list(self._series)

    def snapshot(self) -> dict[str, Any]:
        """Every endpoint's counts as JSON: cumulative latency buckets (seconds; the last
        is +Inf, i.e. the count), requests by response class, the last ORCA report. What
        ``/snapshot`` serves, for the controller's fast fallback."""
        with self._lock:
            series = [s.to_json() for s in self._series.values()]
        return {"format": SNAPSHOT_FORMAT, "bounds": list(self.bounds), "series": series}


# -- serving ------------------------------------------------------------------------------


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _probe_bind(host: str, port: int, address: str) -> None:
    """Raise TestbedError if ``host:port`` is taken, before gRPC tries it.

    gRPC's core logs its own multi-line complaint on stderr when a bind fails; checking
    first keeps the usual failure to our one clear message. The port is free again when
    this returns, so a race only brings back gRPC's wording, not a wrong answer.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise TestbedError(f"cannot bind ALS gRPC server to {address}: {exc}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As gRPC does: a port whose old connections linger in TIME_WAIT is still free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise TestbedError(f"cannot bind ALS gRPC server to {address}: {exc}") from exc


class AlsServer:
    """``StreamAccessLogs`` over gRPC plus ``/metrics`` over HTTP. Start with :meth:`start`.

    Both run on one event loop in a background thread (as
    :class:`~balanceiq.xds.server.XdsServer` does), so it behaves the same in a script,
    a test or a Ray actor. ``/metrics`` is a small aiohttp app rather than
    prometheus_client's ``start_http_server``: that one polls for shutdown every 0.5 s,
    so every stop would cost half a second.
    """

    def __init__(
        self,
        collector: AlsCollector,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        metrics_port: int = 0,
    ) -> None:
        self.collector = collector
        self.host = host
        self.requested_grpc_port = grpc_port
        self.requested_metrics_port = metrics_port
        self._grpc_port: int | None = None
        self._metrics_port: int | None = None
        self._loop = LoopThread("als")
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None

    @property
    def grpc_port(self) -> int | None:
        return self._grpc_port

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_port

    @property
    def metrics_url(self) -> str | None:
        if self._metrics_port is None:
            return None
        return f"http://{_url_host(self.host)}:{self._metrics_port}/metrics"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> tuple[int, int]:
        """Bind both ports and serve; returns ``(grpc_port, metrics_port)``.

        Raises TestbedError naming ``host:port`` if either cannot be bound.
        """
        if self._loop.running:
            raise TestbedError("ALS server already started")
        self._loop.start()
        try:
            try:
                self._grpc_port, self._metrics_port = self._loop.run(self._start_both(), timeout)
            except TimeoutError as exc:
                raise TestbedError(f"ALS server did not start within {timeout}s") from exc
        except BaseException:
            self.stop()
            raise
        log.info("ALS listening on %s, metrics on %s", self._address(self._grpc_port), self.metrics_url)
        return self._grpc_port, self._metrics_port

    async def _start_both(self) -> tuple[int, int]:
        return await self._start_grpc(), await self._start_metrics()

    def _address(self, port: int | None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"

    async def _start_grpc(self) -> int:
        address = self._address(self.requested_grpc_port)
        _probe_bind(self.host, self.requested_grpc_port, address)
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        server.add_generic_rpc_handlers([self._handler()])
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise TestbedError(f"cannot bind ALS gRPC server to {address}: {exc}") from exc
        if not port:
            raise TestbedError(f"cannot bind ALS gRPC server to {address}: port in use?")
        await server.start()
        self._server = server
        return port

    async def _start_metrics(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/snapshot", self._snapshot)
        # Scrapes are short; a stop should not wait a minute for a stuck client.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        address = self._address(self.requested_metrics_port)
        site = web.TCPSite(runner, self.host, self.requested_metrics_port, reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise TestbedError(f"cannot bind ALS /metrics to {address}: {exc}") from exc
        self._runner = runner
        return int(runner.addresses[0][1])

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        # Off the loop: rendering 10,000 endpoints' buckets must not stall Envoy's streams.
        body = await asyncio.get_running_loop().run_in_executor(None, encoder, self.collector.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _snapshot(self, request: web.Request) -> web.Response:
        body = json.dumps(self.collector.snapshot(), separators=(",", ":"))
        return web.Response(text=body, content_type="application/json")

    async def _stop_both(self, grace: float) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._server is not None:
            await self._server.stop(grace)
        await asyncio.get_running_loop().shutdown_default_executor()

    def stop(self, grace: float = 0.5) -> None:
        """Stop both servers. Safe to call twice, or after a failed start."""
        self._loop.close(self._stop_both(grace) if self._loop.running else None, timeout=grace + 10)
        self._server = None
        self._grpc_port = None
        self._metrics_port = None

    def __enter__(self) -> AlsServer:
        if not self._loop.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the stream ---------------------------------------------------------------------------

    async def _stream_access_logs(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        streams = self.collector.streams
        streams.inc()
        try:
            async for message in request_iterator:
                self.collector.observe_message(message)
        finally:
            streams.dec()
        return als_pb2.StreamAccessLogsResponse()

    def _handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ALS_SERVICE,
            {
                "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                    self._stream_access_logs,
                    request_deserializer=als_pb2.StreamAccessLogsMessage.FromString,
                    response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
                )
            },
        )


# -- Envoy configuration ------------------------------------------------------------------


def access_log_config(
    cluster_name: str = "als_cluster", sample_percent: float = 100.0, log_name: str = "balanceiq"
) -> dict[str, Any]:
    """One entry for the HCM's ``access_log`` list: ALS over gRPC to ``cluster_name``.

    ``sample_percent < 100`` adds a runtime filter (runtime key ``balanceiq.als_sample``
    overrides it live); whole percents use denominator HUNDRED, fractions MILLION.
    """
    if not isinstance(sample_percent, (int, float)) or not 0.0 <= sample_percent <= 100.0:
        raise ValueError(f"sample_percent must be within 0..100, got {sample_percent!r}")
    entry: dict[str, Any] = {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": HTTP_GRPC_ALS,
            "common_config": {
                "log_name": log_name,
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name}},
                # Envoy's default is 1 s; 0.2 s gets latency to the controller sooner
                # at the cost of a few more (small) gRPC messages.
                "buffer_flush_interval": "0.2s",
                "buffer_size_bytes": 16384,
            },
            # ORCA load reports, when a backend sends them (never required).
            "additional_response_headers_to_log": [ORCA_HEADER],
        },
    }
    if sample_percent < 100.0:
        pct = float(sample_percent)
        if pct.is_integer():
            fraction = {"numerator": int(pct), "denominator": "HUNDRED"}
        else:
            fraction = {"numerator": round(pct * 10_000), "denominator": "MILLION"}
        entry["filter"] = {
            "runtime_filter": {
                "runtime_key": "balanceiq.als_sample",
                "percent_sampled": fraction,
                # Not tied to x-request-id: a caller reusing request ids must not be able
                # to bias which requests are measured.
                "use_independent_randomness": True,
            }
        }
    return entry


def als_cluster_config(host: str, port: int, name: str = "als_cluster") -> dict[str, Any]:
    """A STATIC HTTP/2 cluster for Envoy to reach the ALS gRPC port (``host`` must be an IP)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port!r}")
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            _HTTP_OPTS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}
            ],
        },
    }


# -- CLI ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: callers (and supervisors' logs) read it.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Serve ALS + /metrics until SIGTERM/SIGINT. 0 after a signal, 2 on bad args or bind."""
    p = _Parser(
        prog="python -m balanceiq.telemetry.als",
        description="Receive Envoy access logs over gRPC; serve per-endpoint latency on /metrics.",
    )
    p.add_argument("--grpc-port", type=_port, required=True, help="ALS gRPC port (0: any free)")
    p.add_argument("--metrics-port", type=_port, required=True, help="/metrics port (0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind both ports on")
    p.add_argument(
        "--max-endpoints",
        type=_non_negative,
        default=10_000,
        help="most (cluster, endpoint) series kept; later ones are dropped",
    )
    args = p.parse_args(argv)

    server = AlsServer(AlsCollector(max_endpoints=args.max_endpoints), args.host, args.grpc_port, args.metrics_port)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    # Installed before binding, so a signal during start-up still ends in a clean exit.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            grpc_port, _ = server.start()
        except TestbedError as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
            return 2
        print(f"ready grpc={grpc_port} metrics={server.metrics_url}", flush=True)
        while not stopping.wait(0.5):
            pass
        return 0
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
