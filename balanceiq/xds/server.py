"""The gRPC side (ADS and standalone EDS, SotW and delta, on grpc.aio): :class:`XdsServer` serves a
:class:`~balanceiq.xds.store.SnapshotStore` from its own event loop thread, each stream running a state
machine of :mod:`balanceiq.xds.protocol`. Bad input ends only its own stream (``requests_refused``)."""

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
from google.protobuf.message import DecodeError, Message

from balanceiq.config import ClusterConfig, Settings, TlsConfig, is_loopback
from balanceiq.exceptions import AssignmentError, XdsBindError, XdsError, XdsRequestError
from balanceiq.loop import GRPC_OPTIONS, LoopThread
from balanceiq.xds.assignment import Assignment, EndpointAssignment
from balanceiq.xds.protocol import DeltaStream, SotwStream, StatusRegistry
from balanceiq.xds.snapshot import EDS_TYPE, sotw_response
from balanceiq.xds.store import SnapshotStore

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # one stream's allocation per message (Envoy's largest request: tens of KiB)
_READ_AHEAD = 16  # requests per stream: past it gRPC flow control pushes back on a client sending too fast

_GRPC_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def _parse(message: type[Message], data: bytes, what: str) -> Any:
    # Parsed here, not by a gRPC deserializer: one that raises ends the stream with status OK.
    try:
        return message.FromString(data)
    except DecodeError as exc:
        raise XdsRequestError("malformed", f"not a valid {what}: {exc or 'not a valid protobuf message'}") from None


class _StreamQueue(asyncio.Queue[tuple[str, Any]]):
    """A stream's inbox; ``snap_pending`` keeps at most one publish queued (only the latest matters)."""

    snap_pending = False


_CONFIG_FIELDS = ("address", "host", "port", "weight", "cloud", "region", "zone", "cost_per_million_requests")


def initial_assignment(cluster: ClusterConfig, restored: Assignment | None) -> Assignment:
    """Config decides membership; the restored state decides weight and health."""
    eps = (EndpointAssignment(**{k: getattr(ep, k) for k in _CONFIG_FIELDS}) for ep in cluster.endpoints)
    configured = Assignment(cluster.name, tuple(eps))
    old = {ep.address: ep for ep in restored.endpoints} if restored else {}
    kept = [old[a] for a in configured.weights if a in old]
    return configured.with_updates({ep.address: ep.weight for ep in kept}, {ep.address: ep.health for ep in kept})


