"""API security: constant-time token checks, counted refusals, loopback defaults, no secrets in logs.

The plane is real (controller, guardrails, an in-process gRPC xDS server, the shipped
policy); telemetry replays a fixed observation. The secrets test serves the API with
uvicorn on loopback and the xDS server over TLS with a key made here.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from livestack import serve_asgi
from planes import (  # beside this file: pytest puts its folder on sys.path
    ReplayObserver,
    make_plane,
    plane_on_free_ports,
)
from prometheus_client.parser import text_string_to_metric_families

from balanceiq.config import default_settings, is_loopback, load_config, settings_from_dict
from balanceiq.exceptions import ConfigError, XdsError
from balanceiq.serve.api import create_api
from balanceiq.serve.plane import ControlPlane
from balanceiq.serve.policy import PolicyModel
from balanceiq.testbed.envoy import render_bootstrap
from balanceiq.xds.server import XdsServer
from balanceiq_lab.bench.settings import settings_on_free_ports

TOKEN = "sekrit-token-7f3a9c2e5b8d1f40"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def model() -> PolicyModel:
    return PolicyModel()


@pytest.fixture
def plane(tmp_path: Path, model: PolicyModel) -> Iterator[ControlPlane]:
    with plane_on_free_ports(tmp_path, model, 3, token=TOKEN, observer=ReplayObserver) as p:
        p.controller.step()
        yield p


@pytest.fixture
def api(plane: ControlPlane) -> Iterator[TestClient]:
    with TestClient(create_api(plane)) as client:
        yield client


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


# -- token checks ------------------------------------------------------------------------------


def test_token_is_checked_in_constant_time_and_failures_are_counted(
    api: TestClient, plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    body = {"address": plane.controller.addresses[0], "action": "clear"}
    wrong = TOKEN[:-1] + "X"  # same length, one character off: only timing could tell them apart
    assert api.put("/api/weights", json=body).status_code == 401
    assert api.put("/api/weights", json=body, headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    r = api.put("/api/weights", json=body, headers={"Authorization": f"Bearer {wrong}"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in r.text and wrong not in r.text
    assert calls == [(wrong.encode(), TOKEN.encode())]  # the only comparison, and it is compare_digest
    assert api.put("/api/weights", json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert calls[-1] == (TOKEN.encode(), TOKEN.encode())
    for path, method in (("/api/policy", "put"), ("/api/train", "post")):
        assert getattr(api, method)(path, json={}, headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    metrics = api.get("/metrics").text
    fails = samples(metrics, "balanceiq_api_auth_failures_total")
    assert fails == {(("reason", "missing"),): 2.0, (("reason", "invalid"),): 3.0}
    responses = samples(metrics, "balanceiq_api_responses_total")
    assert responses[(("code", "401"), ("method", "PUT"), ("route", "/api/weights"))] == 3
    assert responses[(("code", "200"), ("method", "PUT"), ("route", "/api/weights"))] == 1


def test_every_mutating_operation_refuses_without_a_token(api: TestClient, plane: ControlPlane) -> None:
    """Schemathesis over every authenticated route, with no token and with a wrong one: 401, nothing changed."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    before = (api.get("/api/policy").json(), plane.controller.overrides.to_json())
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_api(plane))
    seen: set[str] = set()
    for result in schema.get_all_operations():
        op = result.ok()
        if op.method.upper() not in ("PUT", "POST") or op.path == "/api/policy/score":
            continue
        seen.add(f"{op.method.upper()} {op.path}")

        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case: Any) -> None:
            for headers in ({}, {"Authorization": "Bearer nope-nope-nope-nope"}):
                response = case.call(headers=headers)
                assert response.status_code == 401, (case.path, case.body, response.status_code)

        check()
    assert seen == {"PUT /api/weights", "PUT /api/policy", "POST /api/train"}
    assert (api.get("/api/policy").json(), plane.controller.overrides.to_json()) == before


