"""The xDS stream state machines, driven with real request protobufs and decoded responses."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from rawsnap import raw_snapshot  # beside this file: pytest puts its folder on sys.path

from balanceiq.xds.assignment import Assignment, EndpointAssignment
from balanceiq.xds.protocol import DeltaStream, SotwStream, StatusRegistry
from balanceiq.xds.snapshot import EDS_TYPE, Snapshot, build_snapshot

CDS_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
NODE = "envoy-1"

SReq = discovery_pb2.DiscoveryRequest
SResp = discovery_pb2.DiscoveryResponse
DReq = discovery_pb2.DeltaDiscoveryRequest
DResp = discovery_pb2.DeltaDiscoveryResponse


# --- helpers -------------------------------------------------------------------------------


def assign(cluster: str, w: int = 1) -> Assignment:
    return Assignment(
        cluster,
        (
            EndpointAssignment("10.0.0.1:80", "10.0.0.1", 80, w, "aws", "us-east-1"),
            EndpointAssignment("10.0.0.2:80", "10.0.0.2", 80, 1, "gcp", "us-central1"),
        ),
    )


_seq = iter(range(1, 10_000))


def snap(**weights: int) -> Snapshot:
    """A snapshot with one cluster per keyword, the keyword's value as a weight."""
    return build_snapshot(f"1.{next(_seq)}", [assign(c, w) for c, w in weights.items()])


def sreq(
    names: Iterable[str] = (),
    nonce: str = "",
    version: str = "",
    error: str | None = None,
    type_url: str = EDS_TYPE,
    node: str = NODE,
) -> SReq:
    req = SReq(version_info=version, resource_names=list(names), type_url=type_url, response_nonce=nonce)
    req.node.id = node
    req.node.cluster = "edge"
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def dreq(
    subscribe: Iterable[str] = (),
    unsubscribe: Iterable[str] = (),
    nonce: str = "",
    initial: dict[str, str] | None = None,
    error: str | None = None,
    type_url: str = EDS_TYPE,
    node: str = NODE,
) -> DReq:
    req = DReq(
        type_url=type_url,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        initial_resource_versions=initial or {},
        response_nonce=nonce,
    )
    req.node.id = node
    req.node.cluster = "edge"
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def one_sotw(out: list[bytes]) -> SResp:
    assert len(out) == 1, f"expected one response, got {len(out)}"
    return SResp.FromString(out[0])


def one_delta(out: list[bytes]) -> DResp:
    assert len(out) == 1, f"expected one response, got {len(out)}"
    return DResp.FromString(out[0])


def clas(resp: SResp) -> dict[str, endpoint_pb2.ClusterLoadAssignment]:
    out = {}
    for any_msg in resp.resources:
        cla = endpoint_pb2.ClusterLoadAssignment()
        assert any_msg.Unpack(cla)
        out[cla.cluster_name] = cla
    return out


def weight_of(cla: endpoint_pb2.ClusterLoadAssignment) -> int:
    """Weight of 10.0.0.1 (the endpoint ``assign`` varies)."""
    for loc in cla.endpoints:
        for lb in loc.lb_endpoints:
            if lb.endpoint.address.socket_address.address == "10.0.0.1":
                return lb.load_balancing_weight.value
    raise AssertionError("10.0.0.1 not in CLA")


def delta_clas(resp: DResp) -> dict[str, tuple[str, int]]:
    out = {}
    for r in resp.resources:
        cla = endpoint_pb2.ClusterLoadAssignment()
        assert r.resource.Unpack(cla)
        assert cla.cluster_name == r.name
        out[r.name] = (r.version, weight_of(cla))
    return out


def node(reg: StatusRegistry, node_id: str = NODE) -> dict:
    return next(n for n in reg.to_json()["nodes"] if n["node_id"] == node_id)


@pytest.fixture
def reg() -> StatusRegistry:
    return StatusRegistry()


@pytest.fixture
def sotw(reg: StatusRegistry) -> SotwStream:
    return SotwStream(reg, "ads-sotw")


@pytest.fixture
def delta(reg: StatusRegistry) -> DeltaStream:
    return DeltaStream(reg, "ads-delta")


# --- SotW ----------------------------------------------------------------------------------


