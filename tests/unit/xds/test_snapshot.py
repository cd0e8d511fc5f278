"""The hand-written wire encoding in snapshot.py must equal what protobuf would produce."""

from __future__ import annotations

import threading

import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, wrappers_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from rawsnap import raw_snapshot  # beside this file: pytest puts its folder on sys.path

from balanceiq.xds import snapshot as snap_mod
from balanceiq.xds.assignment import Assignment, EndpointAssignment, split_address
from balanceiq.xds.snapshot import (
    EDS_TYPE,
    Resource,
    _varint,
    build_snapshot,
    cluster_load_assignment,
    delta_response,
    field_bytes,
    field_str,
    sotw_response,
)

CLA = endpoint_pb2.ClusterLoadAssignment


def ep(
    address: str,
    weight: int,
    cloud: str,
    region: str,
    zone: str | None = None,
    health: str = "HEALTHY",
    cost: float = 0.0,
) -> EndpointAssignment:
    host, port = split_address(address)
    return EndpointAssignment(address, host, port, weight, cloud, region, zone, health, cost)  # type: ignore[arg-type]


def svc(weights: tuple[int, int, int, int] = (10, 20, 30, 40), cluster: str = "svc", drain: bool = True) -> Assignment:
    return Assignment(
        cluster,
        (
            ep("10.0.0.1:80", weights[0], "aws", "us-east-1", "a", cost=0.4),
            ep("10.0.0.2:80", weights[1], "aws", "us-east-1", "a", cost=0.4),
            ep("10.0.1.1:81", weights[2], "gcp", "us-east-1", None, cost=0.35),
            ep("[::1]:82", weights[3], "azure", "eastus", "2", health="DRAINING" if drain else "HEALTHY", cost=0.55),
        ),
    )


def other(weight: int = 3) -> Assignment:
    return Assignment("other", (ep("10.9.0.1:90", weight, "aws", "eu-west-1"),))


def unpack(any_msg: any_pb2.Any) -> endpoint_pb2.ClusterLoadAssignment:
    assert any_msg.type_url == EDS_TYPE
    cla = CLA()
    assert any_msg.Unpack(cla)
    return cla


# --- field numbers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "field", "constant"),
    [
        (discovery_pb2.DiscoveryResponse, "version_info", "SOTW_VERSION_INFO"),
        (discovery_pb2.DiscoveryResponse, "resources", "SOTW_RESOURCES"),
        (discovery_pb2.DiscoveryResponse, "type_url", "SOTW_TYPE_URL"),
        (discovery_pb2.DiscoveryResponse, "nonce", "SOTW_NONCE"),
        (discovery_pb2.DeltaDiscoveryResponse, "system_version_info", "DELTA_SYSTEM_VERSION"),
        (discovery_pb2.DeltaDiscoveryResponse, "resources", "DELTA_RESOURCES"),
        (discovery_pb2.DeltaDiscoveryResponse, "type_url", "DELTA_TYPE_URL"),
        (discovery_pb2.DeltaDiscoveryResponse, "nonce", "DELTA_NONCE"),
        (discovery_pb2.DeltaDiscoveryResponse, "removed_resources", "DELTA_REMOVED"),
        (discovery_pb2.Resource, "version", "RESOURCE_VERSION"),
        (discovery_pb2.Resource, "resource", "RESOURCE_ANY"),
        (discovery_pb2.Resource, "name", "RESOURCE_NAME"),
        (any_pb2.Any, "type_url", "ANY_TYPE_URL"),
        (any_pb2.Any, "value", "ANY_VALUE"),
    ],
)
def test_field_numbers_match_descriptors(message: type, field: str, constant: str) -> None:
    fd = message.DESCRIPTOR.fields_by_name[field]
    assert getattr(snap_mod, constant) == fd.number
    # every field we hand-encode is length-delimited (string, bytes or message)
    assert fd.type in (fd.TYPE_STRING, fd.TYPE_BYTES, fd.TYPE_MESSAGE)