def test_errors_of_every_kind_are_counted_on_metrics(api: TestClient, plane: ControlPlane) -> None:
    assert api.get("/no/such/path").status_code == 404
    assert api.get("/api/decisions", params={"limit": 0}).status_code == 422
    assert api.post("/api/policy/score", json={"endpoints": []}).status_code == 422
    # And a bad xDS request against the plane's real gRPC server shows up on the same page.
    xds = plane.controller.xds.server  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"127.0.0.1:{xds.port}") as ch:
        call = ch.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([b"\xff\xff\xff"]), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    plane._probe_cache.pop("xds_status", None)  # the 1 s cache, not the point here
    text = api.get("/metrics").text
    responses = samples(text, "balanceiq_api_responses_total")
    assert responses[(("code", "404"), ("method", "GET"), ("route", "unmatched"))] == 1
    assert responses[(("code", "422"), ("method", "GET"), ("route", "/api/decisions"))] == 1
    assert responses[(("code", "422"), ("method", "POST"), ("route", "/api/policy/score"))] == 1
    assert samples(text, "balanceiq_xds_requests_refused_total") == {(("reason", "malformed"),): 1.0}
    assert not any(k[0] == ("code", "500") for k in responses)


# -- loopback by default -------------------------------------------------------------------------


def test_every_listener_defaults_to_loopback() -> None:
    s = default_settings()
    assert s.xds.host == "127.0.0.1" and s.api.host == "127.0.0.1" and s.envoy.listen_host == "127.0.0.1"
    assert httpx.URL(s.envoy.admin_url).host == "127.0.0.1" and httpx.URL(s.prometheus.url).host == "127.0.0.1"
    boot = render_bootstrap(s)
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # The shipped sample config and bootstraps say the same.
    sample = load_config(REPO / "balanceiq.yaml")
    assert all(is_loopback(h) for h in (sample.xds.host, sample.api.host, httpx.URL(sample.envoy.admin_url).host))
    for path in sorted((REPO / "envoy").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert is_loopback(doc["admin"]["address"]["socket_address"]["address"]), path
        xds_cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "xds_cluster")
        hosts = [
            e["endpoint"]["address"]["socket_address"]["address"]
            for le in xds_cluster["load_assignment"]["endpoints"]
            for e in le["lb_endpoints"]
        ]
        assert hosts and all(is_loopback(h) for h in hosts), path


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "xds.example.com"])
def test_remote_xds_needs_mutual_tls_or_an_explicit_opt_in(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"xds": {"host": host}})
    ((field, message),) = info.value.problems
    assert field == "xds.host" and "mutual TLS" in message and "allow_insecure_remote" in message
    tls_only = {"enabled": True, "cert_file": "c.pem", "key_file": "k.pem"}
    with pytest.raises(ConfigError):
        settings_from_dict({"xds": {"host": host, "tls": tls_only}})
    mtls = settings_from_dict(
        {"xds": {"host": host, "tls": {**tls_only, "require_client_cert": True, "ca_file": "ca.pem"}}}
    )
    assert mtls.xds.host == host
    assert settings_from_dict({"xds": {"host": host, "allow_insecure_remote": True}}).xds.allow_insecure_remote
    # A host given in code is held to the same rule.
    with pytest.raises(XdsError, match="without mutual TLS"):
        XdsServer(default_settings(), host=host, port=0)


def test_loopback_spellings_are_allowed() -> None:
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        assert settings_from_dict({"xds": {"host": host}}).xds.host == host


def test_remote_envoy_admin_needs_an_explicit_opt_in() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"envoy": {"admin_url": "http://0.0.0.0:9901"}})
    ((field, message),) = info.value.problems
    assert field == "envoy.admin_url" and "no authentication" in message
    s = settings_from_dict({"envoy": {"admin_url": "http://10.0.0.7:9901", "allow_remote_admin": True}})
    assert render_bootstrap(s)["admin"]["address"]["socket_address"]["address"] == "10.0.0.7"