def test_sotw_first_request_answered_even_if_version_matches(sotw: SotwStream, reg: StatusRegistry) -> None:
    s1 = snap(a=3)
    resp = one_sotw(sotw.on_request(sreq(["a"], version=s1.version), s1))
    assert resp.version_info == s1.version
    assert resp.type_url == EDS_TYPE
    assert resp.nonce
    assert weight_of(clas(resp)["a"]) == 3
    assert node(reg)["responses_sent"] == 1


def test_sotw_first_request_before_any_snapshot_waits(sotw: SotwStream) -> None:
    assert sotw.on_request(sreq(["a"]), None) == []
    s1 = snap(a=2)
    resp = one_sotw(sotw.on_snapshot(s1))
    assert resp.version_info == s1.version and set(clas(resp)) == {"a"}


def test_sotw_wildcard_gets_everything(sotw: SotwStream) -> None:
    s1 = snap(a=1, b=2, c=3)
    resp = one_sotw(sotw.on_request(sreq(), s1))
    assert set(clas(resp)) == {"a", "b", "c"}
    s2 = snap(a=1, b=2, c=3, d=4)
    assert sotw.on_snapshot(s2) == []  # unACKed
    resp2 = one_sotw(sotw.on_request(sreq(nonce=resp.nonce, version=resp.version_info), s2))
    assert set(clas(resp2)) == {"a", "b", "c", "d"}


def test_sotw_hold_push_until_ack(sotw: SotwStream, reg: StatusRegistry) -> None:
    s1 = snap(a=1)
    r1 = one_sotw(sotw.on_request(sreq(["a"]), s1))
    s2 = snap(a=2)
    s3 = snap(a=3)
    assert sotw.on_snapshot(s2) == []
    assert sotw.on_snapshot(s3) == []
    # the ACK of r1 releases the latest content, once
    r2 = one_sotw(sotw.on_request(sreq(["a"], nonce=r1.nonce, version=r1.version_info), s3))
    assert r2.version_info == s3.version
    assert weight_of(clas(r2)["a"]) == 3
    assert r2.nonce != r1.nonce
    assert node(reg)["last_acked_version"] == s1.version
    assert node(reg)["responses_sent"] == 2


def test_sotw_ack_with_nothing_new_sends_nothing(sotw: SotwStream, reg: StatusRegistry) -> None:
    s1 = snap(a=1)
    r1 = one_sotw(sotw.on_request(sreq(["a"]), s1))
    assert sotw.on_request(sreq(["a"], nonce=r1.nonce, version=r1.version_info), s1) == []
    assert node(reg)["acks"] == 1
    # ...but the client is now waiting, so the next change goes straight out
    s2 = snap(a=5)
    r2 = one_sotw(sotw.on_snapshot(s2))
    assert weight_of(clas(r2)["a"]) == 5


def test_sotw_stale_nonce_ignored(sotw: SotwStream, reg: StatusRegistry) -> None:
    s1 = snap(a=1)
    r1 = one_sotw(sotw.on_request(sreq(["a"]), s1))
    one_sotw(sotw.on_request(sreq(["a"]), s1))  # a second initial request: new nonce
    # a late NACK of r1 is stale: not recorded, nothing sent
    assert sotw.on_request(sreq(["a"], nonce=r1.nonce, error="old"), snap(a=9)) == []
    assert node(reg)["nacks"] == 0 and node(reg)["acks"] == 0
    # an unknown nonce is also stale
    assert sotw.on_request(sreq(["a"], nonce="no-such-nonce"), snap(a=9)) == []


def test_sotw_ack_and_nack_recorded(sotw: SotwStream, reg: StatusRegistry) -> None:
    s1 = snap(a=1)
    r1 = one_sotw(sotw.on_request(sreq(["a"]), s1))
    assert sotw.on_request(sreq(["a"], nonce=r1.nonce, version=s1.version), s1) == []
    n = node(reg)
    assert n["last_acked_version"] == s1.version and n["acks"] == 1 and n["nacks"] == 0
    s2 = snap(a=2)
    r2 = one_sotw(sotw.on_snapshot(s2))
    # Envoy NACKs with the previous accepted version and an error_detail
    assert sotw.on_request(sreq(["a"], nonce=r2.nonce, version=s1.version, error="bad CLA"), s2) == []
    n = node(reg)
    assert n["last_nacked_version"] == s2.version
    assert n["last_acked_version"] == s1.version
    assert n["last_error"] == "bad CLA"
    assert n["nacks"] == 1
    rej = reg.to_json()["rejections"]
    assert len(rej) == 1
    assert rej[0]["node_id"] == NODE and rej[0]["version"] == s2.version
    assert rej[0]["type_url"] == EDS_TYPE and rej[0]["error"] == "bad CLA"


