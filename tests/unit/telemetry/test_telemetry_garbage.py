"""Garbage over real HTTP: Prometheus JSON and Envoy stats bodies from a loopback server.

Whatever the body (random JSON, Prometheus-shaped JSON with wrong types inside, raw bytes,
JSON nested too deeply, random exposition text), a source gives a valid Observation or a
TelemetryError subclass, nothing else; :class:`Telemetry` never raises, and counts each
failed read.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balanceiq.config import SIGNALS, default_settings
from balanceiq.exceptions import EnvoyAdminError, PrometheusError, TelemetryError
from balanceiq.telemetry.envoy_admin import EnvoyAdminSource
from balanceiq.telemetry.observation import Observation
from balanceiq.telemetry.observe import Telemetry
from balanceiq.telemetry.prometheus import PrometheusSource

ADDRESSES = [ep.address for ep in default_settings().clusters[0].endpoints]
COSTS = {a: 0.4 for a in ADDRESSES}
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))


class Garbage:
    """A loopback HTTP server answering every GET/POST with the body a test sets."""

    def __init__(self) -> None:
        self.prometheus = b"{}"
        self.envoy = b""
        self.status = 200
        garbage = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = garbage.envoy if self.path.startswith("/stats") else garbage.prometheus
                ctype = "text/plain; charset=UTF-8" if self.path.startswith("/stats") else "application/json"
                self.send_response(garbage.status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def garbage() -> Iterator[Garbage]:
    g = Garbage()
    try:
        yield g
    finally:
        g.close()


@pytest.fixture(scope="module")
def prometheus(garbage: Garbage) -> Iterator[PrometheusSource]:
    src = PrometheusSource(garbage.url, default_settings().telemetry)
    try:
        yield src
    finally:
        src.close()


def assert_valid(obs: Observation) -> None:
    assert isinstance(obs, Observation)
    assert [e.address for e in obs.endpoints] == ADDRESSES
    for e in obs.endpoints:
        for name in ("p50_ms", "p95_ms", "saturation", "inflight", "rps", "weight", "cost_per_million", "age_s"):
            x = getattr(e, name)
            assert isinstance(x, float) and (math.isnan(x) or (math.isfinite(x) and x >= 0)), (name, x)
        assert math.isnan(e.error_rate) or 0.0 <= e.error_rate <= 1.0
        assert e.healthy in (True, False, None)


# -- strategies ---------------------------------------------------------------------------------

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=10,
)
number_text = st.sampled_from(["1", "0", "-1", "NaN", "+Inf", "-Inf", "1e999", "2.5", "", "x", "1" * 5000]) | st.text(
    max_size=5
)


@st.composite
def sample(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(junk)
    metric = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2))
    metric["balanceiq_signal"] = draw(st.sampled_from(SIGNALS) | junk)
    metric["balanceiq_endpoint"] = draw(st.sampled_from(ADDRESSES) | junk)
    value = draw(st.tuples(st.floats() | st.integers(), number_text).map(list) | junk)
    return {"metric": draw(st.just(metric) | junk), "value": value}


prometheus_shaped = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["success", "error"]) | junk,
        "data": st.fixed_dictionaries(
            {
                "resultType": st.sampled_from(["vector", "matrix"]) | junk,
                "result": st.lists(sample(), max_size=12) | junk,
            }
        )
        | junk,
    }
)
prometheus_body = st.one_of(
    prometheus_shaped.map(lambda v: json.dumps(v).encode()),
    junk.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 50_000).map(lambda n: b'{"status":"success","data":{"result":' + b"[" * n + b"]" * n + b"}}"),
)


# -- Prometheus -----------------------------------------------------------------------------------


@FUZZ
@given(body=prometheus_body)
def test_prometheus_garbage_is_a_prometheus_error_or_a_valid_observation(
    garbage: Garbage, prometheus: PrometheusSource, body: bytes
) -> None:
    garbage.status, garbage.prometheus = 200, body
    try:
        obs = prometheus.observe("my_service", ADDRESSES, COSTS)
    except PrometheusError as exc:
        assert str(exc)
        return
    assert_valid(obs)
    assert obs.source == "prometheus"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"status":"success","data":{"result":[{"metric":5}]}}', "malformed sample"),  # was AttributeError
        # was TypeError; a signal label that is not a string is no signal at all
        (b'{"status":"success","data":{"result":[{"metric":{"balanceiq_signal":["rps"]}}]}}', "no rps series"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # was RecursionError
    ],
    ids=["metric-not-a-mapping", "unhashable-signal", "deep-json"],
)
def test_garbage_that_used_to_escape(garbage: Garbage, prometheus: PrometheusSource, body: bytes, needle: str) -> None:
    garbage.status, garbage.prometheus = 200, body
    with pytest.raises(PrometheusError, match=needle):
        prometheus.observe("my_service", ADDRESSES, COSTS)


# -- Envoy admin ----------------------------------------------------------------------------------

envoy_line = st.one_of(
    st.builds(
        lambda stat, addr, value: (
            f'envoy_cluster_endpoint_{stat}{{envoy_cluster_name="my_service",envoy_endpoint_address="{addr}"}} {value}'
        ),
        st.sampled_from(["rq_total", "rq_success", "rq_error", "rq_active", "healthy", "rq_timeout"])
        | st.text(max_size=6),
        st.sampled_from(ADDRESSES) | st.text(max_size=8),
        number_text,
    ),
    st.sampled_from(
        [
            "# TYPE envoy_cluster_endpoint_rq_total counter",
            "# TYPE envoy_cluster_endpoint_rq_active gauge",
            "# HELP x y",
            "#",
            "",
        ]
    ),
    st.text(max_size=40),
)
envoy_body = st.one_of(
    st.lists(envoy_line, max_size=30).map(lambda ls: "\n".join(ls).encode()),
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(first=envoy_body, second=envoy_body)
def test_envoy_stats_garbage_is_an_envoy_admin_error_or_a_valid_observation(
    garbage: Garbage, first: bytes, second: bytes
) -> None:
    src = EnvoyAdminSource(garbage.url, timeout_s=2.0)
    garbage.envoy = first
    try:
        src.scrape()
    except EnvoyAdminError:
        pass
    garbage.envoy = second
    try:
        obs = src.observe("my_service", ADDRESSES, COSTS, min_window_s=0.0)
    except EnvoyAdminError as exc:
        assert str(exc)
        return
    assert_valid(obs)


# -- the whole observer -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(prom=prometheus_body, envoy=envoy_body, status=st.sampled_from([200, 200, 200, 400, 500, 302]))
def test_telemetry_never_raises_and_counts_each_failed_read(
    garbage: Garbage, prom: bytes, envoy: bytes, status: int
) -> None:
    s = default_settings()
    s = s.model_copy(
        update={
            "prometheus": s.prometheus.model_copy(update={"url": garbage.url}),
            "envoy": s.envoy.model_copy(update={"admin_url": garbage.url}),
            "telemetry": s.telemetry.model_copy(update={"als_enabled": False, "timeout_s": 2.0}),
        }
    )
    telemetry = Telemetry(s, retry_s=0.0)
    garbage.status, garbage.prometheus, garbage.envoy = status, prom, envoy
    try:
        obs = telemetry.observe()
    finally:
        telemetry.close()
    assert_valid(obs)
    # A successful admin read may carry its own notes ("envoy-admin: ..."), so a failed
    # admin read is told by the result: nothing usable at all (source "none").
    expected = {
        "prometheus": sum(e.startswith("prometheus:") for e in obs.errors),
        "envoy-admin": int(obs.source == "none"),
    }
    assert dict(telemetry.failures) == {k: v for k, v in expected.items() if v}
    assert not any(k.endswith("-bug") for k in telemetry.failures)
    if obs.source == "none":
        assert telemetry.failures["prometheus"] == telemetry.failures["envoy-admin"] == 1


def test_every_parser_error_is_a_telemetry_error() -> None:
    assert issubclass(PrometheusError, TelemetryError) and issubclass(EnvoyAdminError, TelemetryError)
