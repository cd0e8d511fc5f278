"""Envoy admin fallback: parsing, rates between scrapes, flags, garbage, and the HTTP edge."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import FrozenInstanceError, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from balanceiq.exceptions import EnvoyAdminError, TelemetryError
from balanceiq.telemetry.envoy_admin import EnvoyAdminSource
from balanceiq.telemetry.observation import (
    FEATURES,
    INVALID,
    MISSING,
    NO_LATENCY_SOURCE,
    NO_TRAFFIC,
    STALE,
    WARMING,
    quantile_from_buckets,
)
from balanceiq.telemetry.scrape import (
    EndpointStats,
    Scrape,
    derive,
    parse_als_snapshot,
    parse_clusters_json,
    parse_exposition,
)

CLUSTER = "my_service"
A, B, C = "127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003"
ADDRS = [A, B, C]
COSTS = {A: 0.4, B: 0.35, C: 0.5}


def labels(addr: str, cluster: str = CLUSTER) -> str:
    return f'{{envoy_cluster_name="{cluster}",envoy_endpoint_address="{addr}"}}'


def envoy_text(per_endpoint: dict[str, dict[str, Any]], cluster: str = CLUSTER) -> str:
    """An exposition laid out as Envoy 1.40 writes it (checked against a live dump).

    Per endpoint: rq_total, rq_success, rq_error, rq_timeout, cx_connect_fail, rq_active,
    healthy. Counters are all ``# TYPE ... counter``, but only rq_total/cx_total end in
    ``_total``; Envoy writes no HELP lines; unrelated families surround ours.
    """
    counters = ["cx_connect_fail", "cx_total", "rq_error", "rq_success", "rq_timeout", "rq_total"]
    gauges = ["cx_active", "healthy", "rq_active", "rq_pending_active"]
    out = [
        "# TYPE envoy_cluster_assignment_stale counter",
        f'envoy_cluster_assignment_stale{{envoy_cluster_name="{cluster}"}} 0',
        "# TYPE envoy_cluster_upstream_rq_total counter",
        f'envoy_cluster_upstream_rq_total{{envoy_cluster_name="{cluster}"}} 12345',
        'envoy_cluster_upstream_rq_total{envoy_cluster_name="xds_cluster"} 1',
    ]
    for kind, names in (("counter", counters), ("gauge", gauges)):
        for name in names:
            out.append(f"# TYPE envoy_cluster_endpoint_{name} {kind}")
            for addr, v in per_endpoint.items():
                default = {"healthy": 1}.get(name, 0)
                out.append(f"envoy_cluster_endpoint_{name}{labels(addr, cluster)} {v.get(name, default)}")
    out += [
        "# TYPE envoy_server_live gauge",
        "envoy_server_live{} 1",
        "# TYPE envoy_cluster_upstream_rq_time histogram",
        f'envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="{cluster}",le="0.5"}} 0',
        f'envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="{cluster}",le="+Inf"}} 300',
        f'envoy_cluster_upstream_rq_time_sum{{envoy_cluster_name="{cluster}"}} 4500',
        f'envoy_cluster_upstream_rq_time_count{{envoy_cluster_name="{cluster}"}} 300',
        "",
    ]
    return "\n".join(out)


BOUNDS = [0.01, 0.02, 0.05, 0.1]


def als_snapshot(observations: dict[str, list[float]], cluster: str = CLUSTER) -> dict[str, Any]:
    """The ALS exporter's /snapshot after these request durations (s): cumulative counts, +Inf last."""
    series = [
        {"cluster": cluster, "endpoint": addr, "buckets": [sum(v <= le for v in values) for le in [*BOUNDS, math.inf]]}
        for addr, values in observations.items()
    ]
    return {"format": "balanceiq-als-snapshot/1", "bounds": BOUNDS, "series": series}


def with_snapshot(s: Scrape, snapshot: dict[str, Any]) -> Scrape:
    """``s`` with the exporter's latency, merged as ``EnvoyAdminSource.scrape`` merges it."""
    latency, bad, problems = parse_als_snapshot(snapshot)
    return replace(s, latency=latency, latency_source=True, bad_latency=bad, problems=(*s.problems, *problems))


def counters(total: int, error: int = 0, *, timeout: int = 0, active: int = 0, healthy: int = 1) -> dict[str, Any]:
    return {
        "rq_total": total,
        "rq_error": error,
        "rq_success": total - error,
        "rq_timeout": timeout,
        "rq_active": active,
        "healthy": healthy,
    }


def clusters_json(
    per_endpoint: dict[str, dict[str, Any]], cluster: str = CLUSTER, health: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """``/clusters?format=json`` as Envoy 1.40 writes it (checked against a live dump):
    zero-valued stats have no ``value``; values are strings; gauges carry a type."""
    hosts = []
    for addr, v in per_endpoint.items():
        host, port = addr.rsplit(":", 1)
        stats = []
        for name in ("cx_connect_fail", "cx_total", "rq_error", "rq_success", "rq_timeout", "rq_total"):
            x = v.get(name, 0)
            stats.append({"name": name, **({"value": str(x)} if x else {})})
        for name in ("cx_active", "rq_active", "rq_pending_active"):
            x = v.get(name, 0)
            stats.append({"type": "GAUGE", "name": name, **({"value": str(x)} if x else {})})
        hosts.append(
            {
                "address": {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}},
                "stats": stats,
                "health_status": (health or {}).get(addr, {"eds_health_status": "HEALTHY"}),
                "weight": 1,
            }
        )
    return {
        "cluster_statuses": [{"name": "xds_cluster", "host_statuses": []}, {"name": cluster, "host_statuses": hosts}]
    }


# -- parse_exposition --------------------------------------------------------------------------


def test_parses_a_realistic_envoy_exposition() -> None:
    text = envoy_text({A: counters(100, 16, active=3), B: counters(100), C: counters(7, healthy=0)})
    s = parse_exposition(text, timestamp=5.0)
    assert s.timestamp == 5.0
    assert s.problems == ()
    assert set(s.endpoints) == {(CLUSTER, a) for a in ADDRS}
    a = s.endpoints.get((CLUSTER, A))
    assert a is not None
    assert (a.rq_total, a.rq_success, a.rq_error, a.rq_active, a.healthy) == (100, 84, 16, 3, 1)
    assert a.bad == frozenset()
    assert s.endpoints.get((CLUSTER, C)).healthy == 0  # type: ignore[union-attr]
    assert not s.latency_source and s.latency == {}