def test_eds_type_url_names_the_cla_message() -> None:
    assert "type.googleapis.com/" + CLA.DESCRIPTOR.full_name == EDS_TYPE


# --- SotW ------------------------------------------------------------------------------


def test_sotw_response_decodes_like_protobuf() -> None:
    snap = build_snapshot("7.3", [svc(), other()])
    resp = discovery_pb2.DiscoveryResponse.FromString(sotw_response(snap, None, "n42"))
    assert resp.version_info == "7.3"
    assert resp.type_url == EDS_TYPE
    assert resp.nonce == "n42"
    got = {c.cluster_name: c for c in map(unpack, resp.resources)}
    assert got == {"svc": cluster_load_assignment(svc()), "other": cluster_load_assignment(other())}


def test_sotw_response_selects_subscribed_names_and_skips_missing() -> None:
    snap = build_snapshot("1.1", [svc(), other()])
    resp = discovery_pb2.DiscoveryResponse.FromString(sotw_response(snap, frozenset({"other", "ghost"}), "x"))
    assert [unpack(r).cluster_name for r in resp.resources] == ["other"]
    assert unpack(resp.resources[0]) == cluster_load_assignment(other())


def test_sotw_response_equals_protobuf_serialization() -> None:
    snap = build_snapshot("1.2", [svc(), other()])
    names = frozenset({"svc", "other"})
    expected = discovery_pb2.DiscoveryResponse(version_info="1.2", type_url=EDS_TYPE, nonce="9")
    for name in sorted(names):
        any_msg = expected.resources.add()
        any_msg.Pack(cluster_load_assignment(snap.assignments[name]), deterministic=True)
    assert discovery_pb2.DiscoveryResponse.FromString(sotw_response(snap, names, "9")) == expected


def test_sotw_empty_nonce_omitted() -> None:
    snap = build_snapshot("1.1", [svc()])
    assert sotw_response(snap, None, "") == snap.sotw_body(None)
    assert discovery_pb2.DiscoveryResponse.FromString(sotw_response(snap, None, "")).nonce == ""


def test_sotw_body_cached_once_per_name_set() -> None:
    snap = build_snapshot("1.1", [svc(), other()])
    a = snap.sotw_body(frozenset({"svc"}))
    b = snap.sotw_body(frozenset({"svc"}))
    assert a is b
    assert snap.sotw_body(None) is snap.sotw_body(None)
    assert snap.sotw_body(frozenset({"svc", "other"})) is not a
    # the nonce is appended, never baked into the cached body
    r1 = sotw_response(snap, frozenset({"svc"}), "1")
    r2 = sotw_response(snap, frozenset({"svc"}), "2")
    assert r1[: len(a)] == a == r2[: len(a)] and r1 != r2


def test_sotw_body_cache_is_thread_safe() -> None:
    snap = build_snapshot("1.1", [svc(), other()])
    out: list[bytes] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        out.append(snap.sotw_body(frozenset({"svc", "other"})))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(out) == 8
    assert all(b is out[0] for b in out)


def test_sotw_body_serializes_resources_once(monkeypatch: pytest.MonkeyPatch) -> None:
    snap = build_snapshot("1.1", [svc()])
    calls = []
    real = snap_mod.field_bytes

    def counting(number: int, payload: bytes) -> bytes:
        calls.append(number)
        return real(number, payload)

    monkeypatch.setattr(snap_mod, "field_bytes", counting)
    names = frozenset({"svc"})
    for i in range(5):
        sotw_response(snap, names, str(i))
    assert calls.count(snap_mod.SOTW_RESOURCES) == 1


# --- delta -------------------------------------------------------------------------------


