"""Per-endpoint upstream latency from Envoy's gRPC Access Log Service (ALS).

Envoy's per-endpoint stats carry no latency histogram, but every access-log entry names
the upstream host that served the request and its timings. Envoy streams those entries
to :class:`AlsServer`; :class:`~balanceiq.telemetry.als_collector.AlsCollector` folds them
into per-endpoint Prometheus histograms, served on ``/metrics`` (and as compact JSON on
``/snapshot``). Envoy samples before sending (:func:`access_log_config`): counts are then
that share of the traffic, quantiles stay unbiased.

CLI::

    python -m balanceiq.telemetry.als --grpc-port 9977 --metrics-port 9978 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, NoReturn

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2
from prometheus_client.exposition import choose_encoder

from balanceiq.exceptions import TestbedError
from balanceiq.loop import LoopThread
from balanceiq.telemetry.als_collector import BUCKETS, ORCA_HEADER, AlsCollector, orca_utilization

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


# -- serving ------------------------------------------------------------------------------


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _probe_bind(host: str, port: int, address: str) -> None:
    """Raise TestbedError if ``host:port`` is taken, before gRPC logs its own multi-line complaint."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: a port whose old connections linger in TIME_WAIT is still free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        raise TestbedError(f"cannot bind ALS gRPC server to {address}: {exc}") from exc


class AlsServer:
    """``StreamAccessLogs`` over gRPC plus ``/metrics`` over HTTP, on one background event loop.

    ``/metrics`` is a small aiohttp app: prometheus_client's ``start_http_server`` polls
    for shutdown, so every stop would cost half a second.
    """

    def __init__(
        self, collector: AlsCollector, host: str = "127.0.0.1", grpc_port: int = 0, metrics_port: int = 0
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

    def start(self, timeout: float = 10.0) -> tuple[int, int]:
        """Bind both ports and serve; ``(grpc_port, metrics_port)``, or TestbedError naming ``host:port``."""
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
        return int(port)

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
    overrides it live).
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
                # Sooner than Envoy's 1 s default, for a few more small messages.
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
                # Not tied to x-request-id: reused request ids must not bias what is measured.
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