def test_counter_names_match_with_or_without_total_suffix_and_type_lines() -> None:
    # The same numbers written three ways: as Envoy does; with no TYPE lines (untyped,
    # names untouched by the parser); and with every counter suffixed _total.
    typed = envoy_text({A: counters(50, 5)})
    untyped = "\n".join(ln for ln in typed.splitlines() if not ln.startswith("#"))
    suffixed = typed.replace("rq_error ", "rq_error_total ").replace("rq_error{", "rq_error_total{")
    for text in (typed, untyped, suffixed):
        e = parse_exposition(text, 0.0).endpoints.get((CLUSTER, A))
        assert e is not None and (e.rq_total, e.rq_error, e.rq_success) == (50, 5, 45), text


def test_scrape_is_immutable() -> None:
    s = parse_exposition(envoy_text({A: counters(1)}), 0.0)
    with pytest.raises(FrozenInstanceError):
        s.timestamp = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.endpoints[(CLUSTER, B)] = EndpointStats()  # type: ignore[index]


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "   \n\n",
        "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
        "<html>\n<head><title>404 Not Found</title></head>\n</html>\n",
        '{"stats": [{"name": "cluster.my_service.upstream_rq_total", "value": 1}]}',
        "\x00\x01\x02\xff\xfe garbage \x89PNG\r\n\x1a\n",
        bytes(range(256)).decode("latin-1"),
        # Envoy without per_endpoint_stats: a valid exposition, nothing per endpoint.
        "# TYPE envoy_cluster_upstream_rq_total counter\n"
        'envoy_cluster_upstream_rq_total{envoy_cluster_name="my_service"} 5\n',
        # Every per-endpoint value unusable.
        f"envoy_cluster_endpoint_rq_total{labels(A)} NaN\nenvoy_cluster_endpoint_rq_error{labels(A)} +Inf\n"
        f"envoy_cluster_endpoint_rq_total{labels(B)} -3\nenvoy_cluster_endpoint_healthy{labels(C)} 7\n",
        # Labels missing.
        "envoy_cluster_endpoint_rq_total 5\n"
        'envoy_cluster_endpoint_rq_total{envoy_cluster_name="my_service"} 5\n'
        f'envoy_cluster_endpoint_rq_total{{envoy_endpoint_address="{A}"}} 5\n',
        # Unparsable lines only.
        f"envoy_cluster_endpoint_rq_total{labels(A)}\nenvoy_cluster_endpoint_rq_total{{{{{{ 1 2 3\n",
    ],
)
def test_garbage_raises_envoy_admin_error(garbage: str) -> None:
    with pytest.raises(EnvoyAdminError) as info:
        parse_exposition(garbage, 0.0)
    assert isinstance(info.value, TelemetryError)
    assert str(info.value)


def test_html_and_empty_pages_are_named_in_the_message() -> None:
    with pytest.raises(EnvoyAdminError, match="HTML"):
        parse_exposition("<html><body>oops</body></html>", 0.0)
    with pytest.raises(EnvoyAdminError, match="empty"):
        parse_exposition("", 0.0)
    with pytest.raises(EnvoyAdminError, match="per_endpoint_stats"):
        parse_exposition("# TYPE envoy_server_live gauge\nenvoy_server_live{} 1\n", 0.0)


def test_bad_samples_are_skipped_recorded_and_mark_the_field() -> None:
    text = envoy_text({A: counters(100, 10), B: counters(100), C: counters(100)})
    for name, addr, value in (("rq_error", B, "NaN"), ("rq_active", C, "-1")):
        line = f"envoy_cluster_endpoint_{name}{labels(addr)}"
        text = text.replace(f"{line} 0", f"{line} {value}")
    text += "envoy_cluster_endpoint_rq_total 17\n"  # no labels at all
    s = parse_exposition(text, 0.0)
    assert len(s.problems) == 3, s.problems
    b, c = s.endpoints.get((CLUSTER, B)), s.endpoints.get((CLUSTER, C))
    assert b is not None and c is not None
    assert b.bad == {"rq_error"} and math.isnan(b.rq_error) and b.rq_total == 100
    assert c.bad == {"rq_active"} and math.isnan(c.rq_active)
    assert s.endpoints.get((CLUSTER, A)).bad == frozenset()  # type: ignore[union-attr]


def test_one_unparsable_line_does_not_cost_the_rest() -> None:
    text = envoy_text({A: counters(100, 10), B: counters(100), C: counters(100)})
    broken = f"envoy_cluster_endpoint_rq_error{labels(B)[:-1]} 0"  # no closing brace
    text = text.replace(f"envoy_cluster_endpoint_rq_error{labels(B)} 0", broken)
    text = text.replace("envoy_server_live{} 1", "envoy_server_live{ this is not a sample")
    s = parse_exposition(text, 0.0)
    assert len(s.problems) == 1 and "unparsable" in s.problems[0]  # the unrelated junk is not read
    assert s.endpoints.get((CLUSTER, A)).rq_error == 10  # type: ignore[union-attr]
    assert s.endpoints.get((CLUSTER, B)).bad == {"rq_error"}  # type: ignore[union-attr]
    assert s.endpoints.get((CLUSTER, C)).rq_total == 100  # type: ignore[union-attr]


def test_duplicate_series_are_not_trusted() -> None:
    text = envoy_text({A: counters(100)}) + f"envoy_cluster_endpoint_rq_total{labels(A)} 5\n"
    s = parse_exposition(text, 0.0)
    assert s.endpoints.get((CLUSTER, A)).bad == {"rq_total"}  # type: ignore[union-attr]
    assert any("duplicate" in p for p in s.problems)


# -- derive -------------------------------------------------------------------------------------