def test_delta_response_decodes_like_protobuf() -> None:
    snap = build_snapshot("3.4", [svc(), other()])
    send = [snap.resources["svc"], snap.resources["other"]]
    raw = delta_response(snap, send, ["gone-a", "gone-b"], "n7")
    resp = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
    assert resp.system_version_info == "3.4"
    assert resp.type_url == EDS_TYPE
    assert resp.nonce == "n7"
    assert list(resp.removed_resources) == ["gone-a", "gone-b"]
    assert [r.name for r in resp.resources] == ["svc", "other"]
    for r in resp.resources:
        assert r.version == snap.resources[r.name].version
        assert unpack(r.resource) == cluster_load_assignment(snap.assignments[r.name])

    expected = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info="3.4",
        type_url=EDS_TYPE,
        nonce="n7",
        removed_resources=["gone-a", "gone-b"],
    )
    for res in send:
        r = expected.resources.add(name=res.name, version=res.version)
        r.resource.Pack(cluster_load_assignment(snap.assignments[res.name]), deterministic=True)
    assert resp == expected


def test_delta_response_only_removals() -> None:
    snap = build_snapshot("3.5", [svc()])
    resp = discovery_pb2.DeltaDiscoveryResponse.FromString(delta_response(snap, [], ["x"], "1"))
    assert len(resp.resources) == 0
    assert list(resp.removed_resources) == ["x"]


def test_resource_delta_bytes_is_a_resource_message() -> None:
    snap = build_snapshot("1.1", [svc()])
    res = snap.resources["svc"]
    msg = discovery_pb2.Resource.FromString(res.delta_bytes)
    assert msg.name == "svc" and msg.version == res.version
    assert unpack(msg.resource) == cluster_load_assignment(svc())


# --- the CLA itself ------------------------------------------------------------------------


def test_cla_groups_localities_by_cloud_region_zone() -> None:
    cla = cluster_load_assignment(svc())
    assert cla.cluster_name == "svc"
    locs = [(le.locality.region, le.locality.zone, le.priority) for le in cla.endpoints]
    # same region name in two clouds stays two localities; sorted, one per (cloud, region, zone)
    assert locs == [("aws/us-east-1", "a", 0), ("azure/eastus", "2", 0), ("gcp/us-east-1", "", 0)]
    by_loc = {
        le.locality.region: [
            (
                lb.endpoint.address.socket_address.address,
                lb.endpoint.address.socket_address.port_value,
                lb.load_balancing_weight.value,
                lb.health_status,
            )
            for lb in le.lb_endpoints
        ]
        for le in cla.endpoints
    }
    assert by_loc == {
        "aws/us-east-1": [
            ("10.0.0.1", 80, 10, health_check_pb2.HEALTHY),
            ("10.0.0.2", 80, 20, health_check_pb2.HEALTHY),
        ],
        "azure/eastus": [("::1", 82, 40, health_check_pb2.DRAINING)],
        "gcp/us-east-1": [("10.0.1.1", 81, 30, health_check_pb2.HEALTHY)],
    }
    lb = cla.endpoints[0].lb_endpoints[0]
    assert lb.HasField("load_balancing_weight")
    meta = lb.metadata.filter_metadata["balanceiq"]
    assert meta["cloud"] == "aws" and meta["region"] == "us-east-1"
    assert meta["cost_per_million_requests"] == pytest.approx(0.4)


@pytest.mark.parametrize("health", ["HEALTHY", "DRAINING", "UNHEALTHY", "DEGRADED"])
def test_cla_health_values(health: str) -> None:
    a = Assignment("c", (ep("h:1", 1, "x", "y", health=health),))
    lb = cluster_load_assignment(a).endpoints[0].lb_endpoints[0]
    assert lb.health_status == health_check_pb2.HealthStatus.Value(health)


def test_cla_uint32_max_weight_encodes() -> None:
    a = Assignment("c", (ep("h:1", 2**32 - 1, "x", "y"),))
    raw = build_snapshot("1.1", [a]).resources["c"].any_bytes
    cla = unpack(any_pb2.Any.FromString(raw))
    assert cla.endpoints[0].lb_endpoints[0].load_balancing_weight == wrappers_pb2.UInt32Value(value=2**32 - 1)


# --- versions ------------------------------------------------------------------------------