def test_sotw_nack_is_not_resent_but_new_content_is(sotw: SotwStream, reg: StatusRegistry) -> None:
    bad = raw_snapshot("2.1", {"a": b"\x08\x01garbage"})
    r1 = one_sotw(sotw.on_request(sreq(["a"]), bad))
    assert sotw.on_request(sreq(["a"], nonce=r1.nonce, error="cannot parse"), bad) == []
    # further requests (same nonce) and further snapshots with the same content: silence
    same_again = raw_snapshot("2.2", {"a": b"\x08\x01garbage", "other": b"x"})
    assert sotw.on_snapshot(same_again) == []
    assert sotw.on_snapshot(bad) == []
    assert sotw.on_request(sreq(["a"], nonce=r1.nonce, error="cannot parse"), same_again) == []
    assert node(reg)["responses_sent"] == 1
    # new content for "a" goes out
    good = snap(a=4)
    r2 = one_sotw(sotw.on_snapshot(good))
    assert r2.version_info == good.version and weight_of(clas(r2)["a"]) == 4
    sotw.on_request(sreq(["a"], nonce=r2.nonce, version=good.version), good)
    assert node(reg)["last_acked_version"] == good.version


def test_sotw_subscription_growth_sends_unchanged(sotw: SotwStream) -> None:
    s1 = snap(a=1, b=2)
    r1 = one_sotw(sotw.on_request(sreq(["a"]), s1))
    assert set(clas(r1)) == {"a"}
    sotw.on_request(sreq(["a"], nonce=r1.nonce, version=s1.version), s1)
    r2 = one_sotw(sotw.on_request(sreq(["a", "b"], nonce=r1.nonce, version=s1.version), s1))
    assert set(clas(r2)) == {"a", "b"}
    assert r2.version_info == s1.version  # same snapshot, still sent


def test_sotw_growth_after_nack_still_sends(sotw: SotwStream) -> None:
    s1 = snap(a=1, b=2)
    r1 = one_sotw(sotw.on_request(sreq(["a"]), s1))
    assert sotw.on_request(sreq(["a"], nonce=r1.nonce, error="no"), s1) == []
    r2 = one_sotw(sotw.on_request(sreq(["a", "b"], nonce=r1.nonce), s1))
    assert set(clas(r2)) == {"a", "b"}


def test_sotw_subscription_to_missing_cluster_served_when_it_appears(sotw: SotwStream) -> None:
    s1 = snap(a=1)
    assert sotw.on_request(sreq(["ghost"]), s1) == []
    assert sotw.on_snapshot(snap(a=2)) == []  # still absent
    s3 = snap(a=2, ghost=7)
    r = one_sotw(sotw.on_snapshot(s3))
    assert set(clas(r)) == {"ghost"}
    assert weight_of(clas(r)["ghost"]) == 7


def test_sotw_growth_to_missing_cluster_served_when_it_appears(sotw: SotwStream) -> None:
    s1 = snap(a=1)
    r1 = one_sotw(sotw.on_request(sreq(["a"]), s1))
    sotw.on_request(sreq(["a"], nonce=r1.nonce, version=s1.version), s1)
    r2 = one_sotw(sotw.on_request(sreq(["a", "ghost"], nonce=r1.nonce, version=s1.version), s1))
    assert set(clas(r2)) == {"a"}
    sotw.on_request(sreq(["a", "ghost"], nonce=r2.nonce, version=s1.version), s1)
    r3 = one_sotw(sotw.on_snapshot(snap(a=1, ghost=5)))
    assert set(clas(r3)) == {"a", "ghost"}


def test_sotw_unrelated_change_sends_nothing(sotw: SotwStream) -> None:
    s1 = snap(a=1, b=1)
    r1 = one_sotw(sotw.on_request(sreq(["a"]), s1))
    sotw.on_request(sreq(["a"], nonce=r1.nonce, version=s1.version), s1)
    assert sotw.on_snapshot(snap(a=1, b=2)) == []
    assert sotw.on_snapshot(snap(a=1, b=3, c=1)) == []
    r2 = one_sotw(sotw.on_snapshot(snap(a=2, b=3)))
    assert weight_of(clas(r2)["a"]) == 2


