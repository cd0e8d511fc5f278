"""Malformed and hostile xDS requests against the real gRPC server, with a good client watching.

Every case runs while a well-behaved ADS client (its own channel, ACKing every response)
is connected. After each: the bad stream ended with a clear error status or was ignored
as the protocol says, a counter in ``status()`` moved, and the good client still got the
next push. No traceback in the logs, no gRPC error on stderr.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from streams import XdsStream, raw_stream  # beside this file: pytest puts its folder on sys.path

from balanceiq.config import default_settings
from balanceiq.xds import protocol
from balanceiq.xds.server import MAX_REQUEST_BYTES, XdsServer
from balanceiq.xds.snapshot import EDS_TYPE

CLUSTER = default_settings().clusters[0].name
EP1 = default_settings().clusters[0].endpoints[0].address
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
EDS = "/envoy.service.endpoint.v3.EndpointDiscoveryService/"
SOTW_METHODS = [ADS + "StreamAggregatedResources", EDS + "StreamEndpoints"]
DELTA_METHODS = [ADS + "DeltaAggregatedResources", EDS + "DeltaEndpoints"]
FETCH = EDS + "FetchEndpoints"
CDS_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
WAIT = 5.0


def _identity(b: bytes) -> bytes:
    return b


class GoodEnvoy:
    """A well-behaved ADS SotW client on its own channel: ACKs each response at once."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stream = raw_stream(self.channel, SOTW_METHODS[0])
        self.versions: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        first = sotw_request("good-envoy", [CLUSTER])
        self.stream.send(first)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self.stream.responses.get()
            if isinstance(item, grpc.RpcError):
                with self._cond:
                    self.versions.append(f"ENDED {item.code()}")
                    self._cond.notify_all()
                return
            resp = discovery_pb2.DiscoveryResponse.FromString(item)
            self.stream.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=EDS_TYPE,
                    resource_names=[CLUSTER],
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                )
            )
            with self._cond:
                self.versions.append(resp.version_info)
                self._cond.notify_all()

    def wait_for(self, version: str, timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: version in self.versions, timeout)

    def close(self) -> None:
        self.stream.close()
        self.channel.close()


def sotw_request(
    node_id: str | None, names: list[str], type_url: str = EDS_TYPE, nonce: str = "", version: str = ""
) -> Any:
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=names, response_nonce=nonce, version_info=version
    )
    if node_id is not None:
        req.node.id = node_id
    return req


def delta_request(node_id: str | None, subscribe: list[str] = (), unsubscribe: list[str] = (), nonce: str = "") -> Any:  # type: ignore[assignment]
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=EDS_TYPE,
        resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe,
        response_nonce=nonce,
    )
    if node_id is not None:
        req.node.id = node_id
    return req


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[XdsServer]:
    srv = XdsServer(default_settings(), port=0)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def good(server: XdsServer) -> Iterator[GoodEnvoy]:
    envoy = GoodEnvoy(f"127.0.0.1:{server.port}")
    assert envoy.wait_for(server.status()["version"])
    try:
        yield envoy
    finally:
        envoy.close()


@pytest.fixture
def bad_channel(server: XdsServer) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield ch
    finally:
        ch.close()


@pytest.fixture(autouse=True)
def clean_logs(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """No traceback or error from the server (Python logging, or gRPC's C core on stderr)."""
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    err = capfd.readouterr().err
    assert not re.search(r"^E\d{4} ", err, re.M), err
    assert "Traceback" not in err and "Exception" not in err, err


_weights = iter(range(2, 10**6))


def still_serving(server: XdsServer, good: GoodEnvoy) -> None:
    """A fresh push reaches the good client, and nothing counted as a server bug."""
    version = server.set_assignment(CLUSTER, {EP1: next(_weights)})
    assert good.wait_for(version), f"good client did not get {version}; saw {good.versions[-3:]}"
    assert server.wait_for_ack(version, "good-envoy", WAIT)
    status = server.status()
    assert "internal_error" not in status["requests_refused"]
    assert status["connected"] >= 1


def counted(server: XdsServer, kind: str, reason: str, before: int, timeout: float = WAIT) -> None:
    key = f"requests_{kind}"
    deadline = time.monotonic() + timeout
    while server.status()[key].get(reason, 0) <= before:
        assert time.monotonic() < deadline, f"{key}[{reason}] stayed at {before}: {server.status()[key]}"
        time.sleep(0.01)


def refused_count(server: XdsServer, reason: str, kind: str = "refused") -> int:
    return int(server.status()[f"requests_{kind}"].get(reason, 0))


# -- refused: the stream ends with a clear status, the others go on --------------------------------


@pytest.mark.parametrize("method", SOTW_METHODS + DELTA_METHODS)
@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff\xff\xff", b"\x0a\x02\xc3\x28", b"\x12\x05ab"],
    ids=["garbage", "bad-utf8-string", "truncated"],
)
def test_unparsable_request_is_refused_invalid_argument(
    server: XdsServer, good: GoodEnvoy, bad_channel: grpc.Channel, method: str, payload: bytes
) -> None:
    before = refused_count(server, "malformed")
    bad = raw_stream(bad_channel, method)
    bad.send(payload)
    err = bad.ended_with()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid" in err.details() and "(malformed)" in err.details()
    counted(server, "refused", "malformed", before)
    still_serving(server, good)