def pair(
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    dt: float = 2.0,
    als_before: dict[str, list[float]] | None = None,
    als_after: dict[str, list[float]] | None = None,
) -> tuple[Scrape, Scrape]:
    def one(c: dict[str, dict[str, Any]], als: dict[str, list[float]] | None, ts: float) -> Scrape:
        s = parse_exposition(envoy_text(c), ts)
        return with_snapshot(s, als_snapshot(als)) if als is not None else s

    return one(before, als_before, 10.0), one(after, als_after, 10.0 + dt)


def test_rates_error_rate_and_quantiles_from_known_deltas() -> None:
    fast = [0.005] * 50 + [0.015] * 40 + [0.04] * 10  # p50 = 10 ms, p95 = 35 ms (bucket edges)
    prev, cur = pair(
        {A: counters(1000, 50), B: counters(500), C: counters(0)},
        {A: counters(1100, 70, active=4), B: counters(600), C: counters(0)},
        dt=2.0,
        als_before={A: [0.001] * 30, B: [0.001] * 30},
        als_after={A: [0.001] * 30 + fast, B: [0.001] * 30 + [0.08] * 100},
    )
    obs = derive(prev, cur, CLUSTER, ADDRS, COSTS, {A: 10, B: 20, C: 30})
    assert obs.source == "envoy-admin"
    assert obs.window_s == pytest.approx(2.0)
    assert obs.addresses == ADDRS
    a, b, c = obs.endpoints
    assert a.rps == pytest.approx(50.0)
    assert a.error_rate == pytest.approx(0.2)
    assert a.p50_ms == pytest.approx(10.0)
    assert a.p95_ms == pytest.approx(35.0)
    assert a.inflight == 4 and a.healthy is True
    assert a.cost_per_million == 0.4 and a.weight == 10
    assert math.isnan(a.saturation)  # Envoy does not know backend capacity
    assert a.flags == frozenset() and a.usable
    assert b.rps == pytest.approx(50.0) and b.error_rate == 0.0
    assert 50 < b.p50_ms <= 100 and 50 < b.p95_ms <= 100
    assert c.rps == 0.0 and c.flags == {NO_TRAFFIC}
    assert math.isnan(c.error_rate) and math.isnan(c.p95_ms)
    _, valid = obs.to_array()
    assert [f for f, ok in zip(FEATURES, valid[0], strict=True) if not ok] == ["saturation"]
    assert not valid[2, :3].any()


def test_first_scrape_is_warming_but_gauges_are_filled() -> None:
    cur = parse_exposition(envoy_text({A: counters(10, active=2), B: counters(5, healthy=0)}), 1.0)
    obs = derive(None, cur, CLUSTER, [A, B], COSTS)
    assert math.isnan(obs.window_s)
    for e in obs.endpoints:
        assert WARMING in e.flags and not e.usable
        assert math.isnan(e.rps) and math.isnan(e.error_rate) and math.isnan(e.p95_ms)
    a, b = obs.endpoints
    assert a.inflight == 2 and a.healthy is True
    assert b.inflight == 0 and b.healthy is False
    assert math.isnan(a.weight)  # weights=None


@pytest.mark.parametrize("dt", [0.0, -1.0])
def test_no_time_between_scrapes_is_warming(dt: float) -> None:
    prev, cur = pair({A: counters(10)}, {A: counters(20)}, dt=dt)
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert WARMING in a.flags and math.isnan(a.rps) and a.inflight == 0


def test_counter_reset_is_warming_for_that_endpoint_only() -> None:
    prev, cur = pair({A: counters(1000, 10), B: counters(1000)}, {A: counters(5), B: counters(1100)})
    a, b = derive(prev, cur, CLUSTER, [A, B], COSTS).endpoints
    assert WARMING in a.flags and math.isnan(a.rps) and math.isnan(a.error_rate)
    assert WARMING not in b.flags and b.rps == pytest.approx(50.0)


def test_endpoint_absent_from_the_scrape_is_missing() -> None:
    prev, cur = pair({A: counters(0)}, {A: counters(10)})
    a, missing = derive(prev, cur, CLUSTER, [A, "10.9.9.9:80"], COSTS).endpoints
    assert MISSING not in a.flags
    assert MISSING in missing.flags and missing.healthy is None
    assert math.isnan(missing.rps) and math.isnan(missing.inflight)
    # Same address under another cluster is not this cluster's endpoint.
    (other,) = derive(prev, cur, "other_cluster", [A], COSTS).endpoints
    assert MISSING in other.flags


def test_no_traffic_gives_zero_rps_and_unknown_errors() -> None:
    prev, cur = pair({A: counters(40, 4)}, {A: counters(40, 4)})
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert a.flags == {NO_TRAFFIC, NO_LATENCY_SOURCE}
    assert a.rps == 0.0 and math.isnan(a.error_rate) and math.isnan(a.p50_ms)


def test_no_als_histogram_flags_no_latency_source() -> None:
    prev, cur = pair({A: counters(0)}, {A: counters(100, 20)})
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert a.flags == {NO_LATENCY_SOURCE}
    assert a.error_rate == pytest.approx(0.2) and math.isnan(a.p50_ms) and math.isnan(a.p95_ms)


def test_connection_failures_count_as_errors_though_rq_total_is_flat() -> None:
    # What Envoy really reports for an endpoint refusing connections: rq_error and
    # cx_connect_fail rise, rq_total does not (no request ever reached a connection).
    before = {A: {"rq_total": 0, "rq_error": 0, "rq_success": 0, "cx_connect_fail": 0}}
    after = {A: {"rq_total": 0, "rq_error": 50, "rq_success": 0, "cx_connect_fail": 50, "healthy": 0}}
    prev, cur = pair(before, after)
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert a.error_rate == 1.0 and a.rps == 0.0
    assert NO_TRAFFIC not in a.flags and a.healthy is False


def test_timeouts_are_not_counted_twice() -> None:
    # Envoy charges a timed-out request as a 504: it is already in rq_error.
    prev, cur = pair({A: counters(0)}, {A: counters(100, 10, timeout=10)})
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert a.error_rate == pytest.approx(0.1)