def _read_pem(tls: TlsConfig, name: str) -> bytes:
    path = getattr(tls, name)
    text = str(path)
    # PEM pasted where a path belongs must not reach the message and the logs.
    shown = "(not a path: it looks like PEM content)" if "BEGIN" in text or "\n" in text else text[:300]
    try:
        return Path(path).read_bytes()
    except (OSError, ValueError, TypeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        # Not chained: a logged traceback would print the OSError, and with it the "file name".
        raise XdsError(f"cannot read xds.tls.{name} {shown}: {why}") from None


def _server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    key_cert = (_read_pem(tls, "key_file"), _read_pem(tls, "cert_file"))
    ca = _read_pem(tls, "ca_file") if tls.ca_file else None
    return grpc.ssl_server_credentials([key_cert], root_certificates=ca, require_client_auth=tls.require_client_cert)


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
        initial = [initial_assignment(c, restored.get(c.name)) for c in settings.clusters]
        # The write side's source of truth; a snapshot published straight to the store does not change it.
        self._assignments = {a.cluster: a for a in initial}
        self.store.publish_assignments(initial)

    def start(self, timeout: float = 10.0) -> int:
        """Bind and serve; returns the bound port. Raises XdsBindError if it is taken."""
        if self._loop.running:
            raise XdsError("xDS server already started")
        self._loop.start()
        self._unwatch = self.store.watch(lambda _snapshot: self._loop.call_soon(self._fanout))
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
            creds = _server_credentials(tls) if tls.enabled else None
            port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError as exc:
            raise XdsBindError(f"cannot bind xDS server to {address}: {exc}") from exc
        if not port:
            raise XdsBindError(f"cannot bind xDS server to {address}: port in use?")
        await server.start()
        self._server = server
        return int(port)

    def stop(self, grace: float = 0.5) -> None:
        self._unwatch()
        self._unwatch = lambda: None
        server, self._server = self._server, None
        self._loop.close(server.stop(grace) if server is not None else None, timeout=grace + 5)

    def assignment(self, cluster: str) -> Assignment:
        try:
            return self._assignments[cluster]
        except KeyError:
            known = ", ".join(sorted(self._assignments))
            raise AssignmentError(f"unknown cluster {cluster!r}; known: {known}") from None

    def set_assignment(
        self, cluster: str, weights: Mapping[str, object] | None = None, health: Mapping[str, object] | None = None
    ) -> str:
        """Change some endpoints' weights and/or health; the new version (AssignmentError: no change)."""
        with self._publish_lock:  # read-modify-write of the current assignments
            current = self.assignment(cluster)
            updated = current.with_updates(weights, health)
            latest = self.store.latest()
            if updated == current and latest is not None and cluster in latest.assignments:
                # No new version: callers would wait for an ACK that never comes.
                return latest.version
            assignments = {**self._assignments, cluster: updated}
            version = self.store.publish_assignments(assignments.values()).version
            self._assignments = assignments
            return version

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
        return self.registry.wait_for(
            lambda nodes: any(n.last_acked_version == version for n in nodes.values() if node_id in (None, n.node_id)),
            timeout,
        )

    def _fanout(self) -> None:
        """On the loop, once per publish: wake every stream (at most one pending event each)."""
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
                            # gRPC ended the call over the size limit (a client leaving keeps
                            # the peer); grpc.aio says nothing else, and it must be counted.
                            detail = f"request over {MAX_REQUEST_BYTES} bytes (refused by gRPC)"
                            self.registry.refused("oversize", machine.api, machine.node_id, detail)
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
                        parsed = _parse(machine.request_type, req, f"{machine.api} request")
                        out = machine.on_request(parsed, self.store.latest())
                except XdsRequestError as exc:
                    await self._refuse(context, machine.api, machine.node_id, exc)
                    return
                except Exception as exc:  # a bug: it ends this stream only, loudly
                    log.exception("xDS %s stream of node %r failed", machine.api, machine.node_id)
                    detail = f"{type(exc).__name__}: {exc}"
                    self.registry.refused("internal_error", machine.api, machine.node_id, detail)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error in the xDS server")
                    return
                for payload in out:
                    await context.write(payload)
        finally:
            self._queues.discard(queue)
            read_task.cancel()
            machine.close()

    async def _eds_fetch(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            req = _parse(discovery_pb2.DiscoveryRequest, data, "request")
            if req.type_url and req.type_url != EDS_TYPE:
                message = f"FetchEndpoints serves {EDS_TYPE} only, not {req.type_url[:100]!r}"
                raise XdsRequestError("unsupported_type", message)
        except XdsRequestError as exc:
            await self._refuse(context, "eds-fetch", None, exc)
        snapshot = self.store.latest()
        if snapshot is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no snapshot yet")
        names = frozenset(req.resource_names) if req.resource_names else None
        return sotw_response(snapshot, names, "")  # type: ignore[arg-type]

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        # No (de)serializers: requests are parsed by _parse, responses are encoded already.
        def stream(api: str, machine: type[SotwStream | DeltaStream]) -> grpc.RpcMethodHandler:
            async def handle(_it: Any, context: grpc.aio.ServicerContext) -> None:
                await self._stream(context, machine(self.registry, api))

            return grpc.stream_stream_rpc_method_handler(handle)

        return [
            grpc.method_handlers_generic_handler(
                "envoy.service.discovery.v3.AggregatedDiscoveryService",
                {
                    "StreamAggregatedResources": stream("ads-sotw", SotwStream),
                    "DeltaAggregatedResources": stream("ads-delta", DeltaStream),
                },
            ),
            grpc.method_handlers_generic_handler(
                "envoy.service.endpoint.v3.EndpointDiscoveryService",
                {
                    "StreamEndpoints": stream("eds-sotw", SotwStream),
                    "DeltaEndpoints": stream("eds-delta", DeltaStream),
                    "FetchEndpoints": grpc.unary_unary_rpc_method_handler(self._eds_fetch),
                },
            ),
        ]
