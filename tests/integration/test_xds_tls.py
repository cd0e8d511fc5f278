"""xDS over TLS and mutual TLS, against a real Envoy, with certificates made per test run."""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.discovery.v3 import discovery_pb2

from balanceiq.config import Settings
from balanceiq.testbed.envoy import render_bootstrap
from balanceiq.xds.server import XdsServer
from balanceiq.xds.snapshot import EDS_TYPE
from balanceiq_lab.testbed.envoy import EnvoyProcess, endpoint_weights

pytestmark = pytest.mark.slow


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path.with_suffix(".crt"), path.with_suffix(".key")


def make_ca(path: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(path, key, cert)
    return key, cert


def make_leaf(path: Path, cn: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(cn), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca[0], hashes.SHA256())
    )
    return _write(path, key, cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d / "ca", "balanceiq test CA")
    rogue = make_ca(d / "rogue-ca", "someone else's CA")
    server_crt, server_key = make_leaf(d / "xds", "xds.balanceiq.test", ca)
    envoy_crt, envoy_key = make_leaf(d / "envoy", "envoy.balanceiq.test", ca)
    rogue_crt, rogue_key = make_leaf(d / "rogue-envoy", "envoy.balanceiq.test", rogue)
    return {
        "ca": d / "ca.crt",
        "rogue_ca": d / "rogue-ca.crt",
        "server_crt": server_crt,
        "server_key": server_key,
        "envoy_crt": envoy_crt,
        "envoy_key": envoy_key,
        "rogue_crt": rogue_crt,
        "rogue_key": rogue_key,
    }


def with_tls(settings: Settings, **tls: object) -> Settings:
    return settings.model_copy(
        update={"xds": settings.xds.model_copy(update={"tls": settings.xds.tls.model_copy(update=tls)})}
    )


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    servers: list[XdsServer] = []

    def start(settings: Settings) -> XdsServer:
        xds = XdsServer(settings, state_dir=tmp_path / "state")
        xds.start()
        servers.append(xds)
        return xds

    yield start
    for s in servers:
        s.stop()


def envoy_gets_endpoints(settings: Settings, tmp_path: Path, timeout: float) -> dict[str, int] | None:
    """The endpoints a real Envoy got within ``timeout``; None if its admin never answered
    (so an Envoy that failed to start cannot pass for one that was refused)."""
    envoy = EnvoyProcess(render_bootstrap(settings, health_check_interval_s=60), workdir=tmp_path / "envoy")
    # Not waiting for LIVE: an Envoy that cannot reach its control plane stays in
    # init until initial_fetch_timeout (15 s), but its admin answers at once.
    envoy.start(wait_ready=False)
    try:
        deadline = time.monotonic() + timeout
        seen: dict[str, int] | None = None
        while time.monotonic() < deadline and not seen:
            try:
                seen = endpoint_weights(envoy.clusters_json(), "my_service")
            except httpx.HTTPError:
                pass  # admin not listening yet
            time.sleep(0.05)
        assert envoy.proc is not None and envoy.proc.poll() is None, "envoy died"
        return seen
    finally:
        envoy.stop()


def test_tls_server_verified_by_envoy(
    ports_settings: Settings, pki: dict[str, Path], tmp_path: Path, server_factory
) -> None:  # type: ignore[no-untyped-def]
    s = with_tls(
        ports_settings,
        enabled=True,
        cert_file=pki["server_crt"],
        key_file=pki["server_key"],
        envoy_ca_file=pki["ca"],
        server_name="xds.balanceiq.test",
    )
    xds = server_factory(s)
    assert len(envoy_gets_endpoints(s, tmp_path, timeout=10) or {}) == 3
    assert xds.status()["tls"] is True


def test_envoy_refuses_a_server_it_cannot_verify(
    ports_settings: Settings, pki: dict[str, Path], tmp_path: Path, server_factory
) -> None:  # type: ignore[no-untyped-def]
    server = with_tls(ports_settings, enabled=True, cert_file=pki["server_crt"], key_file=pki["server_key"])
    xds = server_factory(server)
    envoy_side = with_tls(server, envoy_ca_file=pki["rogue_ca"])
    assert envoy_gets_endpoints(envoy_side, tmp_path, timeout=3) == {}
    assert xds.status()["nodes"] == []


def test_mtls_accepts_a_trusted_envoy_and_rejects_others(
    ports_settings: Settings, pki: dict[str, Path], tmp_path: Path, server_factory
) -> None:  # type: ignore[no-untyped-def]
    s = with_tls(
        ports_settings,
        enabled=True,
        cert_file=pki["server_crt"],
        key_file=pki["server_key"],
        ca_file=pki["ca"],
        require_client_cert=True,
        envoy_ca_file=pki["ca"],
        envoy_cert_file=pki["envoy_crt"],
        envoy_key_file=pki["envoy_key"],
    )
    xds = server_factory(s)
    assert len(envoy_gets_endpoints(s, tmp_path / "trusted", timeout=10) or {}) == 3
    trusted_nodes = len(xds.status()["nodes"])

    rogue = with_tls(s, envoy_cert_file=pki["rogue_crt"], envoy_key_file=pki["rogue_key"])
    assert envoy_gets_endpoints(rogue, tmp_path / "rogue", timeout=3) == {}
    anonymous = with_tls(s, require_client_cert=False, ca_file=None, envoy_cert_file=None, envoy_key_file=None)
    assert envoy_gets_endpoints(anonymous, tmp_path / "anon", timeout=3) == {}
    assert len(xds.status()["nodes"]) == trusted_nodes == 1


def _plaintext_stream_refused(port: int) -> grpc.RpcError:
    """A plaintext gRPC client's ADS stream against the TLS port: the error it ends with."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        req = discovery_pb2.DiscoveryRequest(type_url=EDS_TYPE, resource_names=["my_service"])
        req.node.id = "plaintext-client"
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([req.SerializeToString()]), timeout=3))
        return info.value


@pytest.mark.parametrize("mutual", [True, False], ids=["mtls", "tls"])
def test_mtls_refuses_plaintext_clients(
    ports_settings: Settings, pki: dict[str, Path], tmp_path: Path, server_factory, mutual: bool
) -> None:  # type: ignore[no-untyped-def]
    s = with_tls(
        ports_settings,
        enabled=True,
        cert_file=pki["server_crt"],
        key_file=pki["server_key"],
        ca_file=pki["ca"] if mutual else None,
        require_client_cert=mutual,
        envoy_ca_file=pki["ca"],
        envoy_cert_file=pki["envoy_crt"] if mutual else None,
        envoy_key_file=pki["envoy_key"] if mutual else None,
    )
    xds = server_factory(s)
    # A real Envoy whose bootstrap speaks plaintext to the TLS port gets nothing.
    plaintext = with_tls(
        s,
        enabled=False,
        require_client_cert=False,
        ca_file=None,
        envoy_ca_file=None,
        envoy_cert_file=None,
        envoy_key_file=None,
    )
    assert envoy_gets_endpoints(plaintext, tmp_path / "plain-envoy", timeout=3) == {}
    # Nor does a plaintext gRPC client: the connection fails before any request is read.
    err = _plaintext_stream_refused(xds.port)
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert xds.status()["nodes"] == []
    # The trusted Envoy still gets its endpoints on the same server.
    assert len(envoy_gets_endpoints(s, tmp_path / "trusted", timeout=10) or {}) == 3
    assert [n["node_id"] for n in xds.status()["nodes"]] == ["balanceiq-envoy-0"]