def test_invalid_samples_flag_the_endpoint() -> None:
    prev, cur = pair({A: counters(0), B: counters(0)}, {A: counters(100, 5), B: counters(100)})
    text = envoy_text({A: counters(100, 5), B: counters(100)}).replace(
        f"envoy_cluster_endpoint_rq_error{labels(B)} 0", f"envoy_cluster_endpoint_rq_error{labels(B)} -Inf"
    )
    cur = parse_exposition(text, cur.timestamp)
    obs = derive(prev, cur, CLUSTER, [A, B], COSTS)
    a, b = obs.endpoints
    assert INVALID not in a.flags and a.error_rate == pytest.approx(0.05)
    assert INVALID in b.flags and not b.usable and math.isnan(b.error_rate)
    assert any("rq_error" in e for e in obs.errors)


def test_healthy_gauge_other_than_0_or_1_is_invalid() -> None:
    prev, cur = pair({A: counters(0)}, {A: counters(10, healthy=3)})
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert INVALID in a.flags and a.healthy is None


def test_latency_histogram_reset_and_first_appearance() -> None:
    # Exporter restarted: counts went down -> no latency this window.
    prev, cur = pair({A: counters(0)}, {A: counters(10)}, als_before={A: [0.01] * 50}, als_after={A: [0.01] * 5})
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert WARMING in a.flags and math.isnan(a.p95_ms)
    # Exporter up before, no series for A yet: A had zero observations, so the delta is all of cur.
    prev, cur = pair(
        {A: counters(0), B: counters(0)},
        {A: counters(10), B: counters(0)},
        als_before={B: [0.01]},
        als_after={A: [0.015] * 10, B: [0.01]},
    )
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert a.flags == frozenset() and 10.0 < a.p50_ms <= 20.0
    # Exporter up but with no series yet: a baseline of zero, so the first window with
    # traffic has latency.
    prev, cur = pair({A: counters(0)}, {A: counters(10)}, als_before={}, als_after={A: [0.015] * 10})
    assert prev.latency_source
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert a.flags == frozenset() and 10.0 < a.p50_ms <= 20.0
    # Exporter absent before: no baseline at all.
    prev, cur = pair({A: counters(0)}, {A: counters(10)}, als_before=None, als_after={A: [0.015] * 10})
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert WARMING in a.flags


def test_errors_carry_the_scrape_problems_capped() -> None:
    text = envoy_text({A: counters(1)}) + "".join(
        f'envoy_cluster_endpoint_rq_total{{envoy_cluster_name="x{i}"}} 1\n' for i in range(30)
    )
    cur = parse_exposition(text, 0.0)
    assert len(cur.problems) == 30
    errors = derive(None, cur, CLUSTER, [A], COSTS).errors
    assert len(errors) == 11 and "20 more" in errors[-1]
    assert all(e.startswith("envoy-admin: ") for e in errors)


def test_age_is_measured_against_now() -> None:
    cur = parse_exposition(envoy_text({A: counters(1)}), 100.0)
    assert derive(None, cur, CLUSTER, [A], COSTS, now=101.5).endpoints[0].age_s == pytest.approx(1.5)
    assert derive(None, cur, CLUSTER, [A], COSTS).endpoints[0].age_s == 0.0


def test_without_rq_success_errors_are_taken_over_requests() -> None:
    prev = Scrape(0.0, {(CLUSTER, A): EndpointStats(rq_total=0, rq_error=0)})
    cur = Scrape(2.0, {(CLUSTER, A): EndpointStats(rq_total=100, rq_error=20)})
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert a.rps == pytest.approx(50.0) and a.error_rate == pytest.approx(0.2)


def test_series_appearing_between_scrapes_is_warming() -> None:
    prev = Scrape(0.0, {(CLUSTER, A): EndpointStats(rq_active=1)})
    cur = Scrape(2.0, {(CLUSTER, A): EndpointStats(rq_total=100, rq_error=0, rq_success=100)})
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert WARMING in a.flags and math.isnan(a.rps)


def test_bad_counter_in_the_previous_scrape_is_invalid() -> None:
    prev = Scrape(0.0, {(CLUSTER, A): EndpointStats(rq_total=0, rq_error=math.inf, rq_success=0)})
    cur = Scrape(2.0, {(CLUSTER, A): EndpointStats(rq_total=100, rq_error=0, rq_success=100)})
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert INVALID in a.flags and math.isnan(a.error_rate)


def test_latency_edge_cases() -> None:
    # A bad bucket for A: A's latency is invalid; B unaffected.
    bad = als_snapshot({A: [0.01] * 5, B: [0.01] * 5})
    bad["series"][0]["buckets"][1] = math.nan  # A's le=0.02
    prev = with_snapshot(parse_exposition(envoy_text({A: counters(0), B: counters(0)}), 0.0), als_snapshot({B: [0.01]}))
    cur = with_snapshot(parse_exposition(envoy_text({A: counters(10), B: counters(10)}), 1.0), bad)
    assert (CLUSTER, A) in cur.bad_latency
    a, b = derive(prev, cur, CLUSTER, [A, B], COSTS).endpoints
    assert INVALID in a.flags and math.isnan(a.p50_ms)
    assert INVALID not in b.flags and b.p50_ms == pytest.approx(
        quantile_from_buckets([(0.01, 4.0), (0.02, 4.0), (0.05, 4.0), (0.1, 4.0), (math.inf, 4.0)], 0.5) * 1000
    )
    # The exporter is up but has no series for C, which had traffic: latency unknown, no flag.
    cur = with_snapshot(parse_exposition(envoy_text({C: counters(10)}), 1.0), als_snapshot({B: [0.01]}))
    prev = with_snapshot(parse_exposition(envoy_text({C: counters(0)}), 0.0), als_snapshot({B: [0.01]}))
    (c,) = derive(prev, cur, CLUSTER, [C], COSTS).endpoints
    assert c.flags == frozenset() and math.isnan(c.p95_ms) and c.error_rate == 0.0


