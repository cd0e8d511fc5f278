"""Parsing Prometheus answers; bad ones become flags or PrometheusError, never crashes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balanceiq.config import default_settings
from balanceiq.exceptions import PrometheusError
from balanceiq.telemetry.observation import INVALID, MISSING, NO_LATENCY_SOURCE, NO_TRAFFIC, STALE
from balanceiq.telemetry.prometheus import PrometheusSource, parse_vector, render


def vec(label: str, **values: object) -> list[dict[str, object]]:
    return [
        {"metric": {label: k.replace("_", ".").replace(".P", ":")}, "value": [1.0, str(v)]} for k, v in values.items()
    ]


def test_render_substitutes_placeholders() -> None:
    assert render('rate(x{c="$cluster"}[$window]) > $$1', "my_service", "10s") == 'rate(x{c="my_service"}[10s]) > $1'


def test_parse_vector_reads_values_and_flags_bad_samples() -> None:
    result = [
        {"metric": {"addr": "127.0.0.1:1"}, "value": [1, "2.5"]},
        {"metric": {"addr": "127.0.0.1:2"}, "value": [1, "NaN"]},
        {"metric": {"other": "x"}, "value": [1, "1"]},
        {"metric": {"addr": "127.0.0.1:3"}, "value": [1, "junk"]},
    ]
    values, problems = parse_vector(result, "addr")
    assert values["127.0.0.1:1"] == 2.5 and math.isnan(values["127.0.0.1:2"]) and math.isnan(values["127.0.0.1:3"])
    assert len(problems) == 2


@pytest.mark.parametrize("garbage", [{"resultType": "matrix"}, "oops", [1, 2], [{"metric": {"a": "b"}, "value": 3}]])
def test_parse_vector_rejects_garbage(garbage: object) -> None:
    with pytest.raises(PrometheusError):
        parse_vector(garbage, "a")


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=10,
    )
)
def test_parse_vector_never_raises_anything_else(data: object) -> None:
    try:
        parse_vector(data, "a")
    except PrometheusError:
        pass


class FakeSource(PrometheusSource):
    """The real assembly code over canned query results (the HTTP part is tested live)."""

    def __init__(self, results: dict[str, dict[str, float]]) -> None:
        super().__init__("http://127.0.0.1:9", default_settings().telemetry)
        self.results = results

    def query_all(self, cluster: str) -> dict[str, tuple[dict[str, float], list[str]]]:
        return {s: (self.results.get(s, {}), []) for s in self.config.queries}


A, B, C = "127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003"


def test_observation_from_signals() -> None:
    import time

    now = time.time()
    src = FakeSource(
        {
            "rps": {A: 100.0, B: 0.0},
            "errors": {A: 20.0, B: 0.0},
            "success": {A: 80.0, B: 0.0},
            "inflight": {A: 3.0, B: 0.0},
            "healthy": {A: 1.0, B: 0.0},
            "last_sample": {A: now - 1, B: now - 60},
            "p50_ms": {A: 12.0, B: float("nan")},
            "p95_ms": {A: 40.0, B: float("nan")},
            "saturation": {A: float("inf")},
        }
    )
    try:
        o = src.observe("my_service", [A, B, C], {A: 0.4}, {A: 5})
    finally:
        src.close()
    a, b, c = o.endpoints
    assert o.source == "prometheus"
    assert (a.rps, a.error_rate, a.p95_ms, a.inflight, a.healthy, a.weight, a.cost_per_million) == (
        100,
        0.2,
        40,
        3,
        True,
        5,
        0.4,
    )
    assert a.flags == {INVALID}  # saturation was +Inf
    assert math.isnan(a.saturation)
    assert NO_TRAFFIC in b.flags and STALE in b.flags and b.healthy is False and math.isnan(b.p95_ms)
    assert b.rps == 0.0
    assert MISSING in c.flags and math.isnan(c.rps)


def test_no_latency_source_is_flagged() -> None:
    src = FakeSource({"rps": {A: 5.0}, "errors": {A: 0.0}, "success": {A: 5.0}})
    try:
        o = src.observe("my_service", [A], {})
    finally:
        src.close()
    assert NO_LATENCY_SOURCE in o.endpoints[0].flags and o.endpoints[0].error_rate == 0.0


def test_dead_endpoint_reads_all_errors_not_idle() -> None:
    # Connect failures count in rq_error but never in rq_total.
    src = FakeSource({"rps": {A: 0.0}, "errors": {A: 7.0}, "success": {A: 0.0}})
    try:
        e = src.observe("my_service", [A], {}).endpoints[0]
    finally:
        src.close()
    assert e.error_rate == 1.0 and NO_TRAFFIC not in e.flags and e.rps == 0.0


def test_prometheus_without_the_cluster_is_garbage() -> None:
    src = FakeSource({"rps": {"10.0.0.1:80": 1.0}})
    try:
        with pytest.raises(PrometheusError, match="no rps series"):
            src.observe("my_service", [A], {})
    finally:
        src.close()


def test_unreachable_prometheus_is_a_prometheus_error() -> None:
    settings = default_settings()
    src = PrometheusSource("http://127.0.0.1:9", settings.telemetry)  # port 9: discard, nothing listens
    try:
        with pytest.raises(PrometheusError, match="combined query: ConnectionError"):
            src.observe("my_service", [A], {})
    finally:
        src.close()


def test_combined_query_tags_every_signal() -> None:
    src = PrometheusSource("http://127.0.0.1:9", default_settings().telemetry)
    try:
        q = src.combined_query("my_service")
    finally:
        src.close()
    assert q.count(" or ") == len(src.config.queries) - 1
    for signal, sq in src.config.queries.items():
        assert f'"balanceiq_signal", "{signal}"' in q
        assert f'"{sq.endpoint_label}", "(.+)"' in q
    assert "$cluster" not in q and 'envoy_cluster_name="my_service"' in q
