"""A real Envoy keeps getting weights while another client throws bad xDS requests at the server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from balanceiq.config import Settings
from balanceiq.testbed.envoy import render_bootstrap
from balanceiq.xds.server import MAX_REQUEST_BYTES, XdsServer
from balanceiq.xds.snapshot import EDS_TYPE
from balanceiq_lab.testbed.envoy import EnvoyProcess, endpoint_weights

pytestmark = pytest.mark.slow

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
EDS = "/envoy.service.endpoint.v3.EndpointDiscoveryService/"
SOTW = [ADS + "StreamAggregatedResources", EDS + "StreamEndpoints"]
DELTA = [ADS + "DeltaAggregatedResources", EDS + "DeltaEndpoints"]


def _identity(b: bytes) -> bytes:
    return b


def sotw(
    node: str | None = "bad", names: tuple[str, ...] = ("my_service",), type_url: str = EDS_TYPE, nonce: str = ""
) -> bytes:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names, response_nonce=nonce)
    if node is not None:
        req.node.id = node
    return req.SerializeToString()  # type: ignore[no-any-return]


def delta(
    node: str | None = "bad", sub: tuple[str, ...] = ("my_service",), unsub: tuple[str, ...] = (), nonce: str = ""
) -> bytes:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=EDS_TYPE, resource_names_subscribe=sub, resource_names_unsubscribe=unsub, response_nonce=nonce
    )
    if node is not None:
        req.node.id = node
    return req.SerializeToString()  # type: ignore[no-any-return]


BAD: list[tuple[str, list[str], list[bytes]]] = [
    # (what, methods, requests sent on one stream)
    ("garbage bytes", SOTW + DELTA, [b"\xff\xfe\xfd\x00\x01"]),
    ("oversize", SOTW, [sotw("o" * (MAX_REQUEST_BYTES + 1))]),
    ("control chars in node id", SOTW + DELTA, [sotw("a\x00b\nc")]),
    ("unknown type url", SOTW, [sotw(type_url="type.googleapis.com/not.a.Type"), sotw(None, nonce="x")]),
    ("bogus nonces", SOTW, [sotw(), sotw(None, nonce="99999"), sotw(None, nonce="")]),
    ("names past the limit", SOTW, [sotw(names=tuple(f"n{i}" for i in range(10_001)))]),
    (
        "unsubscribe unknown names",
        DELTA,
        [delta(), delta(None, sub=(), unsub=("ghost", "nope")), delta(None, sub=(), nonce="zz")],
    ),
]


@pytest.fixture(params=["ads-sotw", "ads-delta"])
def envoy_and_server(
    request: pytest.FixtureRequest, ports_settings: Settings, tmp_path: Path
) -> Iterator[tuple[XdsServer, EnvoyProcess]]:
    xds = XdsServer(ports_settings, state_dir=tmp_path / "state")
    xds.start()
    envoy = EnvoyProcess(
        render_bootstrap(ports_settings, api=request.param, node_id="real-envoy", health_check_interval_s=60),
        workdir=tmp_path / "envoy",
    )
    try:
        envoy.start()
        yield xds, envoy
    finally:
        envoy.stop()
        xds.stop()


def wait_weight(envoy: EnvoyProcess, address: str, weight: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = endpoint_weights(envoy.clusters_json(), "my_service").get(address)
        if seen == weight:
            return
        time.sleep(0.05)
    raise AssertionError(f"Envoy shows weight {seen} for {address}, expected {weight}")


def test_real_envoy_keeps_receiving_while_bad_clients_are_refused(
    envoy_and_server: tuple[XdsServer, EnvoyProcess],
) -> None:
    xds, envoy = envoy_and_server
    address = next(iter(xds.assignment("my_service").weights))
    wait_weight(envoy, address, 1)
    real = next(n for n in xds.status()["nodes"] if n["node_id"] == "real-envoy")
    channel = grpc.insecure_channel(f"127.0.0.1:{xds.port}")
    weight = 1
    try:
        for what, methods, requests in BAD:
            for method in methods:
                call = channel.stream_stream(method, request_serializer=_identity, response_deserializer=_identity)
                try:
                    # A short deadline: a refused stream ends at once; an ignored one stays
                    # open (as the protocol says) until the deadline cuts it.
                    for _ in call(iter(requests), timeout=0.5):
                        pass
                except grpc.RpcError as exc:
                    assert exc.code() in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,  # type: ignore[attr-defined]
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ), (what, method, exc)
                weight += 1
                version = xds.set_assignment("my_service", {address: weight})
                assert xds.wait_for_ack(version, "real-envoy", timeout=5), f"Envoy did not ACK after {what} on {method}"
                wait_weight(envoy, address, weight)
    finally:
        channel.close()
    status = xds.status()
    after = next(n for n in status["nodes"] if n["node_id"] == "real-envoy")
    # One stream for the whole run (never dropped and reconnected), nothing rejected.
    assert after["streams"] == 1 and after["first_seen"] == real["first_seen"] and after["nacks"] == 0
    assert after["acks"] >= real["acks"] + sum(len(m) for _, m, _ in BAD)
    refused, ignored = status["requests_refused"], status["requests_ignored"]
    assert {"malformed", "oversize", "bad_node_id", "too_many_names"} <= set(refused), refused
    assert {"unsupported_type", "stale_nonce", "unknown_unsubscribe", "unknown_nonce"} <= set(ignored), ignored
    assert "internal_error" not in refused