def test_histogram_layout_change_or_duplicate_bucket() -> None:
    prev = Scrape(
        0.0,
        {(CLUSTER, A): EndpointStats(rq_total=0, rq_error=0, rq_success=0)},
        latency={(CLUSTER, A): ((0.01, 1.0), (math.inf, 1.0))},
        latency_source=True,
    )
    cur = Scrape(
        1.0,
        {(CLUSTER, A): EndpointStats(rq_total=5, rq_error=0, rq_success=5)},
        latency={(CLUSTER, A): ((0.02, 3.0), (math.inf, 6.0))},
        latency_source=True,
    )
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert WARMING in a.flags and math.isnan(a.p50_ms)
    dup = als_snapshot({A: [0.01]})
    dup["series"].append(dict(dup["series"][0]))
    s = with_snapshot(parse_exposition(envoy_text({A: counters(1)}), 0.0), dup)
    assert (CLUSTER, A) in s.bad_latency and any("duplicate" in p for p in s.problems)


def test_a_row_warming_on_its_latency_has_no_error_rate_either() -> None:
    # Hypothesis find (issue #15): the exporter came back between two scrapes, so the
    # row is WARMING; its error rate came back as 1.0 from the counters' window.
    prev = Scrape(0.0, {(CLUSTER, A): EndpointStats(rq_total=0, rq_error=0, rq_success=0)}, latency_source=False)
    cur = Scrape(
        1.0,
        {(CLUSTER, A): EndpointStats(rq_total=5, rq_error=5, rq_success=0)},
        latency={(CLUSTER, A): ((0.02, 3.0), (math.inf, 5.0))},
        latency_source=True,
    )
    (a,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert WARMING in a.flags and not a.usable
    assert math.isnan(a.error_rate) and math.isnan(a.p95_ms) and a.rps == 5.0


def test_bytes_are_decoded_and_other_types_refused() -> None:
    raw = envoy_text({A: counters(1)}).encode()
    assert parse_exposition(raw, 0.0).endpoints.get((CLUSTER, A)) is not None  # type: ignore[arg-type]
    with pytest.raises(EnvoyAdminError):
        parse_exposition(None, 0.0)  # type: ignore[arg-type]


# -- properties --------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=10**12)


@settings(max_examples=300, deadline=None)
@given(
    p_total=counts,
    d_total=counts,
    p_err=counts,
    d_err=counts,
    p_ok=counts,
    d_ok=counts,
    dt=st.floats(min_value=1e-3, max_value=1e4, allow_nan=False),
)
def test_property_rates_are_deltas_over_time(
    p_total: int, d_total: int, p_err: int, d_err: int, p_ok: int, d_ok: int, dt: float
) -> None:
    prev = Scrape(10.0, {(CLUSTER, A): EndpointStats(rq_total=p_total, rq_error=p_err, rq_success=p_ok)})
    cur = Scrape(
        10.0 + dt,
        {(CLUSTER, A): EndpointStats(rq_total=p_total + d_total, rq_error=p_err + d_err, rq_success=p_ok + d_ok)},
    )
    real_dt = cur.timestamp - prev.timestamp
    assume(real_dt > 0)
    (e,) = derive(prev, cur, CLUSTER, [A], COSTS).endpoints
    assert e.rps == pytest.approx(d_total / real_dt, rel=1e-9)
    assert math.isnan(e.error_rate) or 0.0 <= e.error_rate <= 1.0
    assert WARMING not in e.flags and INVALID not in e.flags


floats_any = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-10, max_value=10**6).map(float),
    st.just(math.nan),
)
addr_pool = st.sampled_from([A, B, C, "10.0.0.1:80", "[::1]:9000", ""])
stats_st = st.builds(
    EndpointStats,
    rq_total=floats_any,
    rq_success=floats_any,
    rq_error=floats_any,
    rq_timeout=floats_any,
    rq_active=floats_any,
    healthy=floats_any,
    cx_connect_fail=floats_any,
    bad=st.frozensets(st.sampled_from(["rq_total", "rq_error", "healthy", "rq_active"])),
)
buckets_st = st.lists(st.tuples(st.one_of(st.floats(allow_nan=True), st.just(math.inf)), floats_any), max_size=6).map(
    tuple
)
scrape_st = st.builds(
    Scrape,
    timestamp=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 100)),
    endpoints=st.dictionaries(st.tuples(st.sampled_from([CLUSTER, "other"]), addr_pool), stats_st, max_size=5),
    latency=st.dictionaries(st.tuples(st.just(CLUSTER), addr_pool), buckets_st, max_size=4),
    latency_source=st.booleans(),
    bad_latency=st.frozensets(st.tuples(st.just(CLUSTER), addr_pool), max_size=2),
    problems=st.lists(st.text(max_size=20), max_size=15).map(tuple),
)


@st.composite
def scrape_pairs(draw: st.DrawFn) -> tuple[Scrape | None, Scrape]:
    """Mostly related pairs (same endpoints, counters moved either way), sometimes unrelated."""
    cur = draw(scrape_st)
    kind = draw(st.sampled_from(["none", "unrelated", "related", "related"]))
    if kind == "none":
        return None, cur
    if kind == "unrelated":
        return draw(scrape_st), cur
    endpoints = {
        k: draw(st.one_of(stats_st, st.just(v))) for k, v in cur.endpoints.items() if draw(st.integers(0, 9)) > 0
    }
    latency = {k: draw(st.one_of(buckets_st, st.just(v))) for k, v in cur.latency.items()}
    prev = Scrape(
        timestamp=cur.timestamp - draw(st.one_of(st.floats(-1, 100), st.just(2.0))),
        endpoints=endpoints,
        latency=latency,
        latency_source=draw(st.booleans()),
        bad_latency=draw(st.frozensets(st.tuples(st.just(CLUSTER), addr_pool), max_size=1)),
    )
    return prev, cur


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scrapes=scrape_pairs(),
    addresses=st.lists(addr_pool, unique=True, max_size=6),
    weights=st.one_of(st.none(), st.dictionaries(addr_pool, floats_any)),
    now=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_property_derive_never_raises_and_keeps_every_address_in_order(
    scrapes: tuple[Scrape | None, Scrape],
    addresses: list[str],
    weights: dict[str, float] | None,
    now: float | None,
) -> None:
    prev, cur = scrapes
    obs = derive(prev, cur, CLUSTER, addresses, COSTS, weights, now=now)
    assert obs.addresses == addresses
    assert obs.source == "envoy-admin"
    for e in obs.endpoints:
        assert e.flags <= {NO_TRAFFIC, STALE, MISSING, INVALID, WARMING, NO_LATENCY_SOURCE}
        assert math.isnan(e.error_rate) or 0.0 <= e.error_rate <= 1.0
        assert math.isnan(e.rps) or e.rps >= 0.0
        assert math.isnan(e.p50_ms) or e.p50_ms >= 0.0
        assert e.age_s >= 0.0
        if e.flags & {WARMING, MISSING}:
            assert math.isnan(e.error_rate) and math.isnan(e.p95_ms)
    obs.to_array()
    obs.to_json()


