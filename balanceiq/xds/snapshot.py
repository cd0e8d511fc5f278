"""Immutable, versioned snapshots of xDS resources, serialized once: responses concatenate the
:class:`Resource` fields encoded when the snapshot is built (protobuf's wire format is a sequence of
independent fields), so a push costs each stream a nonce and a copy. A resource's version is its hash."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from balanceiq.xds.assignment import HEALTH_VALUES, Assignment

EDS_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

_HEALTH = {h: health_check_pb2.HealthStatus.Value(h) for h in HEALTH_VALUES}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def field_str(number: int, value: str) -> bytes:
    return field_bytes(number, value.encode()) if value else b""


# Field numbers of envoy.service.discovery.v3 messages (tests/unit/xds/test_snapshot.py checks them).
SOTW_VERSION_INFO, SOTW_RESOURCES, SOTW_TYPE_URL, SOTW_NONCE = 1, 2, 4, 5
DELTA_SYSTEM_VERSION, DELTA_RESOURCES, DELTA_TYPE_URL, DELTA_NONCE, DELTA_REMOVED = 1, 2, 4, 5, 6
RESOURCE_VERSION, RESOURCE_ANY, RESOURCE_NAME = 1, 2, 3
ANY_TYPE_URL, ANY_VALUE = 1, 2


@dataclass(frozen=True, slots=True)
class Resource:
    """One xDS resource as an encoded ``Any`` and an encoded delta ``Resource``."""

    name: str
    version: str
    any_bytes: bytes
    delta_bytes: bytes

    @classmethod
    def from_bytes(cls, name: str, value: bytes, type_url: str = EDS_TYPE) -> Resource:
        version = hashlib.sha256(type_url.encode() + b"\0" + value).hexdigest()[:16]
        any_bytes = field_str(ANY_TYPE_URL, type_url) + field_bytes(ANY_VALUE, value)
        delta_bytes = (
            field_str(RESOURCE_NAME, name) + field_str(RESOURCE_VERSION, version) + field_bytes(RESOURCE_ANY, any_bytes)
        )
        return cls(name, version, any_bytes, delta_bytes)


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
        with self._lock:
            body = self._bodies.get(names)
            if body is None:
                chosen = self.resources if names is None else sorted(names & self.resources.keys())
                body = field_str(SOTW_VERSION_INFO, self.version)
                body += b"".join(field_bytes(SOTW_RESOURCES, self.resources[n].any_bytes) for n in chosen)
                body += field_str(SOTW_TYPE_URL, self.type_url)
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
    """The Envoy resource for one assignment, in localities ``cloud/region``, ``zone``, all at
    priority 0: weights, not failover tiers, decide the split."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=assignment.cluster)
    by_locality = sorted(assignment.endpoints, key=lambda ep: ep.locality)
    for (cloud, region, zone), eps in itertools.groupby(by_locality, key=lambda ep: ep.locality):
        loc = cla.endpoints.add()
        loc.locality.region = f"{cloud}/{region}"
        loc.locality.zone = zone
        for ep in eps:
            lb = loc.lb_endpoints.add()
            sock = lb.endpoint.address.socket_address  # protocol: TCP, the default
            sock.address = ep.host
            sock.port_value = ep.port
            lb.load_balancing_weight.value = ep.weight
            lb.health_status = _HEALTH[ep.health]
            lb.metadata.filter_metadata["balanceiq"].update(
                {"cloud": ep.cloud, "region": ep.region, "cost_per_million_requests": ep.cost_per_million_requests}
            )
    return cla


def build_snapshot(version: str, assignments: Iterable[Assignment]) -> Snapshot:
    amap = {a.cluster: a for a in assignments}
    resources = {
        name: Resource.from_bytes(name, cluster_load_assignment(a).SerializeToString(deterministic=True))
        for name, a in amap.items()
    }
    return Snapshot(version=version, resources=resources, assignments=amap)