@pytest.mark.parametrize("method", SOTW_METHODS + DELTA_METHODS)
def test_request_over_the_size_cap_is_refused_by_grpc_and_counted(
    server: XdsServer, good: GoodEnvoy, bad_channel: grpc.Channel, method: str
) -> None:
    before = refused_count(server, "oversize")
    bad = raw_stream(bad_channel, method)
    big = "n" * (MAX_REQUEST_BYTES + 1024)
    bad.send(sotw_request(big, [CLUSTER]) if method in SOTW_METHODS else delta_request(big, [CLUSTER]))
    err = bad.ended_with()
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.details()
    counted(server, "refused", "oversize", before)
    # A well-formed request just under the cap is read, parsed, and refused for what it says.
    bad2 = raw_stream(bad_channel, method)
    near = "n" * (MAX_REQUEST_BYTES - 4096)
    bad2.send(sotw_request(near, [CLUSTER]) if method in SOTW_METHODS else delta_request(near, [CLUSTER]))
    assert bad2.ended_with().code() == grpc.StatusCode.INVALID_ARGUMENT
    still_serving(server, good)


@pytest.mark.parametrize("method", SOTW_METHODS + DELTA_METHODS)
@pytest.mark.parametrize(
    ("node_id", "needle"),
    [
        ("evil\nnode", "non-printable"),
        ("nul\x00id", "non-printable"),
        ("\u202eevil", "non-printable"),
        ("x" * (protocol.MAX_NODE_ID + 1), "characters long"),
    ],
    ids=["newline", "nul", "bidi-override", "too-long"],
)
def test_garbage_node_id_is_refused(
    server: XdsServer, good: GoodEnvoy, bad_channel: grpc.Channel, method: str, node_id: str, needle: str
) -> None:
    before = refused_count(server, "bad_node_id")
    bad = raw_stream(bad_channel, method)
    bad.send(sotw_request(node_id, [CLUSTER]) if method in SOTW_METHODS else delta_request(node_id, [CLUSTER]))
    err = bad.ended_with()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.details()
    counted(server, "refused", "bad_node_id", before)
    assert all(n["node_id"] in ("good-envoy",) for n in server.status()["nodes"])
    still_serving(server, good)


@pytest.mark.parametrize("method", SOTW_METHODS + DELTA_METHODS)
def test_names_past_the_limits_are_refused(
    server: XdsServer, good: GoodEnvoy, bad_channel: grpc.Channel, method: str
) -> None:
    sotw = method in SOTW_METHODS
    long_name = "c" * (protocol.MAX_NAME + 1)
    bad = raw_stream(bad_channel, method)
    bad.send(sotw_request("n", [long_name]) if sotw else delta_request("n", [long_name]))
    err = bad.ended_with()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "resource name" in err.details()
    assert refused_count(server, "bad_name") >= 1

    many = [f"c{i}" for i in range(protocol.MAX_NAMES + 1)]
    bad = raw_stream(bad_channel, method)
    if sotw:
        bad.send(sotw_request("n", many))
    else:
        # Across requests too: each is small, the subscription would grow without end.
        bad.send(delta_request("n", many[:5000]))
        bad.send(delta_request("n", many[5000:]))
    err = bad.ended_with()
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "10000" in err.details()
    assert refused_count(server, "too_many_names") >= 1
    still_serving(server, good)


def test_too_many_unsupported_types_on_one_stream_is_refused(
    server: XdsServer, good: GoodEnvoy, bad_channel: grpc.Channel
) -> None:
    bad = raw_stream(bad_channel, SOTW_METHODS[0])
    for i in range(protocol.MAX_UNSUPPORTED_TYPES + 1):
        bad.send(sotw_request("n" if i == 0 else None, [], type_url=f"type.googleapis.com/junk.T{i}"))
    err = bad.ended_with()
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "unsupported types" in err.details()
    assert refused_count(server, "too_many_types") == 1
    assert refused_count(server, "unsupported_type", "ignored") == protocol.MAX_UNSUPPORTED_TYPES
    still_serving(server, good)