value_text = st.one_of(
    st.integers(-5, 10**9).map(str),
    st.sampled_from(["NaN", "+Inf", "-Inf", "nan", "1e400", "0x10", "", "1_000", "1.5", "-0"]),
    st.text(max_size=5),
)
sample_line = st.builds(
    lambda name, c, a, v: f'envoy_cluster_endpoint_{name}{{envoy_cluster_name="{c}",envoy_endpoint_address="{a}"}} {v}',
    st.sampled_from(["rq_total", "rq_error", "rq_success", "rq_active", "healthy", "rq_timeout", "cx_total"]),
    st.sampled_from([CLUSTER, "", 'we"ird']),
    addr_pool,
    value_text,
)
exposition_line = st.one_of(
    sample_line,
    st.sampled_from(
        [
            "# TYPE envoy_cluster_endpoint_rq_total counter",
            "# TYPE envoy_cluster_endpoint_rq_error counter",
            "# TYPE envoy_cluster_endpoint_healthy gauge",
            "# TYPE envoy_cluster_endpoint_rq_total histogram",
            "# TYPE envoy_cluster_endpoint_ bogus",
            "# HELP envoy_cluster_endpoint_rq_total \\x",
            "# TYPE envoy_cluster_endpoint_rq-total counter",
        ]
    ),
    st.text(max_size=40).map(lambda t: "envoy_cluster_endpoint_" + t),
    st.text(max_size=40),
)


@settings(max_examples=500, deadline=None)
@given(text=st.text())
def test_property_parse_arbitrary_text_returns_scrape_or_envoy_admin_error(text: str) -> None:
    try:
        assert isinstance(parse_exposition(text, 0.0), Scrape)
    except EnvoyAdminError:
        pass


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(exposition_line, max_size=25))
def test_property_parse_near_miss_expositions(lines: list[str]) -> None:
    try:
        s = parse_exposition("\n".join(lines), 0.0)
    except EnvoyAdminError:
        return
    assert isinstance(s, Scrape)
    for stats in s.endpoints.values():
        for f in ("rq_total", "rq_error", "rq_success", "rq_active", "healthy"):
            x = getattr(stats, f)
            assert math.isnan(x) or (math.isfinite(x) and x >= 0)
    # And whatever parsed, deriving against it never raises.
    derive(s, s, CLUSTER, [A, B], COSTS)
    derive(None, s, CLUSTER, [A], COSTS)


