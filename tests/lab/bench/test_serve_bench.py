"""The pure parts of `balanceiq bench serve`: statistics, argument checks, request bodies.

The bench itself (Ray, Serve, Envoy, Prometheus) is run by hand; see BENCHMARKS.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from balanceiq.policy.features import N_FEATURES
from balanceiq_lab.bench.serve import (
    API_PATHS,
    COMPARE_METRICS,
    DIRECT_INGRESS_ENV,
    batch_sizes,
    bench_argv,
    bench_settings,
    compare_ratios,
    decision_stats,
    dig,
    direct_ingress_targets,
    last_json_object,
    main,
    policy_rows,
    ratio,
    score_by_window,
    score_request,
    send_schedule,
    split_calls,
    summary,
    synthetic_observation,
    validate_args,
)
from balanceiq_lab.errors import BenchError
from balanceiq_lab.results import percentile


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear_interpolation(q: float) -> None:
    values = [5.0, 1.0, 9.5, 3.25, 7.0, 2.0, 100.0]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases() -> None:
    assert percentile([], 50) is None  # JSON has no NaN
    assert percentile([4.0], 99) == 4.0
    assert percentile([1, 2], 50) == 1.5
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


def test_summary_rounds_and_counts() -> None:
    s = summary([1.0, 2.0, 3.0, 4.0, 1000.0], digits=1)
    assert s == {"p50": 3.0, "p99": pytest.approx(960.2), "mean": 202.0, "max": 1000.0, "n": 5}
    assert summary([]) == {"p50": None, "p99": None, "mean": None, "max": None, "n": 0}


def test_validate_args_accepts_the_documented_defaults() -> None:
    validate_args(endpoints=64, duration_s=30, rate_rps=200, calls=500)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"endpoints": 0}, "--endpoints"),
        ({"endpoints": 1001}, "--endpoints"),
        ({"duration_s": 0}, "--duration"),
        ({"duration_s": math.inf}, "--duration"),
        ({"rate_rps": 0}, "--rate"),
        ({"rate_rps": math.nan}, "--rate"),
        ({"calls": 0}, "--calls"),
    ],
)
def test_validate_args_names_the_bad_flag(kwargs: dict[str, float], flag: str) -> None:
    args = {"endpoints": 64, "duration_s": 30.0, "rate_rps": 200.0, "calls": 500, **kwargs}
    with pytest.raises(BenchError, match=flag):
        validate_args(**args)  # type: ignore[arg-type]


def test_validate_args_checks_the_optional_second_rate() -> None:
    validate_args(endpoints=64, duration_s=30, rate_rps=200, calls=500, also_rate_rps=100)
    with pytest.raises(BenchError, match="--also-rate"):
        validate_args(endpoints=64, duration_s=30, rate_rps=200, calls=500, also_rate_rps=0)


def test_validate_args_reports_every_problem_at_once() -> None:
    with pytest.raises(BenchError) as exc:
        validate_args(endpoints=0, duration_s=0, rate_rps=0, calls=0)
    assert all(flag in str(exc.value) for flag in ("--endpoints", "--duration", "--rate", "--calls"))


def test_send_schedule_is_a_fixed_open_loop_rate() -> None:
    sched = send_schedule(200, 30)
    assert len(sched) == 6000
    assert sched[0] == 0.0 and sched[-1] < 30
    assert np.allclose(np.diff(sched), 1 / 200)
    assert len(send_schedule(0.5, 1)) == 1  # never an empty run


def test_split_calls_shares_evenly_without_empty_workers() -> None:
    assert split_calls(500, 8) == [63, 63, 63, 63, 62, 62, 62, 62]
    assert sum(split_calls(500, 8)) == 500
    assert split_calls(3, 8) == [1, 1, 1]


def test_policy_rows_and_score_request_describe_the_same_endpoints() -> None:
    from balanceiq.serve.api import ScoreRequest

    obs, hint = synthetic_observation(64)
    rows = policy_rows(obs, hint)
    assert rows.shape == (64, N_FEATURES) and rows.dtype == np.float32
    assert np.all(np.isfinite(rows))
    body = score_request(obs, hint)
    req = ScoreRequest.model_validate(body)  # the API accepts it as sent
    assert [e.address for e in req.endpoints] == obs.addresses
    assert len(set(obs.addresses)) == 64
    # Deterministic, so two runs score the same observation.
    again, _ = synthetic_observation(64)
    assert again.endpoints == obs.endpoints


def test_decision_stats_headline_counts_full_decisions_only() -> None:
    def rec(ts: float, mode: str, step: float, pushed: bool = True, source: str = "prometheus") -> dict[str, object]:
        return {
            "timestamp": ts,
            "mode": mode,
            "step_ms": step,
            "pushed": pushed,
            "push_ms": 2.0 if pushed else None,
            "ack_ms": 3.0 if pushed else None,
            "source": source,
            "error": None,
        }

    decisions = [
        rec(5, "policy", 999.0),  # before `since`: ignored
        rec(10, "hold", 1.0, pushed=False, source="none"),
        rec(11, "policy", 40.0),
        rec(12, "baseline", 60.0, pushed=False),
        rec(13, "policy", 50.0),
        rec(14, "standby", 0.5, pushed=False, source="none"),
    ]
    s = decision_stats(decisions, since=10, window=(12.5, 20))
    assert s["decisions"] == 3
    assert s["p50"] == 50.0 and s["max"] == 60.0
    assert s["by_mode"] == {"hold": 1, "policy": 2, "baseline": 1, "standby": 1}
    assert s["by_source"] == {"prometheus": 3}
    assert s["pushed"]["n"] == 2 and s["unchanged"]["n"] == 1
    assert s["during_api_load"]["n"] == 1 and s["outside_api_load"]["n"] == 2


def test_bench_settings_use_distinct_free_ports_and_a_fast_loop(tmp_path: Path) -> None:
    s = bench_settings(tmp_path / "state")
    ports = [ep.port for ep in s.clusters[0].endpoints] + [
        s.xds.port,
        s.envoy.listen_port,
        s.api.port,
        s.telemetry.als_grpc_port,
        s.telemetry.als_metrics_port,
        int(s.envoy.admin_url.rsplit(":", 1)[1]),
        int(s.prometheus.url.rsplit(":", 1)[1]),
    ]
    assert len(set(ports)) == len(ports)
    assert s.control.interval_s == 1.0
    assert s.api.decision_log_size >= 1000  # /api/decisions?limit=1000 sees the whole run
    assert s.state_dir == tmp_path / "state"
    assert "/api/decisions" in API_PATHS and "/api/status" in API_PATHS


def test_batch_sizes_from_one_bucket_per_size_are_exact() -> None:
    inf = float("inf")
    before = {1.0: 10, 2.0: 10, 3.0: 10, inf: 10}  # 10 batches of 1 before the phase
    after = {1.0: 12, 2.0: 15, 3.0: 19, inf: 19}  # then 2 x 1, 3 x 2, 4 x 3
    counts, mean, exact = batch_sizes(before, after)
    assert counts == {"1": 2, "2": 3, "3": 4}
    assert mean == pytest.approx((2 * 1 + 3 * 2 + 4 * 3) / 9, abs=0.01)
    assert exact


def test_batch_sizes_from_coarse_buckets_are_an_estimate() -> None:
    inf = float("inf")
    counts, mean, exact = batch_sizes(None, {1.0: 4, 2.0: 4, 4.0: 8, 8.0: 8, inf: 9})
    assert counts == {"1": 4, "3-4": 4, "9+": 1}
    assert mean == pytest.approx((4 * 1 + 4 * 3.5 + 1 * 9) / 9, abs=0.01)
    assert not exact
    assert batch_sizes({1.0: 3}, {1.0: 3}) == ({}, None, True)  # nothing happened


def _groups(app: str, *ports: int, protocol: str = "HTTP") -> list[dict[str, object]]:
    return [
        {
            "protocol": protocol,
            "app_name": app,
            "route_prefix": "/",
            "targets": [{"ip": "10.0.0.1", "port": p, "instance_id": "", "name": f"t{p}"} for p in ports],
        }
    ]


def test_direct_ingress_targets_are_the_apps_replica_ports() -> None:
    groups = _groups("balanceiq-bench", 30000, 30001) + _groups("balanceiq-bench", 40000, protocol="gRPC")
    groups += _groups("other-app", 30002)
    assert direct_ingress_targets(groups, "balanceiq-bench", proxy_port=8000) == [30000, 30001]
    # Serve names the enum member's value in JSON, but an enum repr must not fool it either.
    assert direct_ingress_targets(_groups("a", 30000, protocol="RequestProtocol.HTTP"), "a", 8000) == [30000]


def test_direct_ingress_targets_leave_out_the_proxy() -> None:
    # Direct ingress off, or no running replica yet: Serve lists the proxy (app "" or the app, on the proxy port).
    assert direct_ingress_targets(_groups("", 8000), "balanceiq-bench", proxy_port=8000) == []
    assert direct_ingress_targets(_groups("balanceiq-bench", 8000), "balanceiq-bench", proxy_port=8000) == []
    assert direct_ingress_targets([], "balanceiq-bench", proxy_port=8000) == []


def test_direct_ingress_env_enables_it_without_the_30_s_drain() -> None:
    assert DIRECT_INGRESS_ENV["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"  # Ray compares with == "1"
    assert float(DIRECT_INGRESS_ENV["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) == 0


def test_dig_and_ratio() -> None:
    d = {"api": {"rps": 90.0, "calibration": {"saturation": {"rps": 120.0}}}}
    assert dig(d, "api.rps") == 90.0
    assert dig(d, "api.calibration.saturation.rps") == 120.0
    assert dig(d, "api.p99_ms") is None and dig(d, "api.rps.x") is None and dig({}, "api") is None
    assert ratio(180.0, 90.0) == 2.0
    assert ratio(1.0, 3.0) == 0.333
    assert ratio(0, 0) is None and ratio(5, 0) is None  # no ratio against zero errors
    assert ratio(None, 1.0) is None and ratio(1.0, None) is None and ratio(True, 1.0) is None


def test_compare_ratios_puts_both_modes_side_by_side() -> None:
    proxy = {
        "api": {"rps": 100.0, "errors": 2500, "p99_ms": 10000.0},
        "inference_ms": {"http": {"p99": 40.0}, "handle": {"p99": 20.0}},
    }
    direct = {
        "api": {"rps": 200.0, "errors": 0, "p99_ms": 50.0},
        "inference_ms": {"http": {"p99": 20.0}, "handle": {"p99": 20.0}},
    }
    r = compare_ratios(proxy, direct)
    assert list(r)[:5] == ["api.rps", "api.errors", "api.p99_ms", "inference_ms.http.p99", "inference_ms.handle.p99"]
    assert r["api.rps"] == {"proxy": 100.0, "direct_ingress": 200.0, "ratio": 2.0}
    assert r["api.errors"] == {"proxy": 2500, "direct_ingress": 0, "ratio": 0.0}
    assert r["api.p99_ms"]["ratio"] == 0.005
    assert r["inference_ms.handle.p99"]["ratio"] == 1.0
    assert "api_also.rps" not in r  # neither run had --also-rate
    assert set(r) <= set(COMPARE_METRICS)
    # A failed run still compares: its side is None.
    failed = compare_ratios(proxy, {"error": "exit status 2"})
    assert failed["api.rps"] == {"proxy": 100.0, "direct_ingress": None, "ratio": None}


def test_bench_argv_runs_one_mode_with_the_same_settings() -> None:
    kw = {"endpoints": 64, "duration_s": 30.0, "rate_rps": 200.0, "calls": 500}
    base = bench_argv(**kw, also_rate_rps=None, direct_ingress=False)  # type: ignore[arg-type]
    assert base == ["--json", "--endpoints", "64", "--duration", "30", "--rate", "200", "--calls", "500"]
    di = bench_argv(**kw, also_rate_rps=100.0, direct_ingress=True)  # type: ignore[arg-type]
    assert di == [*base, "--also-rate", "100", "--direct-ingress"]


def test_main_refuses_bad_arguments_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rate", "0"]) == 2
    assert main(["--compare", "--direct-ingress"]) == 2
    assert capsys.readouterr().out == ""  # stdout is for the JSON object only


def test_last_json_object_skips_what_libraries_print_after_it() -> None:
    out = 'starting\n{"bench": "serve", "api": {"rps": 1}}\n(raylet) Task failed: {not json}\n[1, 2]\n'
    assert last_json_object(out) == {"bench": "serve", "api": {"rps": 1}}
    assert last_json_object("") == {} and last_json_object("no json here\n") == {}


def test_bench_argv_names_the_ingress_mode() -> None:
    kw = {"endpoints": 8, "duration_s": 5.0, "rate_rps": 50.0, "calls": 10, "also_rate_rps": None}
    assert bench_argv(**kw, mode="replica_server")[-2:] == ["--ingress", "replica_server"]  # type: ignore[arg-type]
    assert bench_argv(**kw, mode="direct_ingress")[-1] == "--direct-ingress"  # type: ignore[arg-type]
    assert "--ingress" not in bench_argv(**kw)  # type: ignore[arg-type]


def test_score_by_window_counts_full_decisions_whose_step_overlaps_each_phase() -> None:
    decisions = [
        {"timestamp": 99.5, "mode": "policy", "score_ms": 1.0},  # started before, still running at 100
        {"timestamp": 101.0, "mode": "policy", "score_ms": 30.0},
        {"timestamp": 101.5, "mode": "hold", "score_ms": 99.0},  # not a full decision
        {"timestamp": 104.0, "mode": "baseline", "score_ms": 2.0},
        {"timestamp": 108.0, "mode": "policy", "score_ms": 5.0},  # after both windows
    ]
    got = score_by_window(decisions, {"http": (100.0, 102.0), "concurrent": (103.5, 104.5)}, interval_s=1.0)
    assert got["http"]["n"] == 2 and got["http"]["max"] == 30.0
    assert got["concurrent"]["n"] == 1 and got["concurrent"]["max"] == 2.0