def test_fetch_refuses_garbage_and_other_types(server: XdsServer, good: GoodEnvoy, bad_channel: grpc.Channel) -> None:
    fetch = bad_channel.unary_unary(FETCH, request_serializer=_identity, response_deserializer=_identity)
    with pytest.raises(grpc.RpcError) as info:
        fetch(b"\xff\xff\xff", timeout=WAIT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as info:
        fetch(sotw_request("f", [CLUSTER], type_url=CDS_TYPE).SerializeToString(), timeout=WAIT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "serves" in info.value.details()  # type: ignore[attr-defined]
    assert refused_count(server, "malformed") == 1 and refused_count(server, "unsupported_type") == 1
    still_serving(server, good)


# -- ignored, as the protocol says: the stream goes on ---------------------------------------------


@pytest.mark.parametrize("method", SOTW_METHODS)
def test_sotw_unknown_type_and_stale_nonce_are_ignored(
    server: XdsServer, good: GoodEnvoy, bad_channel: grpc.Channel, method: str
) -> None:
    parse = discovery_pb2.DiscoveryResponse.FromString
    s = raw_stream(bad_channel, method)
    s.send(sotw_request("sotw-bogus", [], type_url="type.googleapis.com/no.Such"))
    s.expect_nothing()
    counted(server, "ignored", "unsupported_type", 0)
    s.send(sotw_request(None, [CLUSTER]))
    r1 = parse(s.recv())
    before = refused_count(server, "stale_nonce", "ignored")
    for nonce in ("bogus", "0", "9" * 200, r1.nonce + "x"):
        s.send(sotw_request(None, [CLUSTER], nonce=nonce, version="whatever"))
    s.expect_nothing()
    assert refused_count(server, "stale_nonce", "ignored") == before + 4
    # The stream is fine: the real ACK goes through and the next push arrives.
    s.send(sotw_request(None, [CLUSTER], nonce=r1.nonce, version=r1.version_info))
    assert server.wait_for_ack(r1.version_info, "sotw-bogus", WAIT)
    still_serving(server, good)
    assert parse(s.recv()).version_info == server.status()["version"]
    s.close()


@pytest.mark.parametrize("method", DELTA_METHODS)
def test_delta_unknown_nonce_and_unknown_unsubscribe_are_ignored(
    server: XdsServer, good: GoodEnvoy, bad_channel: grpc.Channel, method: str
) -> None:
    parse = discovery_pb2.DeltaDiscoveryResponse.FromString
    s = raw_stream(bad_channel, method)
    s.send(delta_request("delta-bogus", [CLUSTER]))
    r1 = parse(s.recv())
    s.send(delta_request(None, nonce=r1.nonce))  # ACK
    s.send(delta_request(None, unsubscribe=["never-subscribed", "ghost"]))
    s.send(delta_request(None, nonce="no-such-nonce"))
    s.expect_nothing()
    assert refused_count(server, "unknown_unsubscribe", "ignored") == 2
    assert refused_count(server, "unknown_nonce", "ignored") == 1
    # Still subscribed to the cluster: the next push arrives on this stream too.
    still_serving(server, good)
    assert parse(s.recv()).system_version_info == server.status()["version"]
    s.close()


def test_huge_nack_message_is_kept_short(server: XdsServer, good: GoodEnvoy, bad_channel: grpc.Channel) -> None:
    parse = discovery_pb2.DiscoveryResponse.FromString
    s = raw_stream(bad_channel, SOTW_METHODS[0])
    s.send(sotw_request("nacker", [CLUSTER]))
    r1 = parse(s.recv())
    nack = sotw_request(None, [CLUSTER], nonce=r1.nonce)
    nack.error_detail.code = 3
    nack.error_detail.message = "e" * (1024 * 1024)
    s.send(nack)
    assert server.registry.wait_for(lambda nodes: "nacker" in nodes and nodes["nacker"].nacks == 1, WAIT)
    node = next(n for n in server.status()["nodes"] if n["node_id"] == "nacker")
    assert len(node["last_error"]) == protocol.MAX_ERROR_DETAIL
    assert all(len(r["error"]) <= protocol.MAX_ERROR_DETAIL for r in server.status()["rejections"])
    still_serving(server, good)
    s.close()


def test_node_registry_is_bounded_against_id_churn(
    server: XdsServer, good: GoodEnvoy, bad_channel: grpc.Channel
) -> None:
    server.registry.max_nodes = 50  # the real bound is 10,000; the rule is the same
    for i in range(120):
        s = raw_stream(bad_channel, SOTW_METHODS[0])
        s.send(sotw_request(f"churn-{i}", [CLUSTER]))
        discovery_pb2.DiscoveryResponse.FromString(s.recv())
        s.close()
        # Only disconnected nodes are dropped; wait for the server to see this one go.
        deadline = time.monotonic() + WAIT
        while server.status()["connected"] > 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    nodes = {n["node_id"]: n for n in server.status()["nodes"]}
    assert len(nodes) <= 50 and "good-envoy" in nodes and nodes["good-envoy"]["connected"]
    still_serving(server, good)


# -- fuzz: random bytes and random well-formed requests on every method --------------------------


FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[XdsServer, GoodEnvoy, grpc.Channel]]:
    # Module scope: hypothesis runs the body many times against one server, which is the
    # point: the same server and good client must survive every example.
    srv = XdsServer(default_settings(), port=0)
    srv.start()
    envoy = GoodEnvoy(f"127.0.0.1:{srv.port}")
    ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    try:
        assert envoy.wait_for(srv.status()["version"])
        yield srv, envoy, ch
    finally:
        ch.close()
        envoy.close()
        srv.stop()


def _outcome(stream: XdsStream, settle: float = 0.05) -> grpc.StatusCode | None:
    """The status the stream ended with, or None if it is still open after answering or not."""
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        try:
            item = stream.responses.get(timeout=max(0.001, deadline - time.monotonic()))
        except queue.Empty:
            break
        if isinstance(item, grpc.RpcError):
            return item.code()  # type: ignore[no-any-return]
    return None


ALLOWED = {None, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def assert_survives(server: XdsServer, ch: grpc.Channel, method: str, payloads: list[bytes]) -> None:
    """``payloads`` on a fresh stream: it ends with a clear error or stays open, and nothing
    counted as a server bug."""
    s = raw_stream(ch, method)
    for p in payloads:
        s.send(p)
    code = _outcome(s)
    s.close()
    assert code in ALLOWED, code
    assert "internal_error" not in server.status()["requests_refused"]


@FUZZ
@given(
    method=st.sampled_from(SOTW_METHODS + DELTA_METHODS),
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
)
def test_random_bytes_never_crash_the_server(
    shared: tuple[XdsServer, GoodEnvoy, grpc.Channel], method: str, payloads: list[bytes]
) -> None:
    server, _good, ch = shared
    assert_survives(server, ch, method, payloads)


names = st.lists(st.sampled_from([CLUSTER, "", "*", "ghost", "c" * 50]) | st.text(max_size=8), max_size=5)
type_urls = st.sampled_from([EDS_TYPE, "", CDS_TYPE, "type.googleapis.com/x"]) | st.text(max_size=10)
nonces = st.sampled_from(["", "1", "bogus"]) | st.text(max_size=6)
node_ids = st.none() | st.sampled_from(["fuzz-node", "", "a\nb"]) | st.text(max_size=10)


@st.composite
def sotw_requests(draw: st.DrawFn) -> bytes:
    req = sotw_request(draw(node_ids), draw(names), draw(type_urls), draw(nonces), draw(st.text(max_size=8)))
    if draw(st.booleans()):
        req.error_detail.code = draw(st.integers(0, 20))
        req.error_detail.message = draw(st.text(max_size=30))
    return req.SerializeToString()  # type: ignore[no-any-return]


@st.composite
def delta_requests(draw: st.DrawFn) -> bytes:
    req = delta_request(draw(node_ids), draw(names), draw(names), draw(nonces))
    req.type_url = draw(type_urls)
    for k in draw(names):
        req.initial_resource_versions[k] = draw(st.text(max_size=5))
    if draw(st.booleans()):
        req.error_detail.message = draw(st.text(max_size=30))
    return req.SerializeToString()  # type: ignore[no-any-return]


@FUZZ
@given(data=st.data(), delta=st.booleans())
def test_random_well_formed_requests_never_crash_the_server(
    shared: tuple[XdsServer, GoodEnvoy, grpc.Channel], data: st.DataObject, delta: bool
) -> None:
    server, _good, ch = shared
    method = data.draw(st.sampled_from(DELTA_METHODS if delta else SOTW_METHODS))
    reqs = data.draw(st.lists(delta_requests() if delta else sotw_requests(), min_size=1, max_size=5))
    assert_survives(server, ch, method, reqs)


def test_after_the_fuzz_the_good_client_still_gets_pushes(shared: tuple[XdsServer, GoodEnvoy, grpc.Channel]) -> None:
    server, good, _ = shared
    still_serving(server, good)
    status = server.status()
    # The good client's stream was never restarted, and its ACKs are all recorded.
    node = next(n for n in status["nodes"] if n["node_id"] == "good-envoy")
    assert node["streams"] == 1 and node["nacks"] == 0 and node["last_acked_version"] == status["version"]