count_value = st.one_of(st.integers(-2, 10**6), st.floats(), st.booleans(), st.text(max_size=2), st.none())
snapshot_series = st.one_of(
    st.fixed_dictionaries(
        {
            "cluster": st.sampled_from([CLUSTER, "", 1]),
            "endpoint": st.one_of(addr_pool, st.none()),
            "buckets": st.one_of(st.lists(count_value, min_size=4, max_size=6), st.text(max_size=3), st.none()),
        }
    ),
    st.integers(),
    st.text(max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(
    bounds=st.one_of(
        st.just(BOUNDS), st.lists(st.one_of(st.floats(), st.integers(-1, 5), st.text(max_size=2)), max_size=6)
    ),
    series=st.lists(snapshot_series, max_size=6),
)
def test_property_parse_near_miss_snapshots(bounds: list[Any], series: list[Any]) -> None:
    try:
        latency, bad, _ = parse_als_snapshot({"bounds": bounds, "series": series})
    except EnvoyAdminError:
        return
    for buckets in latency.values():
        assert all(c >= 0 and math.isfinite(c) for _, c in buckets) and buckets[-1][0] == math.inf
    assert not set(latency) & bad
    # And whatever parsed, deriving against it never raises.
    s = Scrape(0.0, latency=latency, latency_source=True, bad_latency=bad)
    derive(s, s, CLUSTER, [A, B], COSTS)


# -- EnvoyAdminSource against a tiny local HTTP server --------------------------------------------


class FakeAdmin:
    """A loopback HTTP server whose answers a test sets; records every method it sees."""

    def __init__(self) -> None:
        self.methods: list[str] = []
        self.status = 200
        self.content_type = "text/plain; charset=UTF-8"
        self.delay_s = 0.0
        self.trickle_s = 0.0  # pause between body chunks, after the headers
        self.requests_per_scrape = 10
        self.errors_per_scrape = 2
        self.body: str | None = None  # fixed body; None: counters that grow per scrape
        self.scrapes = 0
        self.als_scrapes = 0
        self.snapshot = False  # serve the ALS exporter's /snapshot too (else 404 there)
        self.snapshot_body: str | None = None  # a fixed /snapshot answer (JSON content type)
        self.clusters_json = False  # answer /clusters?format=json as Envoy does (else the text)
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.methods.append("GET")
                fake.paths.append(self.path)
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                if self.path.startswith("/clusters") and fake.clusters_json:
                    fake.scrapes += 1
                    n, e = fake.scrapes * fake.requests_per_scrape, fake.scrapes * fake.errors_per_scrape
                    body = json.dumps(clusters_json({A: counters(n, e), B: counters(n)})).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path.startswith("/snapshot"):
                    serve = fake.snapshot or fake.snapshot_body is not None
                    body = (fake.snapshot_body or fake.render_snapshot()).encode() if serve else b"404: Not Found"
                    self.send_response(200 if serve else 404)
                    self.send_header("Content-Type", "application/json" if serve else "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                body = fake.render().encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", fake.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not fake.trickle_s:
                    self.wfile.write(body)
                    return
                try:
                    for i in range(0, len(body), 256):
                        self.wfile.write(body[i : i + 256])
                        self.wfile.flush()
                        time.sleep(fake.trickle_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as the test wants

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def render_snapshot(self) -> str:
        # Its own counter: the source fetches this page concurrently with the stats page,
        # so tying it to the stats count would make the order matter.
        self.als_scrapes += 1
        n = self.als_scrapes * 10  # every request 12 ms: in the 0.01..0.02 bucket
        return json.dumps(
            {
                "format": "balanceiq-als-snapshot/1",
                "bounds": [0.01, 0.02, 0.05, 0.1],
                "series": [
                    {"cluster": CLUSTER, "endpoint": A, "buckets": [0, n, n, n, n], "codes": {"2xx": n}, "orca": None}
                ],
            }
        )

    def render(self) -> str:
        if self.body is not None:
            return self.body
        self.scrapes += 1
        n, e = self.scrapes * self.requests_per_scrape, self.scrapes * self.errors_per_scrape
        return envoy_text({A: counters(n, e), B: counters(n)})


@pytest.fixture
def admin() -> Iterator[FakeAdmin]:
    fake = FakeAdmin()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        fake.thread.join(5)


def test_scrape_and_observe_over_http(admin: FakeAdmin) -> None:
    src = EnvoyAdminSource(admin.url + "/")
    s = src.scrape()
    assert s.endpoints.get((CLUSTER, A)) is not None and not s.latency_source
    t0 = time.monotonic()
    obs = src.observe(CLUSTER, [A, B], COSTS, min_window_s=0.2)
    assert time.monotonic() - t0 >= 0.2  # the first observation waits for a real window
    a, _b = obs.endpoints
    assert WARMING not in a.flags and a.rps > 0 and a.error_rate == pytest.approx(0.2)
    assert obs.window_s >= 0.2
    # Next time the kept scrape is the baseline: one GET, window since the last call.
    before = len(admin.methods)
    time.sleep(0.25)
    obs2 = src.observe(CLUSTER, [A, B], COSTS, min_window_s=0.2)
    assert len(admin.methods) == before + 1
    assert obs2.endpoints[0].error_rate == pytest.approx(0.2)
    assert set(admin.methods) == {"GET"}


def test_observe_with_the_als_snapshot(admin: FakeAdmin) -> None:
    admin.snapshot = True
    src = EnvoyAdminSource(admin.url, als_metrics_url=admin.url + "/metrics")
    (a,) = src.observe(CLUSTER, [A], COSTS, min_window_s=0.05).endpoints
    assert NO_LATENCY_SOURCE not in a.flags and 10.0 < a.p50_ms <= 20.0
    assert any(p.startswith("/snapshot") for p in admin.paths)
    assert not any(p.startswith("/metrics") for p in admin.paths)


def test_an_exporter_without_snapshot_is_a_problem_not_a_failure(admin: FakeAdmin) -> None:
    src = EnvoyAdminSource(admin.url, als_metrics_url=admin.url + "/metrics")
    obs = src.observe(CLUSTER, [A], COSTS, min_window_s=0.05)
    assert NO_LATENCY_SOURCE in obs.endpoints[0].flags and obs.endpoints[0].rps > 0
    assert any("als: " in e and "/snapshot: HTTP 404" in e for e in obs.errors), obs.errors
    assert not any(p.startswith("/metrics") for p in admin.paths)  # Prometheus's page, never ours to parse


def test_a_bad_als_snapshot_never_raises_and_is_recorded(admin: FakeAdmin) -> None:
    src = EnvoyAdminSource(admin.url, als_metrics_url=admin.url + "/metrics")
    admin.snapshot_body = "<html>exporter down</html>"
    s = src.scrape()
    assert not s.latency_source and any(p.startswith("als: ") for p in s.problems)
    bad = als_snapshot({A: [0.01], B: [0.01]})
    bad["series"][0]["buckets"][1] = "twenty"
    admin.snapshot_body = json.dumps(bad)
    s = src.scrape()
    assert s.latency_source and (CLUSTER, A) in s.bad_latency and (CLUSTER, A) not in s.latency
    assert (CLUSTER, B) in s.latency and any(p.startswith("als snapshot: ") for p in s.problems)


def test_als_snapshot_parsing() -> None:
    # Requests of 5, 12, 30 and 200 ms at A, three of 15 ms at B.
    snap = {
        "bounds": [0.01, 0.02, 0.05, 0.1],
        "series": [
            {"cluster": CLUSTER, "endpoint": A, "buckets": [1, 2, 3, 3, 4]},
            {"cluster": CLUSTER, "endpoint": B, "buckets": [0, 3, 3, 3, 3]},
        ],
    }
    latency, bad, problems = parse_als_snapshot(snap)
    assert latency == {
        (CLUSTER, A): ((0.01, 1.0), (0.02, 2.0), (0.05, 3.0), (0.1, 3.0), (math.inf, 4.0)),
        (CLUSTER, B): ((0.01, 0.0), (0.02, 3.0), (0.05, 3.0), (0.1, 3.0), (math.inf, 3.0)),
    }
    assert not bad and not problems
    assert parse_als_snapshot(als_snapshot({A: [0.005, 0.012, 0.03, 0.2], B: [0.015] * 3}))[0] == latency


@pytest.mark.parametrize(
    "series",
    [
        {"cluster": CLUSTER, "endpoint": A, "buckets": [1, 2, 3]},  # wrong length
        {"cluster": CLUSTER, "endpoint": A, "buckets": [3, 2, 3, 3, 4]},  # going down
        {"cluster": CLUSTER, "endpoint": A, "buckets": [0, 0, 0, 0, -1]},
        {"cluster": CLUSTER, "endpoint": A, "buckets": [0, 0, 0, 0, 1.5]},
        {"cluster": CLUSTER, "endpoint": A, "buckets": "many"},
    ],
)
def test_a_bad_snapshot_series_is_unknown_not_guessed(series: dict[str, Any]) -> None:
    good = {"cluster": CLUSTER, "endpoint": B, "buckets": [0, 1, 1, 1, 1]}
    latency, bad, problems = parse_als_snapshot({"bounds": [0.01, 0.02, 0.05, 0.1], "series": [series, good]})
    assert (CLUSTER, A) in bad and (CLUSTER, A) not in latency and (CLUSTER, B) in latency and problems


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"series": []},
        {"bounds": [0.1, 0.05], "series": []},
        {"bounds": ["x"], "series": []},
        {"bounds": [float("inf")], "series": []},
    ],
)
def test_not_a_snapshot_raises(data: Any) -> None:
    with pytest.raises(EnvoyAdminError):
        parse_als_snapshot(data)


def test_clusters_json_gives_what_the_text_stats_give() -> None:
    per = {A: counters(120, 7, timeout=2, active=3), B: counters(50), C: counters(0, healthy=0)}
    per[C]["cx_connect_fail"] = 4
    health = {C: {"failed_active_health_check": True, "eds_health_status": "HEALTHY"}}
    from_text = parse_exposition(envoy_text(per), 1.0)
    from_json = parse_clusters_json(clusters_json(per, health=health), 1.0)
    assert dict(from_json.endpoints) == {k: v for k, v in from_text.endpoints.items()}
    assert not from_json.problems


@pytest.mark.parametrize(
    ("health", "healthy"),
    [
        ({"eds_health_status": "HEALTHY"}, 1.0),
        ({"eds_health_status": "UNKNOWN"}, 1.0),
        ({}, 1.0),
        ({"eds_health_status": "DRAINING"}, 0.0),
        ({"eds_health_status": "DEGRADED"}, 0.0),
        ({"failed_outlier_check": True, "eds_health_status": "HEALTHY"}, 0.0),
        ({"pending_dynamic_removal": True}, 0.0),
    ],
)
def test_clusters_json_health_is_envoys_healthy_gauge(health: dict[str, Any], healthy: float) -> None:
    s = parse_clusters_json(clusters_json({A: counters(1)}, health={A: health}), 1.0)
    assert s.endpoints.get((CLUSTER, A)).healthy == healthy  # type: ignore[union-attr]


def test_clusters_json_ipv6_and_bad_values() -> None:
    data = clusters_json({"[::1]:18001": counters(5), A: counters(5)})
    data["cluster_statuses"][1]["host_statuses"][1]["stats"][5]["value"] = "nan"  # A's rq_total
    s = parse_clusters_json(data, 1.0)
    assert s.endpoints.get((CLUSTER, "[::1]:18001")).rq_total == 5  # type: ignore[union-attr]
    a = s.endpoints.get((CLUSTER, A))
    assert a is not None and "rq_total" in a.bad and math.isnan(a.rq_total) and s.problems


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"cluster_statuses": "x"},
        {"cluster_statuses": []},
        {"cluster_statuses": [{"name": CLUSTER, "host_statuses": [{"address": {}}]}]},
    ],
)
def test_clusters_json_without_endpoints_raises(data: Any) -> None:
    with pytest.raises(EnvoyAdminError):
        parse_clusters_json(data)