def test_remote_api_is_allowed_but_warned_about(
    tmp_path: Path, model: PolicyModel, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings_on_free_ports(3).model_copy(update={"state_dir": tmp_path / "state"})
    s = s.model_copy(update={"api": s.api.model_copy(update={"host": "0.0.0.0"})})
    xds = XdsServer(s, state_dir=tmp_path / "state")  # loopback: only the API's host changed
    caplog.set_level(logging.WARNING, logger="balanceiq")
    try:
        plane = make_plane(s, model, xds, token=TOKEN, observer=ReplayObserver)
        plane.stop()
    finally:
        xds.stop()
    (record,) = [r for r in caplog.records if "beyond loopback" in r.getMessage()]
    assert "0.0.0.0" in record.getMessage() and TOKEN not in record.getMessage()


# -- secrets never logged ------------------------------------------------------------------------


def _tls_material(d: Path) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xds.balanceiq.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    (d / "xds.key").write_text(pem)
    (d / "xds.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "xds.crt", d / "xds.key", pem


def test_token_and_key_never_reach_logs_messages_or_responses(
    tmp_path: Path, model: PolicyModel, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    # Everything our code and the servers it runs log, down to DEBUG. (Not the root
    # logger: Ray's handlers, set up while the module's policy loaded, write to a capture
    # stream that is closed by now.)
    for name in (
        "balanceiq",
        "uvicorn",
        "uvicorn.access",
        "uvicorn.error",
        "fastapi",
        "starlette",
        "grpc",
        "httpx",
        "asyncio",
    ):
        caplog.set_level(logging.DEBUG, logger=name)
    crt, key, pem = _tls_material(tmp_path)
    key_body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    chunks = [key_body[i : i + 24] for i in range(0, len(key_body) - 24, 12)]
    wrong = TOKEN[:-4] + "ABCD"
    said: list[str] = []  # every message an operator could see besides the logs

    s = settings_on_free_ports(3).model_copy(update={"state_dir": tmp_path / "state"})
    tls = s.xds.tls.model_copy(update={"enabled": True, "cert_file": crt, "key_file": key})
    s = s.model_copy(
        update={"xds": s.xds.model_copy(update={"tls": tls}), "api": s.api.model_copy(update={"token": TOKEN})}
    )
    said.append(repr(s))
    xds = XdsServer(s, state_dir=tmp_path / "state")
    xds.start()
    plane = make_plane(s, model, xds, token=TOKEN, observer=ReplayObserver)
    try:
        plane.controller.step()
        # Every uvicorn line, the access log too, must reach caplog to be searched for secrets.
        served = serve_asgi(create_api(plane), log_config=None, log_level="debug", access_log=True)
        with served as url, httpx.Client(base_url=url, trust_env=False, timeout=10) as c:
            body = {"address": plane.controller.addresses[0], "action": "drain"}
            for headers in (
                {},
                {"Authorization": f"Bearer {wrong}"},
                {"Authorization": f"Bearer {TOKEN[:8]}"},
                {"Authorization": f"Basic {TOKEN}"},
            ):
                r = c.put("/api/weights", json=body, headers=headers)
                assert r.status_code == 401
                said.append(r.text + str(r.headers))
            for path in ("/api/status", "/api/policy", "/api/weights", "/metrics", "/api/metrics/all", "/openapi.json"):
                said.append(c.get(path).text)
            assert c.put("/api/weights", json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        # A plaintext client against the TLS port: refused, and nothing secret said about it.
        with grpc.insecure_channel(f"127.0.0.1:{xds.port}") as ch, pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(ch).result(timeout=1)
    finally:
        plane.stop()
        xds.stop()

    # Config mistakes around the same secrets.
    bad_files = {
        "short-token.yaml": {"api": {"token": TOKEN[:10]}},
        "token-type.yaml": {"api": {"token": ["a", TOKEN]}},
        "pasted-key.yaml": {"xds": {"tls": {"enabled": True, "cert_file": str(crt), "key_file": pem}}},
        "pasted-envoy-key.yaml": {"xds": {"tls": {"envoy_cert_file": str(crt), "envoy_key_file": pem}}},
    }
    for name, data in bad_files.items():
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError) as info:
            load_config(path)
        said.append(str(info.value))
        logging.getLogger("balanceiq.test").warning("config error: %s", info.value)
    # A key pasted where its path belongs, in settings built in code (no config validation).
    pasted = s.model_copy(
        update={"xds": s.xds.model_copy(update={"tls": tls.model_copy(update={"key_file": Path(pem)})})}
    )
    server = XdsServer(pasted, port=0, state_dir=None)
    with pytest.raises(XdsError) as err:
        server.start()
    assert err.value.__cause__ is None and "looks like PEM content" in str(err.value)
    said.append(str(err.value))

    out, errout = capfd.readouterr()
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    everything = "\n".join([logged, out, errout, *said])
    # The checks above did run, and the access log saw the refused requests.
    assert "config error" in logged and "401" in "".join(said)
    assert re.search(r"PUT /api/weights HTTP/1.1\"? 401", logged), logged[-2000:]
    for secret in (TOKEN, wrong, TOKEN[:10], *chunks):
        assert secret not in everything, f"{secret[:6]}... leaked"
    assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", everything)


# -- the threat model is written down -----------------------------------------------------------


def test_security_md_exists_and_readme_links_it() -> None:
    text = (REPO / "SECURITY.md").read_text()
    for topic in ("Threat model", "xDS", "mutual TLS", "token", "Prometheus", "loopback", "Reporting"):
        assert topic in text, topic
    assert "SECURITY.md" in (REPO / "README.md").read_text()
