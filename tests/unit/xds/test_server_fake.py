"""XdsServer in-process, talked to over real gRPC by a fake Envoy (no Envoy binary)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc
from google.rpc import status_pb2
from rawsnap import raw_snapshot  # beside this file: pytest puts its folder on sys.path
from streams import XdsStream

from balanceiq.config import default_settings
from balanceiq.exceptions import AssignmentError, XdsBindError, XdsError
from balanceiq.xds.server import XdsServer
from balanceiq.xds.snapshot import EDS_TYPE

_DEFAULT = default_settings().clusters[0]
CLUSTER = _DEFAULT.name
EP1, EP2, EP3 = (ep.address for ep in _DEFAULT.endpoints)
W1, W2, W3 = (ep.weight for ep in _DEFAULT.endpoints)
LOCALITIES = sorted({f"{ep.cloud}/{ep.region}" for ep in _DEFAULT.endpoints})
CDS_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
WAIT = 5.0


# --- a fake Envoy ---------------------------------------------------------------------------


def with_node(req: Any, node_id: str) -> Any:
    req.node.id = node_id
    req.node.cluster = "fake-envoy"
    return req


def error(msg: str) -> status_pb2.Status:
    return status_pb2.Status(code=3, message=msg)


@dataclass
class Flavour:
    name: str
    delta: bool
    method: Callable[[grpc.Channel], Callable[[Iterator[Any]], Any]]

    def subscribe(self, node_id: str, names: list[str], type_url: str = EDS_TYPE) -> Any:
        if self.delta:
            return with_node(
                discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names), node_id
            )
        return with_node(discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names), node_id)

    def ack(self, resp: Any, names: list[str], accepted: str = "", err: str | None = None) -> Any:
        if self.delta:
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=EDS_TYPE, response_nonce=resp.nonce)
        else:
            # Envoy ACKs with the version it now has, and NACKs with the previous one.
            version = resp.version_info if err is None else accepted
            req = discovery_pb2.DiscoveryRequest(
                type_url=EDS_TYPE, resource_names=names, response_nonce=resp.nonce, version_info=version
            )
        if err is not None:
            req.error_detail.CopyFrom(error(err))
        return req

    def version(self, resp: Any) -> str:
        return resp.system_version_info if self.delta else resp.version_info

    def anys(self, resp: Any) -> list[Any]:
        return [r.resource for r in resp.resources] if self.delta else list(resp.resources)

    def clas(self, resp: Any) -> dict[str, endpoint_pb2.ClusterLoadAssignment]:
        out = {}
        for any_msg in self.anys(resp):
            assert any_msg.type_url == EDS_TYPE
            cla = endpoint_pb2.ClusterLoadAssignment()
            assert any_msg.Unpack(cla)
            out[cla.cluster_name] = cla
        return out


FLAVOURS = [
    Flavour("ads-sotw", False, lambda ch: ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources),
    Flavour("ads-delta", True, lambda ch: ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).DeltaAggregatedResources),
    Flavour("eds-sotw", False, lambda ch: eds_pb2_grpc.EndpointDiscoveryServiceStub(ch).StreamEndpoints),
    Flavour("eds-delta", True, lambda ch: eds_pb2_grpc.EndpointDiscoveryServiceStub(ch).DeltaEndpoints),
]


def endpoints(cla: endpoint_pb2.ClusterLoadAssignment) -> dict[str, tuple[int, int]]:
    """address:port -> (weight, health_status)."""
    out = {}
    for loc in cla.endpoints:
        for lb in loc.lb_endpoints:
            sa = lb.endpoint.address.socket_address
            out[f"{sa.address}:{sa.port_value}"] = (lb.load_balancing_weight.value, lb.health_status)
    return out


def eventually(pred: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def node_status(server: XdsServer, node_id: str) -> dict[str, Any] | None:
    return next((n for n in server.status()["nodes"] if n["node_id"] == node_id), None)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[XdsServer]:
    srv = XdsServer(default_settings(), port=0)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def channel(server: XdsServer) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        grpc.channel_ready_future(ch).result(timeout=WAIT)
        yield ch
    finally:
        ch.close()


@pytest.fixture
def envoys(channel: grpc.Channel) -> Iterator[Callable[[Flavour], XdsStream]]:
    opened: list[XdsStream] = []

    def open_stream(flavour: Flavour) -> XdsStream:
        env = XdsStream(flavour.method(channel))
        opened.append(env)
        return env

    try:
        yield open_stream
    finally:
        for env in opened:
            env.close()


# --- the full loop, every flavour ------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS, ids=lambda f: f.name)
def test_initial_ack_push_nack(server: XdsServer, envoys: Callable[[Flavour], XdsStream], flavour: Flavour) -> None:
    node_id = f"fake-{flavour.name}"
    env = envoys(flavour)
    env.send(flavour.subscribe(node_id, [CLUSTER]))

    # 1. initial CLA: the configured endpoints with their configured weights
    r1 = env.recv()
    v1 = server.status()["version"]
    assert flavour.version(r1) == v1
    assert r1.type_url == EDS_TYPE and r1.nonce
    cla = flavour.clas(r1)[CLUSTER]
    assert endpoints(cla) == {
        EP1: (W1, health_check_pb2.HEALTHY),
        EP2: (W2, health_check_pb2.HEALTHY),
        EP3: (W3, health_check_pb2.HEALTHY),
    }
    assert sorted({le.locality.region for le in cla.endpoints}) == LOCALITIES

    # 2. ACK
    env.send(flavour.ack(r1, [CLUSTER]))
    assert server.wait_for_ack(v1, node_id, timeout=WAIT)
    status = node_status(server, node_id)
    assert status is not None
    assert status["connected"] and status["api"] == [flavour.name] and status["cluster"] == "fake-envoy"

    # 3. set_assignment pushes new weights and health
    v2 = server.set_assignment(CLUSTER, {EP2: 7}, {EP3: "DRAINING"})
    assert v2 != v1 and server.status()["version"] == v2
    r2 = env.recv()
    assert flavour.version(r2) == v2
    assert endpoints(flavour.clas(r2)[CLUSTER]) == {
        EP1: (W1, health_check_pb2.HEALTHY),
        EP2: (7, health_check_pb2.HEALTHY),
        EP3: (W3, health_check_pb2.DRAINING),
    }
    env.send(flavour.ack(r2, [CLUSTER]))
    assert server.wait_for_ack(v2, node_id, timeout=WAIT)

    # 4. a resource Envoy would reject: NACK recorded in status(), not re-sent
    bad_version = server.store.next_version()
    server.store.publish(raw_snapshot(bad_version, {CLUSTER: b"\x12\x03bad"}))
    r3 = env.recv()
    assert flavour.version(r3) == bad_version
    env.send(flavour.ack(r3, [CLUSTER], accepted=v2, err="malformed ClusterLoadAssignment"))
    assert server.registry.wait_for(lambda nodes: nodes[node_id].last_nacked_version == bad_version, timeout=WAIT)
    status = node_status(server, node_id)
    assert status is not None
    assert status["last_error"] == "malformed ClusterLoadAssignment"
    assert status["last_acked_version"] == v2
    assert status["nacks"] == 1 and status["acks"] == 2
    assert any(
        r["node_id"] == node_id and r["version"] == bad_version and r["type_url"] == EDS_TYPE
        for r in server.status()["rejections"]
    )
    server.store.publish(raw_snapshot(server.store.next_version(), {CLUSTER: b"\x12\x03bad"}))
    env.expect_nothing()

    # 5. closing the stream is seen
    env.close()
    eventually(lambda: not node_status(server, node_id)["connected"])  # type: ignore[index]
    assert server.status()["connected"] == 0


@pytest.mark.parametrize("flavour", FLAVOURS, ids=lambda f: f.name)
def test_bad_set_assignment_changes_nothing(
    server: XdsServer, envoys: Callable[[Flavour], XdsStream], flavour: Flavour
) -> None:
    env = envoys(flavour)
    env.send(flavour.subscribe("n", [CLUSTER]))
    r1 = env.recv()
    env.send(flavour.ack(r1, [CLUSTER]))
    before = server.status()["version"]
    assert server.wait_for_ack(before, "n", timeout=WAIT)
    latest = server.store.latest()
    with pytest.raises(AssignmentError, match="weight"):
        server.set_assignment(CLUSTER, {EP1: 0})
    with pytest.raises(AssignmentError, match="unknown endpoint"):
        server.set_assignment(CLUSTER, {"10.1.1.1:1": 3})
    with pytest.raises(AssignmentError, match="unknown cluster"):
        server.set_assignment("nope", {EP1: 3})
    with pytest.raises(AssignmentError, match="health"):
        server.set_assignment(CLUSTER, health={EP1: "ON_FIRE"})
    with pytest.raises(AssignmentError):
        server.set_assignment(CLUSTER, {EP1: 2**32 - 1, EP2: 2**32 - 1, EP3: True})
    assert server.status()["version"] == before
    assert server.store.latest() is latest
    assert server.assignment(CLUSTER).weights == {EP1: W1, EP2: W2, EP3: W3}
    env.expect_nothing()


def test_unchanged_set_assignment_publishes_nothing(server: XdsServer, envoys: Callable[[Flavour], XdsStream]) -> None:
    flavour = FLAVOURS[0]
    env = envoys(flavour)
    env.send(flavour.subscribe("n", [CLUSTER]))
    r1 = env.recv()
    env.send(flavour.ack(r1, [CLUSTER]))
    assert server.wait_for_ack(r1.version_info, "n", timeout=WAIT)
    latest = server.store.latest()
    assert server.set_assignment(CLUSTER, {EP1: W1}) == r1.version_info
    assert server.store.latest() is latest
    env.expect_nothing()
    # after a raw snapshot replaced the store, the same call publishes the real state again
    server.store.publish(raw_snapshot(server.store.next_version(), {CLUSTER: b"\x12\x03bad"}))
    r2 = env.recv()
    env.send(flavour.ack(r2, [CLUSTER], accepted=r1.version_info, err="bad"))
    v3 = server.set_assignment(CLUSTER, {EP1: W1})
    assert v3 not in (r1.version_info, r2.version_info)
    r3 = env.recv()
    assert r3.version_info == v3 and endpoints(flavour.clas(r3)[CLUSTER])[EP1][0] == W1


def test_one_publish_reaches_every_stream(server: XdsServer, envoys: Callable[[Flavour], XdsStream]) -> None:
    streams = []
    for i, flavour in enumerate(FLAVOURS):
        env = envoys(flavour)
        env.send(flavour.subscribe(f"n{i}", [CLUSTER]))
        r = env.recv()
        env.send(flavour.ack(r, [CLUSTER]))
        streams.append((flavour, env))
    v = server.set_assignment(CLUSTER, {EP1: 42})
    for flavour, env in streams:
        r = env.recv()
        assert flavour.version(r) == v
        assert endpoints(flavour.clas(r)[CLUSTER])[EP1][0] == 42
    assert server.status()["connected"] == 4


def test_sotw_reconnect_gets_current_state_even_with_matching_version(
    server: XdsServer, envoys: Callable[[Flavour], XdsStream]
) -> None:
    flavour = FLAVOURS[0]
    env = envoys(flavour)
    req = flavour.subscribe("n", [CLUSTER])
    req.version_info = server.status()["version"]
    env.send(req)
    r = env.recv()
    assert flavour.version(r) == server.status()["version"]
    assert CLUSTER in flavour.clas(r)


def test_delta_reconnect_with_current_versions_gets_nothing(
    server: XdsServer, envoys: Callable[[Flavour], XdsStream]
) -> None:
    flavour = FLAVOURS[1]
    first = envoys(flavour)
    first.send(flavour.subscribe("n", [CLUSTER]))
    r = first.recv()
    held = {res.name: res.version for res in r.resources}
    first.close()
    again = envoys(flavour)
    req = flavour.subscribe("n", [CLUSTER])
    req.initial_resource_versions.update(held)
    again.send(req)
    again.expect_nothing()
    server.set_assignment(CLUSTER, {EP1: 9})
    r2 = again.recv()
    assert endpoints(flavour.clas(r2)[CLUSTER])[EP1][0] == 9


@pytest.mark.parametrize("flavour", [FLAVOURS[0], FLAVOURS[1]], ids=lambda f: f.name)
def test_ads_unsupported_type_gets_no_response(
    server: XdsServer, envoys: Callable[[Flavour], XdsStream], flavour: Flavour
) -> None:
    env = envoys(flavour)
    env.send(flavour.subscribe("n", [], type_url=CDS_TYPE))
    env.expect_nothing()
    env.send(flavour.subscribe("n", [CLUSTER]))
    r = env.recv()
    assert r.type_url == EDS_TYPE and CLUSTER in flavour.clas(r)


def test_fetch_endpoints_unary(server: XdsServer, channel: grpc.Channel) -> None:
    stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(channel)
    resp = stub.FetchEndpoints(
        with_node(discovery_pb2.DiscoveryRequest(type_url=EDS_TYPE, resource_names=[CLUSTER]), "f"),
        timeout=WAIT,
    )
    assert resp.version_info == server.status()["version"]
    assert resp.type_url == EDS_TYPE
    cla = endpoint_pb2.ClusterLoadAssignment()
    assert len(resp.resources) == 1 and resp.resources[0].Unpack(cla)
    assert cla.cluster_name == CLUSTER and len(endpoints(cla)) == 3
    v = server.set_assignment(CLUSTER, {EP3: 11})
    resp2 = stub.FetchEndpoints(discovery_pb2.DiscoveryRequest(type_url=EDS_TYPE), timeout=WAIT)
    assert resp2.version_info == v
    assert resp2.resources[0].Unpack(cla) and endpoints(cla)[EP3][0] == 11
    empty = stub.FetchEndpoints(discovery_pb2.DiscoveryRequest(resource_names=["ghost"]), timeout=WAIT)
    assert len(empty.resources) == 0


def test_second_server_on_same_port_raises_bind_error(server: XdsServer, channel: grpc.Channel) -> None:
    second = XdsServer(default_settings(), port=server.port)
    try:
        with pytest.raises(XdsBindError, match=str(server.port)):
            second.start()
    finally:
        second.stop()
    # the first server is unaffected
    stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(channel)
    resp = stub.FetchEndpoints(discovery_pb2.DiscoveryRequest(resource_names=[CLUSTER]), timeout=WAIT)
    assert len(resp.resources) == 1


def test_start_twice_raises(server: XdsServer) -> None:
    with pytest.raises(XdsError, match="already started"):
        server.start()


def test_status_shape(server: XdsServer) -> None:
    st = server.status()
    assert st["listening"] == f"127.0.0.1:{server.port}"
    assert st["tls"] is False
    assert st["version"].startswith(f"{server.store.epoch}.")
    assert st["restored_from_state"] is False
    assert set(st["clusters"]) == {CLUSTER}
    assert st["nodes"] == [] and st["connected"] == 0


def test_restart_restores_weights(tmp_path: Path) -> None:
    first = XdsServer(default_settings(), port=0, state_dir=tmp_path)
    v1 = first.set_assignment(CLUSTER, {EP1: 5}, {EP2: "DRAINING"})
    first.stop()
    second = XdsServer(default_settings(), port=0, state_dir=tmp_path)
    try:
        assert second.restored is True
        a = second.assignment(CLUSTER)
        assert a.weights == {EP1: 5, EP2: W2, EP3: W3}
        assert a.health[EP2] == "DRAINING"
        v2 = second.status()["version"]
        assert v2 != v1
        assert int(v2.split(".")[0]) > int(v1.split(".")[0])
    finally:
        second.stop()


def test_restart_after_stop_still_pushes() -> None:
    """start() after stop() must either refuse or serve pushes; never serve stale state."""
    srv = XdsServer(default_settings(), port=0)
    srv.start()
    srv.stop()
    try:
        try:
            port = srv.start()
        except XdsError:
            return  # refusing a restart is an acceptable contract
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        flavour = FLAVOURS[0]
        env = XdsStream(flavour.method(ch))
        try:
            env.send(flavour.subscribe("n", [CLUSTER]))
            r1 = env.recv()
            env.send(flavour.ack(r1, [CLUSTER]))
            assert srv.wait_for_ack(r1.version_info, "n", timeout=WAIT)
            v = srv.set_assignment(CLUSTER, {EP1: 9})
            r2 = env.recv(timeout=2)
            assert r2.version_info == v
        finally:
            env.close()
            ch.close()
    finally:
        srv.stop()
