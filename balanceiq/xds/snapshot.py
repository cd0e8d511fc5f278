"""Immutable, versioned snapshots of xDS resources, serialized once.

Each :class:`Resource` is encoded when the snapshot is built; responses concatenate those
pre-encoded protobuf fields (the wire format is a sequence of independent fields), so a
push costs each stream a nonce and a copy. ``Snapshot.version`` is ``"<epoch>.<seq>"``
(see :mod:`balanceiq.xds.store`); each resource's version is its content hash.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import address_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2

from balanceiq.xds.assignment import HEALTH_VALUES, Assignment

EDS_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

_HEALTH = {h: health_check_pb2.HealthStatus.Value(h) for h in HEALTH_VALUES}


# --- protobuf wire encoding: just enough to concatenate length-delimited fields -------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def field_str(number: int, value: str) -> bytes:
    return field_bytes(number, value.encode()) if value else b""


# Field numbers of envoy.service.discovery.v3 messages (checked against the descriptors
# in tests/unit/xds/test_snapshot.py, so a proto change cannot slip past silently).
SOTW_VERSION_INFO, SOTW_RESOURCES, SOTW_TYPE_URL, SOTW_NONCE = 1, 2, 4, 5
DELTA_SYSTEM_VERSION, DELTA_RESOURCES, DELTA_TYPE_URL, DELTA_NONCE, DELTA_REMOVED = 1, 2, 4, 5, 6
RESOURCE_VERSION, RESOURCE_ANY, RESOURCE_NAME = 1, 2, 3
ANY_TYPE_URL, ANY_VALUE = 1, 2


@dataclass(frozen=True, slots=True)
class Resource:
    """One xDS resource as an encoded ``Any`` and an encoded delta ``Resource``."""

    name: str
    version: str
    type_url: str
    any_bytes: bytes
    delta_bytes: bytes

    @classmethod
    def from_message(cls, name: str, message: object, type_url: str = EDS_TYPE) -> Resource:
        value = message.SerializeToString(deterministic=True)  # type: ignore[attr-defined]
        return cls.from_bytes(name, value, type_url)

    @classmethod
    def from_bytes(cls, name: str, value: bytes, type_url: str = EDS_TYPE) -> Resource:
        version = hashlib.sha256(type_url.encode() + b"\0" + value).hexdigest()[:16]
        any_bytes = field_str(ANY_TYPE_URL, type_url) + field_bytes(ANY_VALUE, value)
        delta_bytes = (
            field_str(RESOURCE_NAME, name) + field_str(RESOURCE_VERSION, version) + field_bytes(RESOURCE_ANY, any_bytes)
        )
        return cls(name, version, type_url, any_bytes, delta_bytes)

    def as_any(self) -> any_pb2.Any:
        msg = any_pb2.Any()
        msg.ParseFromString(self.any_bytes)
        return msg


@dataclass(frozen=True)
class Snapshot:
    """All resources of one type at one version. Never mutated after construction."""

    version: str
    resources: Mapping[str, Resource]
    type_url: str = EDS_TYPE
    assignments: Mapping[str, Assignment] = field(default_factory=dict)
    # SotW response bodies by subscribed-name set, shared by every stream with that set.
    _bodies: dict[frozenset[str] | None, bytes] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def resource_versions(self, names: Iterable[str] | None) -> dict[str, str | None]:
        """name -> version (None when absent) for the given names, or all when None."""
        if names is None:
            return {n: r.version for n, r in self.resources.items()}
        return {n: (r.version if (r := self.resources.get(n)) else None) for n in names}

    def sotw_body(self, names: frozenset[str] | None) -> bytes:
        """DiscoveryResponse bytes without the nonce, for this subscription set."""
        body = self._bodies.get(names)
        if body is not None:
            return body
        with self._lock:
            body = self._bodies.get(names)
            if body is None:
                selected = (
                    self.resources.values()
                    if names is None
                    else [self.resources[n] for n in sorted(names) if n in self.resources]
                )
                body = b"".join(
                    [field_str(SOTW_VERSION_INFO, self.version)]
                    + [field_bytes(SOTW_RESOURCES, r.any_bytes) for r in selected]
                    + [field_str(SOTW_TYPE_URL, self.type_url)]
                )
                if len(self._bodies) < 64:  # bounded: distinct subscription sets are few
                    self._bodies[names] = body
        return body


def sotw_response(snapshot: Snapshot, names: frozenset[str] | None, nonce: str) -> bytes:
    return snapshot.sotw_body(names) + field_str(SOTW_NONCE, nonce)


def delta_response(snapshot: Snapshot, send: Iterable[Resource], removed: Iterable[str], nonce: str) -> bytes:
    parts = [field_str(DELTA_SYSTEM_VERSION, snapshot.version)]
    parts += [field_bytes(DELTA_RESOURCES, r.delta_bytes) for r in send]
    parts.append(field_str(DELTA_TYPE_URL, snapshot.type_url))
    parts += [field_str(DELTA_REMOVED, name) for name in removed]
    parts.append(field_str(DELTA_NONCE, nonce))
    return b"".join(parts)


def cluster_load_assignment(assignment: Assignment) -> endpoint_pb2.ClusterLoadAssignment:
    """The Envoy resource for one assignment, in localities ``cloud/region``, ``zone``.

    All localities share priority 0: weights, not failover tiers, decide the split.
    """
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=assignment.cluster)
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for ep in assignment.endpoints:
        groups.setdefault(ep.locality, []).append(ep)
    for (cloud, region, zone), eps in sorted(groups.items()):
        loc = cla.endpoints.add()
        loc.locality.region = f"{cloud}/{region}"
        loc.locality.zone = zone
        for ep in eps:
            lb = loc.lb_endpoints.add()
            sock = lb.endpoint.address.socket_address
            sock.address = ep.host
            sock.port_value = ep.port
            sock.protocol = address_pb2.SocketAddress.TCP
            lb.load_balancing_weight.CopyFrom(wrappers_pb2.UInt32Value(value=ep.weight))
            lb.health_status = _HEALTH[ep.health]
            meta = struct_pb2.Struct()
            meta.update(
                {"cloud": ep.cloud, "region": ep.region, "cost_per_million_requests": ep.cost_per_million_requests}
            )
            lb.metadata.filter_metadata["balanceiq"].CopyFrom(meta)
    return cla


def build_snapshot(version: str, assignments: Iterable[Assignment]) -> Snapshot:
    amap = {a.cluster: a for a in assignments}
    resources = {name: Resource.from_message(name, cluster_load_assignment(a)) for name, a in amap.items()}
    return Snapshot(version=version, resources=resources, assignments=amap)


def raw_snapshot(version: str, resources: Mapping[str, bytes], type_url: str = EDS_TYPE) -> Snapshot:
    """A snapshot of already-encoded resources, unvalidated (for tests of Envoy's NACKs)."""
    return Snapshot(
        version=version,
        resources={n: Resource.from_bytes(n, b, type_url) for n, b in resources.items()},
        type_url=type_url,
    )


__all__ = [
    "EDS_TYPE",
    "Resource",
    "Snapshot",
    "build_snapshot",
    "cluster_load_assignment",
    "delta_response",
    "raw_snapshot",
    "sotw_response",
]
