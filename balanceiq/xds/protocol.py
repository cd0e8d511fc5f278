"""The xDS protocol (envoyproxy.io xds_protocol) as plain state machines, no gRPC: one :class:`SotwStream` or
:class:`DeltaStream` per gRPC stream turns requests and new snapshots into encoded responses. Bad input is *ignored*
where the protocol says so, or *refused* with :class:`~balanceiq.exceptions.XdsRequestError` (ending that stream only)
where it would let one client grow the server's memory; both counted in :class:`StatusRegistry`."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

from envoy.service.discovery.v3 import discovery_pb2

from balanceiq.exceptions import XdsRequestError
from balanceiq.xds.snapshot import EDS_TYPE, Snapshot, delta_response, sotw_response

_NONCES = itertools.count(1)

# Limits on what one client can make the server hold; Envoy's real values are far below.
MAX_NODE_ID = 1024
MAX_NAME = 1024  # one resource name or type URL
MAX_NAMES = 10_000  # names subscribed on one stream, per type
MAX_UNSUPPORTED_TYPES = 32  # distinct types we do not serve, asked for on one stream
MAX_ERROR_DETAIL = 1024  # characters of a NACK's message kept in the status
MAX_CLUSTER_FIELD = 256  # characters of node.cluster kept
MAX_NODES = 10_000  # node records kept; the longest-disconnected are dropped past it


def _too_many(reason: str, message: str) -> XdsRequestError:
    return XdsRequestError(reason, message, "RESOURCE_EXHAUSTED")


@dataclass
class NodeStatus:
    node_id: str
    cluster: str = ""
    streams: int = 0
    api: set[str] = field(default_factory=set)
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    last_acked_version: str | None = None
    last_acked_at: float | None = None
    last_nacked_version: str | None = None
    last_error: str | None = None
    acks: int = 0
    nacks: int = 0
    responses_sent: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "connected": self.streams > 0, "api": sorted(self.api)}


class StatusRegistry:
    """Who is connected, what they ACKed and rejected, and bad requests. Thread-safe."""

    def __init__(self, max_rejections: int = 100) -> None:
        self._lock = threading.Condition()
        self._nodes: dict[str, NodeStatus] = {}
        self.max_nodes = MAX_NODES
        self.rejections: deque[dict[str, Any]] = deque(maxlen=max_rejections)
        self.refused_by_reason: Counter[str] = Counter()
        self.ignored_by_reason: Counter[str] = Counter()
        self.bad_requests: deque[dict[str, Any]] = deque(maxlen=max_rejections)

    def _node(self, node_id: str) -> NodeStatus:
        node = self._nodes.get(node_id)
        if node is None:
            if len(self._nodes) >= self.max_nodes:
                # Clients choose their node ids: one reconnecting under new ids must not grow this forever.
                gone = sorted((n for n in self._nodes.values() if n.streams == 0), key=lambda n: n.last_seen)
                for n in gone[: max(1, self.max_nodes // 10)]:
                    del self._nodes[n.node_id]
            node = self._nodes[node_id] = NodeStatus(node_id)
        node.last_seen = time.time()
        return node

    def _bad(self, kind: str, counter: Counter[str], reason: str, api: str, node_id: str | None, detail: str) -> None:
        with self._lock:
            counter[reason] += 1
            bad = {"kind": kind, "reason": reason, "api": api, "node_id": node_id, "detail": detail[:200]}
            self.bad_requests.append({**bad, "at": time.time()})
            self._lock.notify_all()

    def refused(self, reason: str, api: str, node_id: str | None = None, detail: str = "") -> None:
        """A request that ended its stream with an error status."""
        self._bad("refused", self.refused_by_reason, reason, api, node_id, detail)

    def ignored(self, reason: str, api: str, node_id: str | None = None, detail: str = "") -> None:
        """A request not acted on, as the protocol says (the stream goes on)."""
        self._bad("ignored", self.ignored_by_reason, reason, api, node_id, detail)

    def opened(self, node_id: str, cluster: str, api: str) -> None:
        with self._lock:
            node = self._node(node_id)
            node.cluster = cluster[:MAX_CLUSTER_FIELD] or node.cluster
            node.streams += 1
            node.api.add(api)

    def closed(self, node_id: str) -> None:
        with self._lock:
            node = self._node(node_id)
            node.streams = max(0, node.streams - 1)

    def sent(self, node_id: str) -> None:
        with self._lock:
            self._node(node_id).responses_sent += 1

    def ack(self, node_id: str, version: str) -> None:
        with self._lock:
            node = self._node(node_id)
            node.acks += 1
            node.last_acked_version = version
            node.last_acked_at = time.time()
            self._lock.notify_all()

    def nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        error = error[:MAX_ERROR_DETAIL]  # a client could send megabytes here, a hundred times over
        with self._lock:
            node = self._node(node_id)
            node.nacks += 1
            node.last_nacked_version = version
            node.last_error = error
            rejection = {"node_id": node_id, "type_url": type_url, "version": version, "error": error}
            self.rejections.append({**rejection, "at": time.time()})
            self._lock.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, NodeStatus]], bool], timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self._nodes), timeout=timeout)

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "nodes": [n.to_json() for n in self._nodes.values()],
                "connected": sum(1 for n in self._nodes.values() if n.streams > 0),
                "rejections": list(self.rejections),
                "requests_refused": dict(self.refused_by_reason),
                "requests_ignored": dict(self.ignored_by_reason),
                "bad_requests": list(self.bad_requests),
            }


W = TypeVar("W")


class _Stream(Generic[W]):
    """Node identity, the type filter and one watch per type, shared by both flavours."""

    def __init__(self, registry: StatusRegistry, api: str) -> None:
        self.registry = registry
        self.api = api
        self.node_id: str | None = None
        self.unsupported_types: set[str] = set()
        self._watches: dict[str, W] = {}

    def on_snapshot(self, snapshot: Snapshot) -> list[bytes]:
        watch = self._watches.get(snapshot.type_url)
        return [] if watch is None else self._send(watch, snapshot)

    def _send(self, watch: W, snapshot: Snapshot | None) -> list[bytes]:
        raise NotImplementedError

    def _identify(self, node: Any) -> str:
        # With set_node_on_first_message_only, only the first request names the node.
        if self.node_id is not None:
            return self.node_id
        node_id = node.id
        if len(node_id) > MAX_NODE_ID:
            raise XdsRequestError("bad_node_id", f"node id is {len(node_id)} characters long; at most {MAX_NODE_ID}")
        if not node_id.isprintable():
            # Control characters would end up in status JSON, metrics labels and logs.
            raise XdsRequestError("bad_node_id", "node id contains control or other non-printable characters")
        self.node_id = node_id or "<anonymous>"
        self.registry.opened(self.node_id, node.cluster, self.api)
        return self.node_id

    def _check_names(self, type_url: str, names: Iterable[str]) -> None:
        if len(type_url) > MAX_NAME:
            raise XdsRequestError("bad_name", f"type_url is {len(type_url)} characters long; at most {MAX_NAME}")
        for name in names:
            if len(name) > MAX_NAME:
                raise XdsRequestError("bad_name", f"a resource name is {len(name)} characters long; at most {MAX_NAME}")

    def _served(self, type_url: str, snapshot: Snapshot | None) -> bool:
        if snapshot is not None and type_url != snapshot.type_url:
            # ADS may multiplex types we do not serve; an empty answer would delete them.
            self.unsupported_types.add(type_url)
            if len(self.unsupported_types) > MAX_UNSUPPORTED_TYPES:
                raise _too_many(
                    "too_many_types", f"more than {MAX_UNSUPPORTED_TYPES} distinct unsupported types on one stream"
                )
            self.registry.ignored("unsupported_type", self.api, self.node_id, type_url[:100])
            return False
        return True

    def close(self) -> None:
        if self.node_id is not None:
            self.registry.closed(self.node_id)


@dataclass
class _SotwWatch:
    names: frozenset[str] | None = None  # None: wildcard
    nonce: str | None = None  # latest nonce sent; None until the first response
    sent: dict[str, str | None] | None = None  # name -> version in the latest response
    sent_version: str | None = None
    waiting: bool = False  # the client has an answered-nothing-yet request open


class SotwStream(_Stream[_SotwWatch]):
    """One state-of-the-world stream (ADS or standalone EDS)."""

    request_type = discovery_pb2.DiscoveryRequest

    def on_request(self, req: discovery_pb2.DiscoveryRequest, snapshot: Snapshot | None) -> list[bytes]:
        node_id = self._identify(req.node)
        type_url = req.type_url or EDS_TYPE
        if len(req.resource_names) > MAX_NAMES:
            raise _too_many("too_many_names", f"{len(req.resource_names)} resource names; at most {MAX_NAMES}")
        self._check_names(type_url, req.resource_names)
        if not self._served(type_url, snapshot):
            return []
        watch = self._watches.setdefault(type_url, _SotwWatch())
        if req.response_nonce and req.response_nonce != watch.nonce:
            # Stale: a newer response is on its way (a request crossed a push). Not refused.
            self.registry.ignored("stale_nonce", self.api, self.node_id, req.response_nonce[:100])
            return []

        names = frozenset(req.resource_names) if req.resource_names else None
        grew = watch.names is not None and (names is None or not names <= watch.names)
        watch.names = names
        watch.waiting = True
        if not req.response_nonce:
            # First request of this type: answer, whatever version it claims (maybe a previous server's).
            watch.sent = None
        elif req.HasField("error_detail"):
            self.registry.nack(node_id, type_url, watch.sent_version or "", req.error_detail.message)
        else:
            self.registry.ack(node_id, watch.sent_version or req.version_info)
        if grew:
            watch.sent = None  # newly subscribed names must be sent even if unchanged
        return self._send(watch, snapshot)

    def _send(self, watch: _SotwWatch, snapshot: Snapshot | None) -> list[bytes]:
        # Nothing goes out while a response is unACKed (``waiting`` is False).
        if snapshot is None or not watch.waiting:
            return []
        current = snapshot.resource_versions(watch.names)
        if watch.sent is None:
            if watch.names is not None and not any(current.values()):
                return []  # nothing subscribed exists yet: remember, answer when it does
        elif current == watch.sent:
            # Unchanged, NACKed content included (go-control-plane re-sends it forever: its issues #46, #962).
            return []
        watch.nonce = str(next(_NONCES))
        watch.sent = current
        watch.sent_version = snapshot.version
        watch.waiting = False
        assert self.node_id is not None
        self.registry.sent(self.node_id)
        return [sotw_response(snapshot, watch.names, watch.nonce)]


@dataclass
class _DeltaWatch:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    client: dict[str, str] = field(default_factory=dict)  # what the client holds (ACKed)
    # nonce -> (system version, name -> version sent, None for a removal)
    pending: dict[str, tuple[str, dict[str, str | None]]] = field(default_factory=dict)
    inflight: dict[str, str | None] = field(default_factory=dict)  # name -> latest unACKed
    rejected: dict[str, str] = field(default_factory=dict)  # name -> NACKed version
    told_absent: set[str] = field(default_factory=set)  # subscribed, reported missing once


class DeltaStream(_Stream[_DeltaWatch]):
    """One incremental (delta) xDS stream (ADS or standalone EDS)."""

    request_type = discovery_pb2.DeltaDiscoveryRequest

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest, snapshot: Snapshot | None) -> list[bytes]:
        node_id = self._identify(req.node)
        type_url = req.type_url or EDS_TYPE
        if len(req.initial_resource_versions) > MAX_NAMES or len(req.resource_names_subscribe) > MAX_NAMES:
            raise _too_many("too_many_names", f"more than {MAX_NAMES} resource names in one request")
        self._check_names(type_url, [*req.resource_names_subscribe, *req.initial_resource_versions])
        if not self._served(type_url, snapshot):
            return []
        watch = self._watches.get(type_url)
        if watch is None:
            # Only the first request of a type carries what the client already has.
            wildcard = not req.resource_names_subscribe  # legacy: a first request subscribing to nothing
            watch = self._watches[type_url] = _DeltaWatch(wildcard, client=dict(req.initial_resource_versions))

        if req.response_nonce:
            self._on_answer(watch, req, node_id, type_url)
        for name in req.resource_names_subscribe:
            if name == "*":
                watch.wildcard = True
                continue
            if name not in watch.names and name not in req.initial_resource_versions:
                # A fresh subscription: the client holds nothing for it.
                watch.client.pop(name, None)
                watch.inflight.pop(name, None)
                watch.rejected.pop(name, None)
                watch.told_absent.discard(name)
            watch.names.add(name)
        if len(watch.names) > MAX_NAMES:
            raise _too_many("too_many_names", f"more than {MAX_NAMES} names subscribed on one stream")
        for name in req.resource_names_unsubscribe:
            if name == "*":
                watch.wildcard = False
                continue
            if name not in watch.names:
                # Unsubscribing what was never subscribed is a no-op in the protocol.
                self.registry.ignored("unknown_unsubscribe", self.api, node_id, name[:100])
                continue
            watch.names.discard(name)
            watch.client.pop(name, None)
            watch.inflight.pop(name, None)
            watch.told_absent.discard(name)
        return self._send(watch, snapshot)

    def _on_answer(
        self, watch: _DeltaWatch, req: discovery_pb2.DeltaDiscoveryRequest, node_id: str, type_url: str
    ) -> None:
        """The ACK or NACK of the response ``req.response_nonce`` names."""
        answered = watch.pending.pop(req.response_nonce, None)
        if answered is None:
            # Not a nonce we sent (or already answered): the subscription changes still apply.
            self.registry.ignored("unknown_nonce", self.api, node_id, req.response_nonce[:100])
            return
        version, sent = answered
        for name, ver in sent.items():
            if watch.inflight.get(name, "absent") == ver:
                del watch.inflight[name]
        if req.HasField("error_detail"):
            watch.rejected.update({name: ver for name, ver in sent.items() if ver is not None})
            self.registry.nack(node_id, type_url, version, req.error_detail.message)
            return
        for name, ver in sent.items():
            if ver is None:
                watch.client.pop(name, None)
            else:
                watch.client[name] = ver
                watch.rejected.pop(name, None)
        self.registry.ack(node_id, version)

    def _send(self, watch: _DeltaWatch, snapshot: Snapshot | None) -> list[bytes]:
        """What the client lacks, and what vanished or is subscribed before it exists (named once)."""
        if snapshot is None:
            return []
        interested = set(watch.names)
        if watch.wildcard:
            interested |= set(snapshot.resources) | set(watch.client)
        send = []
        removed = []
        for name in sorted(interested):
            res = snapshot.resources.get(name)
            known = watch.inflight[name] if name in watch.inflight else watch.client.get(name)
            if res is not None:
                if res.version != known and watch.rejected.get(name) != res.version:
                    send.append(res)
                    watch.told_absent.discard(name)
            elif known is not None:
                removed.append(name)
            elif name in watch.names and name not in watch.told_absent:
                # Say once it does not exist (yet): Envoy finishes warming, not waiting out initial_fetch_timeout.
                removed.append(name)
                watch.told_absent.add(name)
        if not send and not removed:
            return []
        nonce = str(next(_NONCES))
        sent: dict[str, str | None] = {**{r.name: r.version for r in send}, **dict.fromkeys(removed)}
        watch.pending[nonce] = (snapshot.version, sent)
        watch.inflight.update(sent)
        assert self.node_id is not None
        self.registry.sent(self.node_id)
        return [delta_response(snapshot, send, removed, nonce)]
