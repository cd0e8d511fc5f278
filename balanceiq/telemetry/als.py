"""Per-endpoint upstream latency from Envoy's gRPC Access Log Service (ALS). Envoy's per-endpoint stats
carry no latency histogram, but each access-log entry names the upstream host and its timings. Envoy
streams them to :class:`AlsServer`; :class:`AlsCollector` folds them into per-endpoint histograms served
on ``/metrics`` (compact JSON on ``/snapshot``).

CLI: ``python -m balanceiq.telemetry.als --grpc-port 9977 --metrics-port 9978 [--host 127.0.0.1]``"""

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
from typing import Any, NoReturn

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2
from prometheus_client.exposition import choose_encoder

from balanceiq.exceptions import TestbedError
from balanceiq.loop import GRPC_OPTIONS, LoopThread
from balanceiq.telemetry.als_collector import ORCA_HEADER, AlsCollector

log = logging.getLogger(__name__)

_HTTP_OPTS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _host_port(host: str, port: int | None) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AlsServer:
    """``StreamAccessLogs`` over gRPC plus ``/metrics`` over HTTP, on one background event loop (aiohttp:
    prometheus_client's ``start_http_server`` polls for shutdown, 0.5 s per stop)."""

    def __init__(
        self, collector: AlsCollector, host: str = "127.0.0.1", grpc_port: int = 0, metrics_port: int = 0
    ) -> None:
        self.collector = collector
        self.host = host
        self._requested = (grpc_port, metrics_port)
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._loop = LoopThread("als")
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_port is None:
            return None
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://{_host_port(host, self.metrics_port)}/metrics"

    def start(self, timeout: float = 10.0) -> tuple[int, int]:
        """Bind both ports and serve; ``(grpc_port, metrics_port)``, or TestbedError naming ``host:port``."""
        if self._loop.running:
            raise TestbedError("ALS server already started")
        self._loop.start()
        try:
            grpc_port, metrics_port = self._loop.run(self._start_both(), timeout)
        except BaseException as exc:
            self.stop()
            if isinstance(exc, TimeoutError):
                raise TestbedError(f"ALS server did not start within {timeout}s") from exc
            raise
        self.grpc_port, self.metrics_port = grpc_port, metrics_port
        log.info("ALS listening on %s, metrics on %s", _host_port(self.host, grpc_port), self.metrics_url)
        return grpc_port, metrics_port

    async def _start_both(self) -> tuple[int, int]:
        return await self._start_grpc(), await self._start_metrics()

    async def _start_grpc(self) -> int:
        address = _host_port(self.host, self._requested[0])
        try:
            # Bound by hand first: a taken port is then one line, not gRPC's multi-line complaint.
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                self.host, self._requested[0], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, kind, proto) as probe:
                # As gRPC does: a port whose old connections linger in TIME_WAIT is still free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
            server = grpc.aio.server(options=GRPC_OPTIONS)
            server.add_generic_rpc_handlers([self._handler()])
            port = server.add_insecure_port(address)
        except (OSError, RuntimeError) as exc:
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
        site = web.TCPSite(runner, self.host, self._requested[1], reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            address = _host_port(self.host, self._requested[1])
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
        self._server = self.grpc_port = self.metrics_port = None

    async def _stream_access_logs(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        self.collector.streams.inc()
        try:
            async for message in request_iterator:
                self.collector.observe_message(message)
        finally:
            self.collector.streams.dec()
        return als_pb2.StreamAccessLogsResponse()

    def _handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "envoy.service.accesslog.v3.AccessLogService",
            {
                "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                    self._stream_access_logs,
                    request_deserializer=als_pb2.StreamAccessLogsMessage.FromString,
                    response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
                )
            },
        )


def access_log_config(cluster_name: str = "als_cluster", sample_percent: float = 100.0) -> dict[str, Any]:
    """One entry for the HCM's ``access_log`` list: ALS over gRPC to ``cluster_name``. ``sample_percent < 100``
    adds a runtime filter (key ``balanceiq.als_sample``): counts are that share, quantiles stay unbiased."""
    if not isinstance(sample_percent, (int, float)) or not 0.0 <= sample_percent <= 100.0:
        raise ValueError(f"sample_percent must be within 0..100, got {sample_percent!r}")
    entry: dict[str, Any] = {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "balanceiq",
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: callers (and supervisors' logs) read it.
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Serve ALS + /metrics until SIGTERM/SIGINT. 0 after a signal, 2 on bad args or bind."""
    p = _Parser(
        prog="python -m balanceiq.telemetry.als",
        description="Receive Envoy access logs over gRPC; serve per-endpoint latency on /metrics.",
    )
    p.add_argument("--grpc-port", type=int, required=True, help="ALS gRPC port (0: any free)")
    p.add_argument("--metrics-port", type=int, required=True, help="/metrics port (0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind both ports on")
    p.add_argument("--max-endpoints", type=int, default=10_000, help="most series kept; later ones are dropped")
    args = p.parse_args(argv)
    for flag, port in (("--grpc-port", args.grpc_port), ("--metrics-port", args.metrics_port)):
        if not 0 <= port <= 65535:
            p.error(f"argument {flag}: port must be 0..65535, got {port}")
    if args.max_endpoints < 0:
        p.error(f"argument --max-endpoints: must be >= 0, got {args.max_endpoints}")

    server = AlsServer(AlsCollector(max_endpoints=args.max_endpoints), args.host, args.grpc_port, args.metrics_port)
    stopping = threading.Event()
    # Installed before binding, so a signal during start-up still ends in a clean exit.
    previous = {s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGTERM, signal.SIGINT)}
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