def test_sotw_subscribed_cluster_removed_is_pushed(sotw: SotwStream) -> None:
    s1 = snap(a=1, b=1)
    r1 = one_sotw(sotw.on_request(sreq(["a", "b"]), s1))
    sotw.on_request(sreq(["a", "b"], nonce=r1.nonce, version=s1.version), s1)
    r2 = one_sotw(sotw.on_snapshot(snap(a=1)))
    assert set(clas(r2)) == {"a"}


def test_sotw_unsupported_type_gets_no_response(sotw: SotwStream) -> None:
    s1 = snap(a=1)
    assert sotw.on_request(sreq([], type_url=CDS_TYPE), s1) == []
    assert CDS_TYPE in sotw.unsupported_types
    # EDS on the same ADS stream still works
    r = one_sotw(sotw.on_request(sreq(["a"]), s1))
    assert r.type_url == EDS_TYPE


def test_sotw_empty_type_url_defaults_to_eds(reg: StatusRegistry) -> None:
    stream = SotwStream(reg, "eds-sotw")
    s1 = snap(a=1)
    r = one_sotw(stream.on_request(sreq(["a"], type_url=""), s1))
    assert r.type_url == EDS_TYPE


def test_sotw_nonces_unique_across_streams(reg: StatusRegistry) -> None:
    s1 = snap(a=1)
    nonces = {one_sotw(SotwStream(reg, "ads-sotw").on_request(sreq(["a"]), s1)).nonce for _ in range(20)}
    assert len(nonces) == 20


def test_node_status_open_close(reg: StatusRegistry) -> None:
    s1 = snap(a=1)
    st1 = SotwStream(reg, "ads-sotw")
    st2 = DeltaStream(reg, "eds-delta")
    st1.close()  # never identified: nothing recorded
    assert reg.to_json()["nodes"] == []
    st1.on_request(sreq(["a"]), s1)
    st2.on_request(dreq(["a"]), s1)
    n = node(reg)
    assert n["streams"] == 2 and n["connected"] is True
    assert n["api"] == ["ads-sotw", "eds-delta"]
    assert n["cluster"] == "edge"
    assert reg.to_json()["connected"] == 1
    st1.close()
    assert node(reg)["streams"] == 1
    st2.close()
    n = node(reg)
    assert n["streams"] == 0 and n["connected"] is False
    assert reg.to_json()["connected"] == 0


def test_anonymous_node(reg: StatusRegistry) -> None:
    SotwStream(reg, "ads-sotw").on_request(sreq(["a"], node=""), snap(a=1))
    assert node(reg, "<anonymous>")["streams"] == 1


def test_registry_wait_for(reg: StatusRegistry) -> None:
    reg.ack("x", "1.1")
    reg.ack("x", "1.2")
    assert reg.wait_for(lambda nodes: nodes["x"].last_acked_version == "1.2", timeout=1)
    assert not reg.wait_for(lambda nodes: nodes["x"].last_acked_version == "9", timeout=0.05)


def test_registry_rejections_bounded() -> None:
    reg = StatusRegistry(max_rejections=3)
    for i in range(10):
        reg.nack("n", EDS_TYPE, f"1.{i}", "e")
    assert [r["version"] for r in reg.to_json()["rejections"]] == ["1.7", "1.8", "1.9"]


# --- delta ---------------------------------------------------------------------------------


def test_delta_initial_versions_matching_sends_nothing(delta: DeltaStream) -> None:
    s1 = snap(a=1, b=2)
    have = {n: r.version for n, r in s1.resources.items()}
    assert delta.on_request(dreq(["a", "b"], initial=have), s1) == []


def test_delta_initial_versions_differing_sends_only_those(delta: DeltaStream, reg: StatusRegistry) -> None:
    s1 = snap(a=1, b=2)
    have = {"a": s1.resources["a"].version, "b": "stale-hash"}
    resp = one_delta(delta.on_request(dreq(["a", "b"], initial=have), s1))
    assert delta_clas(resp) == {"b": (s1.resources["b"].version, 2)}
    assert resp.system_version_info == s1.version
    assert resp.type_url == EDS_TYPE
    assert list(resp.removed_resources) == []
    assert node(reg)["responses_sent"] == 1


def test_delta_first_subscribe_sends(delta: DeltaStream) -> None:
    s1 = snap(a=1, b=2)
    resp = one_delta(delta.on_request(dreq(["a"]), s1))
    assert set(delta_clas(resp)) == {"a"}