def test_observe_from_clusters_json_and_the_als_snapshot(admin: FakeAdmin) -> None:
    admin.clusters_json = admin.snapshot = True
    src = EnvoyAdminSource(admin.url, als_metrics_url=admin.url + "/metrics")
    a, b = src.observe(CLUSTER, [A, B], COSTS, min_window_s=0.05).endpoints
    assert a.rps > 0 and a.error_rate == pytest.approx(0.2) and b.error_rate == 0.0
    assert 10.0 < a.p50_ms <= 20.0 and src.clusters_url is not None
    assert not any(p.startswith("/stats") for p in admin.paths)


def test_als_down_is_a_problem_not_a_failure(admin: FakeAdmin) -> None:
    src = EnvoyAdminSource(admin.url, als_metrics_url="http://127.0.0.1:1/metrics", timeout_s=0.5)
    obs = src.observe(CLUSTER, [A], COSTS, min_window_s=0.05)
    assert NO_LATENCY_SOURCE in obs.endpoints[0].flags
    assert any("als" in e and "127.0.0.1:1" in e for e in obs.errors)


@pytest.mark.parametrize(
    ("status", "ctype", "body", "match"),
    [
        (503, "text/plain", "upstream connect error", "HTTP 503"),
        (404, "text/html", "<html>not found</html>", "HTTP 404"),
        (200, "application/octet-stream", "\x00\x01", "content-type"),
        (200, "text/html; charset=utf-8", "<html><body>login</body></html>", "not the Prometheus text format"),
        (200, "text/plain", "<!DOCTYPE html><html></html>", "HTML"),
        (200, "text/plain", "", "empty"),
    ],
)
def test_http_failures_raise_envoy_admin_error_naming_the_url(
    admin: FakeAdmin, status: int, ctype: str, body: str, match: str
) -> None:
    admin.status, admin.content_type, admin.body = status, ctype, body
    with pytest.raises(EnvoyAdminError, match=match) as info:
        EnvoyAdminSource(admin.url).scrape()
    assert admin.url in str(info.value)


def test_slow_admin_times_out(admin: FakeAdmin) -> None:
    admin.delay_s = 1.0
    src = EnvoyAdminSource(admin.url, timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(EnvoyAdminError, match="timed out") as info:
        src.scrape()
    assert time.monotonic() - t0 < 0.9
    assert info.value.__cause__ is not None


def test_trickling_admin_is_cut_off_at_the_deadline(admin: FakeAdmin) -> None:
    # Every read returns within the per-read timeout, but the whole answer would not.
    admin.trickle_s = 0.05
    src = EnvoyAdminSource(admin.url, timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(EnvoyAdminError, match="timed out"):
        src.scrape()
    assert time.monotonic() - t0 < 1.0


def test_unreachable_and_malformed_urls() -> None:
    with pytest.raises(EnvoyAdminError, match="cannot connect"):
        EnvoyAdminSource("http://127.0.0.1:1", timeout_s=0.5).scrape()
    for bad in ("not a url", "ftp://127.0.0.1:9901", "http://"):
        with pytest.raises(EnvoyAdminError):
            EnvoyAdminSource(bad)
    with pytest.raises(EnvoyAdminError):
        EnvoyAdminSource("http://127.0.0.1:9901", timeout_s=0)
