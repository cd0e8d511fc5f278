"""The gRPC side: ADS and standalone EDS, state-of-the-world and delta, on grpc.aio.

:class:`XdsServer` owns a :class:`~balanceiq.xds.store.SnapshotStore` and runs a grpc.aio
server on its own event loop in a background thread, so it behaves the same inside a Ray
actor, a test or a benchmark. Streams are handled by the state machines in
:mod:`balanceiq.xds.protocol`; responses are pre-encoded bytes (see
:mod:`balanceiq.xds.snapshot`), so the servicers register an identity serializer.

One store watcher hops each publish onto the event loop once, and the loop fans it out
to every stream's queue: 1,000 streams cost one cross-thread wake-up, not 1,000.

Bad input never takes more than its own stream down. A request that is not a valid
protobuf, or that :mod:`~balanceiq.xds.protocol` refuses, ends that stream with
``INVALID_ARGUMENT`` (or ``RESOURCE_EXHAUSTED`` past a limit) and a message saying why;
one larger than :data:`MAX_REQUEST_BYTES` is refused by gRPC itself. Each is counted by
reason in ``status()["requests_refused"]`` (ignored requests in ``requests_ignored``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from balanceiq.config import ClusterConfig, Settings, TlsConfig, is_loopback
from balanceiq.exceptions import AssignmentError, XdsBindError, XdsError, XdsRequestError
from balanceiq.loop import LoopThread
from balanceiq.xds.assignment import Assignment, EndpointAssignment
from balanceiq.xds.protocol import DeltaStream, SotwStream, StatusRegistry
from balanceiq.xds.snapshot import EDS_TYPE, Snapshot, sotw_response
from balanceiq.xds.store import SnapshotStore

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
EDS_SERVICE = "envoy.service.endpoint.v3.EndpointDiscoveryService"

# Largest request accepted. xDS requests are small: Envoy's first request carries its
# node (build, locality, metadata and the list of its ~400 extensions: tens of KiB), later
# ones a nonce and the subscribed names (one per cluster). Even a delta reconnect naming
# 10,000 resources with versions stays under 1 MiB. 4 MiB (gRPC's own default) leaves
# ample room while bounding what one stream can make the server allocate per message;
# the former 16 MiB let 1,000 streams pin 16 GB.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Requests read ahead of processing, per stream. Past it the reader stops reading, so
# gRPC flow control pushes back on a client that sends faster than it reads responses
# (otherwise its requests would pile up in memory behind a blocked write).
_READ_AHEAD = 16

_GRPC_OPTIONS = [
    # gRPC turns SO_REUSEPORT on by default; a second server on the same port would then
    # silently share it and half the Envoys would talk to a stale control plane.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Envoy keeps the ADS stream open for days: keepalives find dead peers.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def _identity(b: bytes) -> bytes:
    return b


class _Malformed:
    """What a request that does not parse deserializes to.

    With a deserializer that raises, the error surfaced from ``context.read()`` and the
    stream ended with status OK, as if the client had simply left (and a unary call got
    grpc's own logged traceback); this way the handler refuses it with INVALID_ARGUMENT
    and a message, and counts it.
    """

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Malformed(str(exc) or "not a valid protobuf message")

    return deserialize


class _StreamQueue(asyncio.Queue[tuple[str, Any]]):
    """A stream's inbox. ``snap_pending`` keeps at most one publish queued: only the
    latest snapshot matters, and a stream blocked on a slow client must not collect one
    entry per push."""

    snap_pending = False


def assignment_from_config(cluster: ClusterConfig) -> Assignment:
    return Assignment(
        cluster.name,
        tuple(
            EndpointAssignment(
                address=ep.address,
                host=ep.host,
                port=ep.port,
                weight=ep.weight,
                cloud=ep.cloud,
                region=ep.region,
                zone=ep.zone,
                cost_per_million_requests=ep.cost_per_million_requests,
            )
            for ep in cluster.endpoints
        ),
    )


def merge_restored(configured: Assignment, restored: Assignment | None) -> Assignment:
    """Config decides membership; the restored state decides weight and health.

    So a restart serves the last weights, while an endpoint added to or removed from the
    config file still takes effect.
    """
    if restored is None:
        return configured
    old = {ep.address: ep for ep in restored.endpoints}
    weights = {a: old[a].weight for a in configured.weights if a in old}
    health = {a: old[a].health for a in configured.weights if a in old}
    return configured.with_updates(weights, health)


def _read_pem(tls: TlsConfig, name: str) -> bytes:
    path = getattr(tls, name)
    text = str(path)
    # Settings built in code skip the config's check for PEM pasted where a path belongs;
    # the OSError's text would carry the key itself into the message and the logs.
    shown = "(not a path: it looks like PEM content)" if "BEGIN" in text or "\n" in text else text[:300]
    try:
        return Path(path).read_bytes()
    except (OSError, ValueError, TypeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        # Not chained: a logged traceback would print the OSError, and with it the "file name".
        raise XdsError(f"cannot read xds.tls.{name} {shown}: {why}") from None


def _server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    key = _read_pem(tls, "key_file")
    cert = _read_pem(tls, "cert_file")
    ca = _read_pem(tls, "ca_file") if tls.ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=tls.require_client_cert)


class XdsServer:
    """ADS + EDS (SotW and delta) over one store. Start with :meth:`start`."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str | None = None,
        port: int | None = None,
        state_dir: Path | str | None = None,
    ) -> None:
        self.settings = settings
        self.host = host if host is not None else settings.xds.host
        self.requested_port = port if port is not None else settings.xds.port
        tls = settings.xds.tls
        self.insecure_remote = not is_loopback(self.host) and not (tls.enabled and tls.require_client_cert)
        if self.insecure_remote and not settings.xds.allow_insecure_remote:
            # The config refuses this too; a host passed in code must not slip past it.
            raise XdsError(
                f"refusing to serve xDS on {self.host} without mutual TLS: Envoy applies whatever its "
                "management server sends (set xds.tls, or xds.allow_insecure_remote; see SECURITY.md)"
            )
        self.port: int | None = None
        self.store = SnapshotStore(state_dir)
        self.registry = StatusRegistry()
        self.started_at = time.time()
        self.listening_since: float | None = None
        self._publish_lock = threading.Lock()
        self._loop = LoopThread("xds-grpc")
        self._server: grpc.aio.Server | None = None
        self._queues: set[_StreamQueue] = set()
        self._unwatch: Callable[[], None] = lambda: None

        restored = {a.cluster: a for a in (self.store.restore() or [])}
        self.restored = bool(restored)
        initial = [merge_restored(assignment_from_config(c), restored.get(c.name)) for c in settings.clusters]
        # The write side's source of truth; a raw snapshot (tests) does not replace it.
        self._assignments = {a.cluster: a for a in initial}
        self.store.publish_assignments(initial)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> int:
        """Bind and serve; returns the bound port. Raises XdsBindError if it is taken."""
        if self._loop.running:
            raise XdsError("xDS server already started")
        self._loop.start()
        self._unwatch = self.store.watch(self._on_publish)
        try:
            self.port = self._loop.run(self._start_grpc(), timeout)
            self.listening_since = time.time()
        except TimeoutError as exc:
            self.stop()
            raise XdsError(f"xDS server did not start within {timeout}s") from exc
        except BaseException:
            self.stop()
            raise
        log.info("xDS server listening on %s:%s", self.host, self.port)
        if self.insecure_remote:
            log.warning(
                "xDS server on %s:%s is reachable beyond loopback without mutual TLS "
                "(xds.allow_insecure_remote): anyone who reaches it reads every endpoint",
                self.host,
                self.port,
            )
        return self.port

    async def _start_grpc(self) -> int:
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        server.add_generic_rpc_handlers(self._handlers())
        address = f"{self.host}:{self.requested_port}"
        tls = self.settings.xds.tls
        try:
            if tls.enabled:
                port = server.add_secure_port(address, _server_credentials(tls))
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise XdsBindError(f"cannot bind xDS server to {address}: {exc}") from exc
        if not port:
            raise XdsBindError(f"cannot bind xDS server to {address}: port in use?")
        await server.start()
        self._server = server
        return port

    def stop(self, grace: float = 0.5) -> None:
        self._unwatch()
        self._unwatch = lambda: None
        server, self._server = self._server, None
        self._loop.close(server.stop(grace) if server is not None else None, timeout=grace + 5)

    # -- the write side ---------------------------------------------------------------------

    def assignment(self, cluster: str) -> Assignment:
        try:
            return self._assignments[cluster]
        except KeyError:
            known = ", ".join(sorted(self._assignments))
            raise AssignmentError(f"unknown cluster {cluster!r}; known: {known}") from None

    def set_assignment(
        self,
        cluster: str,
        weights: Mapping[str, object] | None = None,
        health: Mapping[str, object] | None = None,
    ) -> str:
        """Change some endpoints' weights and/or health; returns the new version.

        Invalid input raises AssignmentError and leaves the store unchanged.
        """
        with self._publish_lock:  # read-modify-write of the current assignments
            current = self.assignment(cluster)
            updated = current.with_updates(weights, health)
            latest = self.store.latest()
            if updated == current and latest is not None and cluster in latest.assignments:
                # Nothing changed: no new version, so callers waiting for its ACK do
                # not wait for a response that streams rightly never send.
                return latest.version
            assignments = {**self._assignments, cluster: updated}
            version = self.store.publish_assignments(assignments.values()).version
            self._assignments = assignments
            return version

    def publish(self, snapshot: Snapshot) -> None:
        """Publish a prebuilt snapshot (see :func:`balanceiq.xds.snapshot.raw_snapshot`)."""
        with self._publish_lock:
            self.store.publish(snapshot)

    # -- the read side ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        snap = self.store.latest()
        return {
            "listening": f"{self.host}:{self.port}" if self.port else None,
            "tls": self.settings.xds.tls.enabled,
            "epoch": self.store.epoch,
            "version": snap.version if snap else None,
            "restored_from_state": self.restored,
            "started_at": self.started_at,
            "listening_since": self.listening_since,
            "clusters": {name: a.to_json() for name, a in self._assignments.items()},
            **self.registry.to_json(),
        }

    def wait_for_ack(self, version: str, node_id: str | None = None, timeout: float = 5.0) -> bool:
        """Block until a node (any, or the named one) ACKs ``version``."""

        def done(nodes: Mapping[str, Any]) -> bool:
            return any(n.last_acked_version == version for nid, n in nodes.items() if node_id is None or nid == node_id)

        return self.registry.wait_for(done, timeout)

    # -- streams ----------------------------------------------------------------------------

    def _on_publish(self, snapshot: Snapshot) -> None:
        self._loop.call_soon(self._fanout)

    def _fanout(self) -> None:
        for q in self._queues:
            if not q.snap_pending:
                q.snap_pending = True
                q.put_nowait(("snap", None))

    async def _refuse(
        self, context: grpc.aio.ServicerContext, api: str, node_id: str | None, exc: XdsRequestError
    ) -> None:
        self.registry.refused(exc.reason, api, node_id, str(exc))
        await context.abort(grpc.StatusCode[exc.status], f"{exc} ({exc.reason})")

    async def _stream(self, context: grpc.aio.ServicerContext, machine: SotwStream | DeltaStream) -> None:
        queue = _StreamQueue()
        credits = asyncio.Semaphore(_READ_AHEAD)
        self._queues.add(queue)

        async def reader() -> None:
            try:
                while True:
                    await credits.acquire()
                    req = await context.read()
                    if req is grpc.aio.EOF:
                        if not context.peer():
                            # gRPC ended the call itself: a client's half-close, cancel or
                            # disconnect keeps the peer, a request over the size limit
                            # (answered RESOURCE_EXHAUSTED by gRPC) clears it. grpc.aio
                            # says nothing else about it, and it must still be counted.
                            self.registry.refused(
                                "oversize",
                                machine.api,
                                machine.node_id,
                                f"request over {MAX_REQUEST_BYTES} bytes (refused by gRPC)",
                            )
                        break
                    queue.put_nowait(("req", req))
            except (grpc.aio.AioRpcError, grpc.aio.AbortError, asyncio.CancelledError):
                pass  # the client went away, or the handler refused the stream meanwhile
            except Exception as exc:  # grpc internals: this stream ends, the server goes on
                log.warning("xDS stream read failed: %s: %s", type(exc).__name__, exc)
            finally:
                queue.put_nowait(("eof", None))

        read_task = asyncio.ensure_future(reader())
        try:
            while True:
                kind, req = await queue.get()
                if kind == "eof":
                    break
                try:
                    if kind == "snap":
                        queue.snap_pending = False
                        snapshot = self.store.latest()
                        out = machine.on_snapshot(snapshot) if snapshot else []
                    else:
                        credits.release()
                        if isinstance(req, _Malformed):
                            raise XdsRequestError("malformed", f"not a valid {machine.api} request: {req.error}")
                        out = machine.on_request(req, self.store.latest())
                except XdsRequestError as exc:
                    await self._refuse(context, machine.api, machine.node_id, exc)
                    return
                except Exception as exc:  # a bug: it ends this stream only, loudly
                    log.exception("xDS %s stream of node %r failed", machine.api, machine.node_id)
                    self.registry.refused(
                        "internal_error", machine.api, machine.node_id, f"{type(exc).__name__}: {exc}"
                    )
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error in the xDS server")
                    return
                for payload in out:
                    await context.write(payload)
        finally:
            self._queues.discard(queue)
            read_task.cancel()
            machine.close()

    async def _ads_sotw(self, _it: Any, context: grpc.aio.ServicerContext) -> None:
        await self._stream(context, SotwStream(self.registry, "ads-sotw"))

    async def _ads_delta(self, _it: Any, context: grpc.aio.ServicerContext) -> None:
        await self._stream(context, DeltaStream(self.registry, "ads-delta"))

    async def _eds_sotw(self, _it: Any, context: grpc.aio.ServicerContext) -> None:
        await self._stream(context, SotwStream(self.registry, "eds-sotw"))

    async def _eds_delta(self, _it: Any, context: grpc.aio.ServicerContext) -> None:
        await self._stream(context, DeltaStream(self.registry, "eds-delta"))

    async def _eds_fetch(
        self, req: discovery_pb2.DiscoveryRequest | _Malformed, context: grpc.aio.ServicerContext
    ) -> bytes:
        if isinstance(req, _Malformed):
            await self._refuse(
                context, "eds-fetch", None, XdsRequestError("malformed", f"not a valid request: {req.error}")
            )
        assert isinstance(req, discovery_pb2.DiscoveryRequest)
        if req.type_url and req.type_url != EDS_TYPE:
            message = f"FetchEndpoints serves {EDS_TYPE} only, not {req.type_url[:100]!r}"
            await self._refuse(context, "eds-fetch", None, XdsRequestError("unsupported_type", message))
        snapshot = self.store.latest()
        if snapshot is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no snapshot yet")
        names = frozenset(req.resource_names) if req.resource_names else None
        return sotw_response(snapshot, names, "")  # type: ignore[arg-type]

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        sotw = _lenient(discovery_pb2.DiscoveryRequest.FromString)
        delta = _lenient(discovery_pb2.DeltaDiscoveryRequest.FromString)

        def stream(fn: Any, deser: Any) -> grpc.RpcMethodHandler:
            return grpc.stream_stream_rpc_method_handler(fn, request_deserializer=deser, response_serializer=_identity)

        return [
            grpc.method_handlers_generic_handler(
                ADS_SERVICE,
                {
                    "StreamAggregatedResources": stream(self._ads_sotw, sotw),
                    "DeltaAggregatedResources": stream(self._ads_delta, delta),
                },
            ),
            grpc.method_handlers_generic_handler(
                EDS_SERVICE,
                {
                    "StreamEndpoints": stream(self._eds_sotw, sotw),
                    "DeltaEndpoints": stream(self._eds_delta, delta),
                    "FetchEndpoints": grpc.unary_unary_rpc_method_handler(
                        self._eds_fetch, request_deserializer=sotw, response_serializer=_identity
                    ),
                },
            ),
        ]