def test_delta_resource_removed_from_snapshot(delta: DeltaStream) -> None:
    s1 = snap(a=1, b=2)
    r1 = one_delta(delta.on_request(dreq(["a", "b"]), s1))
    assert set(delta_clas(r1)) == {"a", "b"}
    assert delta.on_request(dreq(nonce=r1.nonce), s1) == []  # ACK
    r2 = one_delta(delta.on_snapshot(snap(a=1)))
    assert list(r2.removed_resources) == ["b"]
    assert len(r2.resources) == 0
    delta.on_request(dreq(nonce=r2.nonce), snap(a=1))
    # once the removal is ACKed, nothing more is said about it
    assert delta.on_snapshot(snap(a=1)) == []
    # and it is sent again when it comes back
    r3 = one_delta(delta.on_snapshot(snap(a=1, b=2)))
    assert set(delta_clas(r3)) == {"b"}


def test_delta_client_held_resource_we_lack_is_removed(delta: DeltaStream) -> None:
    s1 = snap(a=1)
    resp = one_delta(delta.on_request(dreq(["a", "gone"], initial={"gone": "v0", "a": s1.resources["a"].version}), s1))
    assert list(resp.removed_resources) == ["gone"]
    assert len(resp.resources) == 0


def test_delta_wildcard_client_held_resource_we_lack_is_removed(delta: DeltaStream) -> None:
    s1 = snap(a=1)
    resp = one_delta(delta.on_request(dreq(initial={"gone": "v0"}), s1))
    assert list(resp.removed_resources) == ["gone"]
    assert set(delta_clas(resp)) == {"a"}


def test_delta_nack_not_resent_new_content_sent(delta: DeltaStream, reg: StatusRegistry) -> None:
    bad = raw_snapshot("3.1", {"a": b"\x08\x01garbage"})
    r1 = one_delta(delta.on_request(dreq(["a"]), bad))
    assert delta.on_request(dreq(nonce=r1.nonce, error="cannot parse"), bad) == []
    n = node(reg)
    assert n["nacks"] == 1 and n["last_nacked_version"] == "3.1" and n["last_error"] == "cannot parse"
    assert n["last_acked_version"] is None
    # same content under a new system version: not re-sent
    assert delta.on_snapshot(raw_snapshot("3.2", {"a": b"\x08\x01garbage"})) == []
    assert delta.on_request(dreq(), bad) == []
    assert node(reg)["responses_sent"] == 1
    good = snap(a=4)
    r2 = one_delta(delta.on_snapshot(good))
    assert delta_clas(r2) == {"a": (good.resources["a"].version, 4)}
    delta.on_request(dreq(nonce=r2.nonce), good)
    assert node(reg)["last_acked_version"] == good.version


def test_delta_nack_then_reverting_to_accepted_content_sends_nothing(delta: DeltaStream) -> None:
    s1 = snap(a=1)
    r1 = one_delta(delta.on_request(dreq(["a"]), s1))
    delta.on_request(dreq(nonce=r1.nonce), s1)
    s2 = snap(a=2)
    r2 = one_delta(delta.on_snapshot(s2))
    delta.on_request(dreq(nonce=r2.nonce, error="no"), s2)
    # the client still holds s1's "a"; a snapshot equal to it needs no response
    assert delta.on_snapshot(snap(a=1)) == []


def test_delta_unsubscribe_then_resubscribe_sends_again(delta: DeltaStream) -> None:
    s1 = snap(a=1, b=2)
    r1 = one_delta(delta.on_request(dreq(["a", "b"]), s1))
    delta.on_request(dreq(nonce=r1.nonce), s1)
    assert delta.on_request(dreq(unsubscribe=["b"]), s1) == []
    assert delta.on_snapshot(snap(a=1, b=3)) == []  # b no longer of interest
    r2 = one_delta(delta.on_request(dreq(["b"]), s1))
    assert delta_clas(r2) == {"b": (s1.resources["b"].version, 2)}


def test_delta_resubscribe_after_nack_sends_again(delta: DeltaStream) -> None:
    s1 = snap(a=1)
    r1 = one_delta(delta.on_request(dreq(["a"]), s1))
    delta.on_request(dreq(nonce=r1.nonce, error="no"), s1)
    delta.on_request(dreq(unsubscribe=["a"]), s1)
    r2 = one_delta(delta.on_request(dreq(["a"]), s1))
    assert set(delta_clas(r2)) == {"a"}