def test_resource_version_is_content_hash() -> None:
    s1 = build_snapshot("1.1", [svc(), other()])
    s2 = build_snapshot("2.9", [svc(), other(weight=4)])
    assert s1.version != s2.version
    assert s1.resources["svc"].version == s2.resources["svc"].version
    assert s1.resources["other"].version != s2.resources["other"].version
    s3 = build_snapshot("3.1", [svc(drain=False), other()])
    assert s3.resources["svc"].version != s1.resources["svc"].version  # health is content
    s4 = build_snapshot("3.2", [svc(weights=(10, 20, 30, 41)), other()])
    assert s4.resources["svc"].version != s1.resources["svc"].version


def test_resource_version_depends_on_type_url() -> None:
    a = Resource.from_bytes("x", b"abc", EDS_TYPE)
    b = Resource.from_bytes("x", b"abc", "type.googleapis.com/other")
    assert a.version != b.version


def test_resource_versions_lookup() -> None:
    snap = build_snapshot("1.1", [svc(), other()])
    assert snap.resource_versions(None) == {n: r.version for n, r in snap.resources.items()}
    assert snap.resource_versions(["svc", "ghost"]) == {"svc": snap.resources["svc"].version, "ghost": None}


def test_raw_snapshot_carries_bytes_verbatim() -> None:
    snap = raw_snapshot("5.1", {"bad": b"\xff\xfe not a CLA"})
    resp = discovery_pb2.DiscoveryResponse.FromString(sotw_response(snap, None, "1"))
    assert resp.resources[0].value == b"\xff\xfe not a CLA"
    assert resp.resources[0].type_url == EDS_TYPE
    assert snap.assignments == {}


# --- wire primitives against protobuf ------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_matches_protobuf(n: int) -> None:
    # field 1 of UInt64Value is a varint: tag 0x08 then the value
    msg = wrappers_pb2.UInt64Value.FromString(b"\x08" + _varint(n))
    assert msg.value == n
    assert wrappers_pb2.UInt64Value(value=n).SerializeToString() == (b"\x08" + _varint(n) if n else b"")


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 2_097_152])
def test_field_bytes_boundary_lengths(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    raw = field_bytes(2, payload)
    if size:
        assert raw == any_pb2.Any(value=payload).SerializeToString()  # Any.value is field 2
    else:
        assert raw == b"\x12\x00"  # protobuf omits it; an explicit empty field is still valid
    assert any_pb2.Any.FromString(raw).value == payload


@settings(max_examples=40, deadline=None)
@given(
    st.binary(min_size=0, max_size=40_000),
    st.text(min_size=0, max_size=300),
    st.integers(min_value=1, max_value=2**29 - 1),
)
def test_field_bytes_and_str_match_protobuf(payload: bytes, text: str, number: int) -> None:
    msg = any_pb2.Any.FromString(field_str(1, text) + field_bytes(2, payload))
    assert msg.type_url == text and msg.value == payload
    assert msg.SerializeToString() == field_str(1, text) + (field_bytes(2, payload) if payload else b"")
    # any field number: the tag is a varint of (number << 3 | 2) and parses back
    tag_len = len(_varint((number << 3) | 2))
    raw = field_bytes(number, payload)
    assert raw[tag_len:] == _varint(len(payload)) + payload


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(min_size=100, max_size=20_000), min_size=1, max_size=4))
def test_long_resources_round_trip_in_sotw(payloads: list[bytes]) -> None:
    snap = raw_snapshot("9.9", {f"r{i}": p for i, p in enumerate(payloads)})
    resp = discovery_pb2.DiscoveryResponse.FromString(sotw_response(snap, None, "nonce-" * 30))
    assert [r.value for r in resp.resources] == payloads
    assert resp.nonce == "nonce-" * 30
    delta = discovery_pb2.DeltaDiscoveryResponse.FromString(
        delta_response(snap, list(snap.resources.values()), [], "z")
    )
    assert [r.resource.value for r in delta.resources] == payloads