def test_delta_ack_updates_client_state(delta: DeltaStream, reg: StatusRegistry) -> None:
    s1 = snap(a=1)
    r1 = one_delta(delta.on_request(dreq(["a"]), s1))
    assert delta.on_request(dreq(nonce=r1.nonce), s1) == []
    assert node(reg)["last_acked_version"] == s1.version
    # a later snapshot with a new system version but identical content: nothing
    assert delta.on_snapshot(snap(a=1)) == []
    assert delta.on_snapshot(snap(a=1, unrelated=3)) == []


def test_delta_inflight_content_not_duplicated(delta: DeltaStream) -> None:
    s1 = snap(a=1)
    r1 = one_delta(delta.on_request(dreq(["a"]), s1))
    # before the ACK, the same content again must not be sent twice
    assert delta.on_snapshot(snap(a=1)) == []
    s2 = snap(a=2)
    r2 = one_delta(delta.on_snapshot(s2))  # delta does not wait for ACKs
    assert delta_clas(r2) == {"a": (s2.resources["a"].version, 2)}
    delta.on_request(dreq(nonce=r1.nonce), s2)
    delta.on_request(dreq(nonce=r2.nonce), s2)
    assert delta.on_snapshot(snap(a=2)) == []
    r3 = one_delta(delta.on_snapshot(snap(a=1)))
    assert delta_clas(r3)["a"][1] == 1


def test_delta_wildcard_subscription(delta: DeltaStream) -> None:
    s1 = snap(a=1, b=2)
    r1 = one_delta(delta.on_request(dreq(), s1))
    assert set(delta_clas(r1)) == {"a", "b"}
    assert delta.on_request(dreq(nonce=r1.nonce), s1) == []
    s2 = snap(a=1, b=2, c=3)
    r2 = one_delta(delta.on_snapshot(s2))
    assert set(delta_clas(r2)) == {"c"}
    assert delta.on_request(dreq(nonce=r2.nonce), s2) == []
    s3 = snap(b=2, c=3)
    r3 = one_delta(delta.on_snapshot(s3))
    assert list(r3.removed_resources) == ["a"] and len(r3.resources) == 0
    assert delta.on_request(dreq(nonce=r3.nonce), s3) == []
    assert delta.on_snapshot(snap(b=2, c=3)) == []


def test_delta_explicit_star_wildcard(delta: DeltaStream) -> None:
    s1 = snap(a=1, b=2)
    r1 = one_delta(delta.on_request(dreq(["*"]), s1))
    assert set(delta_clas(r1)) == {"a", "b"}


def test_delta_missing_subscription_served_when_it_appears(delta: DeltaStream) -> None:
    # Absence is reported once, so Envoy need not wait out initial_fetch_timeout ...
    absent = one_delta(delta.on_request(dreq(["ghost"]), snap(a=1)))
    assert list(absent.removed_resources) == ["ghost"] and not absent.resources
    assert delta.on_request(dreq(nonce=absent.nonce), snap(a=1)) == []
    assert delta.on_snapshot(snap(a=2)) == []
    # ... and the subscription is remembered: the resource goes out when it appears.
    r = one_delta(delta.on_snapshot(snap(a=1, ghost=6)))
    assert delta_clas(r)["ghost"][1] == 6
    assert not r.removed_resources


def test_delta_unknown_nonce_does_not_record(delta: DeltaStream, reg: StatusRegistry) -> None:
    s1 = snap(a=1)
    one_delta(delta.on_request(dreq(["a"]), s1))
    assert delta.on_request(dreq(nonce="nope", error="x"), s1) == []
    assert node(reg)["nacks"] == 0 and node(reg)["acks"] == 0


def test_delta_unsupported_type_gets_no_response(delta: DeltaStream) -> None:
    s1 = snap(a=1)
    assert delta.on_request(dreq(type_url=CDS_TYPE), s1) == []
    assert CDS_TYPE in delta.unsupported_types
    assert set(delta_clas(one_delta(delta.on_request(dreq(["a"]), s1)))) == {"a"}


def test_delta_before_first_snapshot(delta: DeltaStream) -> None:
    assert delta.on_request(dreq(["a"]), None) == []
    assert set(delta_clas(one_delta(delta.on_snapshot(snap(a=1))))) == {"a"}
