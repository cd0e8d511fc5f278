"""`balanceiq bench live`: the harness measures what it claims.

Fast tests cover the accounting (prices over time, phases, targets, the table). The slow
ones run the real harness (fresh testbed per arm: backends, ALS, Envoy, Prometheus, the
open-loop generator in its own process) for a few seconds per arm and check it against
what was injected: a fixed delay shows up in the percentiles, every backend error is
counted (against the backends' own counters), prices are booked when they change, every
arm gets the same schedule, and queueing behind a stalled backend is in the latency.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from balanceiq.cli import main as cli_main
from balanceiq.config import Settings, load_config
from balanceiq_lab.bench.live import (
    ARMS,
    CSWRR,
    PriceBook,
    arm_base,
    arm_metrics,
    bench_settings,
    cost_aware_weights,
    evaluate_targets,
    markdown_table,
    parse_arms,
    remap_scenario,
    run_live_bench,
)
from balanceiq_lab.errors import BenchError
from balanceiq_lab.openloop import NOT_SENT, OpenLoopResult
from balanceiq_lab.testbed.profiles import profile_for
from balanceiq_lab.testbed.scenario import LiveScenario, load_live_scenario

REPO = Path(__file__).resolve().parents[2]


def _settings(endpoints: list[dict[str, Any]], overrides: dict[str, dict[str, Any]]) -> Settings:
    return Settings.model_validate(
        {
            "clusters": [{"name": "my_service", "endpoints": endpoints}],
            "testbed": {"overrides": overrides},
            "state_dir": "/tmp/unused-bench-state",
        }
    )


def _fake_result(
    intended: list[float], latency: list[float], status: list[int], backend: list[int], backends: list[str]
) -> OpenLoopResult:
    n = len(intended)
    return OpenLoopResult(
        intended_s=np.array(intended, dtype=float),
        sent_s=np.array(intended, dtype=float),
        latency_ms=np.array(latency, dtype=float),
        status=np.array(status),
        backend=np.array(backend),
        backends=backends,
        error=np.full(n, -1),
        error_kinds=[],
        start_wall=0.0,
        timeout_s=11.0,
        max_inflight=10,
    )


# -- accounting (fast) ---------------------------------------------------------------------------


def test_price_book_charges_the_price_at_answer_time() -> None:
    book = PriceBook({"a": 0.4, "b": 0.1})
    book.change(10.0, {"a": 1.6})
    assert book.price_at("a", np.array([0.0, 9.99, 10.0, 50.0])).tolist() == [0.4, 0.4, 1.6, 1.6]
    assert book.price_at("b", np.array([100.0])).tolist() == [0.1]
    # Intended at 9.9 s but answered at 10.1 s: the new price.
    res = _fake_result([9.9, 9.9, 9.9, 9.9], [50.0, 200.0, 5.0, 5.0], [200, 200, 503, 503], [0, 0, 1, -1], ["a", "b"])
    assert res.completed_s.tolist() == pytest.approx([9.95, 10.1, 9.905, 9.905])
    assert book.request_prices(res).tolist() == pytest.approx([0.4, 1.6, 0.1, 0.0])  # no backend: free


def test_arm_metrics_phases_bins_and_slo() -> None:
    scen = LiveScenario.model_validate(
        {
            "name": "s",
            "duration_s": 10,
            "events": [{"at_s": 5, "name": "b slows", "endpoint": "127.0.0.1:1", "set": {"extra_latency_ms": 100}}],
        }
    )
    # 2 s warm-up, scale 0.5 (10 s file -> 5 s replay): the event at 2 + 2.5 s.
    intended = [0.5, 1.0, 2.0, 3.0, 4.0, 4.6, 5.0, 6.0]
    latency = [10, 10, 10, 300, 10, 10, 10, 10]
    status = [200, 200, 200, 200, 503, 200, 0, NOT_SENT]
    backend = [0, 0, 0, 1, 1, 0, -1, -1]
    res = _fake_result(intended, latency, status, backend, ["127.0.0.1:1", "127.0.0.1:2"])
    m = arm_metrics(
        res,
        warmup_s=2.0,
        scale=0.5,
        scenario=scen,
        prices=PriceBook({"127.0.0.1:1": 1.0, "127.0.0.1:2": 3.0}),
        slo_ms=150.0,
        bin_s=1.0,
        clouds={"127.0.0.1:1": "aws", "127.0.0.1:2": "gcp"},
        names={"127.0.0.1:1": "10.0.0.1:80", "127.0.0.1:2": "10.0.0.2:80"},
    )
    assert m["requests"] == 6 and m["warmup_requests"] == 2
    assert m["errors"] == 3 and m["error_rate"] == pytest.approx(0.5)  # 503, transport error, not sent
    assert m["slo_attainment"] == pytest.approx(2 / 6, abs=1e-4)  # 2.0 and 4.6 (3.0 was 300 ms)
    assert m["cost_per_million"] == pytest.approx((1 + 3 + 3 + 1) / 6, abs=1e-4)
    assert [p["phase"] for p in m["phases"]] == ["start", "b slows"]
    assert [p["requests"] for p in m["phases"]] == [3, 3] and m["phases"][1]["from_s"] == 2.5
    assert m["share_by_cloud"] == {
        "(no backend)": pytest.approx(2 / 6, abs=1e-3),
        "aws": pytest.approx(2 / 6, abs=1e-3),
        "gcp": pytest.approx(2 / 6, abs=1e-3),
    }
    assert m["share_by_endpoint"] == {
        "10.0.0.1:80": pytest.approx(2 / 6, abs=1e-3),
        "10.0.0.2:80": pytest.approx(2 / 6, abs=1e-3),
    }
    assert m["bins"]["t_s"][0] < 0 and sum(m["bins"]["requests"]) == 8


def _arm(p99: float, err: float, cost: float, slo: float) -> dict[str, Any]:
    return {"p99_ms": p99, "error_rate": err, "cost_per_million": cost, "slo_attainment": slo}


def test_targets_are_judged_against_the_issue() -> None:
    arms = {
        "round_robin": _arm(1000, 0.004, 0.6, 0.80),
        "least_request": _arm(250, 0.002, 0.6, 0.95),
        "cswrr": _arm(200, 0.0, 0.5, 0.97),
        "static_cost_aware": _arm(5000, 0.003, 0.5, 0.8),
        "balanceiq_rr": _arm(300, 0.001, 0.3, 0.96),
        "balanceiq_lr": _arm(190, 0.0, 0.36, 0.975),
    }
    t = evaluate_targets(arms)
    assert t["best_arm"] == "balanceiq_lr"
    b = t["best"]
    assert b["p99_vs_least_request"]["ratio"] == pytest.approx(0.76) and b["p99_vs_least_request"]["met"]
    assert b["p99_vs_round_robin"]["met"] and b["p99_vs_cswrr"]["met"]
    assert b["cost_vs_best_cost_blind"]["reference"] == "cswrr"  # highest SLO attainment of the Envoy arms
    assert b["cost_vs_best_cost_blind"]["ratio"] == pytest.approx(0.72) and b["cost_vs_best_cost_blind"]["met"]
    assert b["errors_vs_envoy_arms"]["met"]
    assert b["cost_vs_best_cost_blind"]["vs_each"]["least_request"] == {"ratio": 0.6, "slo_at_least_as_good": True}
    rr = t["by_arm"]["balanceiq_rr"]
    assert not rr["p99_vs_least_request"]["met"] and not rr["cost_vs_best_cost_blind"]["met"]  # SLO 0.96 < 0.97
    assert rr["cost_vs_best_cost_blind"]["cost_met"] and not rr["errors_vs_envoy_arms"]["met"]  # 0.001 > cswrr's 0
    assert evaluate_targets({"round_robin": arms["round_robin"]})["best_arm"] is None
    only = evaluate_targets({"balanceiq_rr": arms["balanceiq_rr"]})["best"]
    assert only["p99_vs_round_robin"]["met"] is None and only["errors_vs_envoy_arms"]["met"] is None


def test_arms_settings_and_scenario_remapping() -> None:
    assert [a.name for a in parse_arms(None)] == [n for n in ARMS if n != "balanceiq_lr_knee50"]
    (knee,) = parse_arms("balanceiq_lr_knee50")  # a comparison runs only when named
    assert knee.lb_policy == "LEAST_REQUEST" and knee.family == "balanceiq"
    assert [a.name for a in parse_arms("cswrr, round_robin")] == ["cswrr", "round_robin"]
    assert ARMS["cswrr"].lb_policy == CSWRR and ARMS["balanceiq_lr"].lb_policy == "LEAST_REQUEST"
    for bad in ("nope", "round_robin,round_robin", ","):
        with pytest.raises(BenchError):
            parse_arms(bad)
    base = load_config(REPO / "balanceiq.yaml")
    s, mapping = bench_settings(base, Path("/tmp/x"))
    k, _ = bench_settings(arm_base(knee, base), Path("/tmp/x"))
    assert k.control.util_target == 0.5 and s.control.util_target == base.control.util_target == 0.7
    assert k.control.model_dump(exclude={"util_target"}) == s.control.model_dump(exclude={"util_target"})
    old = list(base.clusters[0].endpoints)
    new = list(s.clusters[0].endpoints)
    assert [(e.cloud, e.region, e.cost_per_million_requests, e.capacity_rps) for e in new] == [
        (e.cloud, e.region, e.cost_per_million_requests, e.capacity_rps) for e in old
    ]
    assert {e.address for e in new}.isdisjoint({e.address for e in old})
    # The degraded azure backend keeps its testbed profile at its new address.
    assert profile_for(s.testbed, new[5]) == profile_for(base.testbed, old[5]) == (120.0, 4, 0.02)
    assert s.control.interval_s == 1.0 and s.telemetry.window_s == 2.0 and s.prometheus.scrape_interval_s == 0.5
    scen = LiveScenario.model_validate(
        {
            "name": "s",
            "duration_s": 10,
            "events": [
                {"at_s": 1, "name": "one", "endpoint": old[5].address, "set": {"healthy": False}},
                {"at_s": 2, "name": "cloud", "cloud": "aws", "cost_multiplier": 2},
            ],
        }
    )
    moved = remap_scenario(scen, mapping)
    assert moved.events[0].endpoint == new[5].address and moved.events[1].cloud == "aws"
    moved.check_targets(new)
    # Static cost-aware: capacity / price, so the cheap spot backend weighs most.
    w = cost_aware_weights(base.clusters[0])
    assert max(w, key=w.__getitem__) == old[1].address and all(v >= 1 for v in w.values())


def test_markdown_table_names_every_arm() -> None:
    arms = {
        n: {**_arm(100, 0.001, 0.5, 0.99), "label": ARMS[n].label, "p50_ms": 20.0, "p999_ms": 150.0, "requests": 9000}
        for n in ("round_robin", "balanceiq_lr")
    }
    table = markdown_table({"setup": {"slo_ms": 150.0}, "arms": arms, "targets": {"best_arm": "balanceiq_lr"}})
    lines = table.splitlines()
    assert len(lines) == 4 and "**BalanceIQ over LEAST_REQUEST**" in lines[3] and "0.10 %" in lines[2]


def test_cli_refuses_bad_arguments_without_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "live", "--arms", "round_robin,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli_main(["bench", "live", "--rate", "0", "--no-calibrate"]) == 2
    assert "--rate" in capsys.readouterr().err


# -- the real harness (slow) ------------------------------------------------------------------------


def _backend_counts(stack: Any) -> dict[str, dict[str, float]]:
    """Each backend's own count of answers by status code (its /metrics)."""
    out: dict[str, dict[str, float]] = {}
    for addr, url in stack.backend_urls.items():
        text = httpx.get(url + "/metrics", timeout=5, trust_env=False).text
        counts: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "backend_requests":
                for smp in fam.samples:
                    if smp.name == "backend_requests_total":
                        counts[smp.labels["code"]] = smp.value
        out[addr] = counts
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_injected_delay_errors_and_prices_are_measured(tmp_path: Path) -> None:
    eps = [
        {"address": "127.0.0.1:18001", "cloud": "aws", "region": "us-east-1", "cost_per_million_requests": 0.40},
        {"address": "127.0.0.1:18002", "cloud": "gcp", "region": "us-central1", "cost_per_million_requests": 0.30},
        {"address": "127.0.0.1:18003", "cloud": "azure", "region": "eastus", "cost_per_million_requests": 0.50},
    ]
    base = _settings(
        eps,
        {
            "127.0.0.1:18001": {"base_latency_ms": 100, "concurrency": 64},  # the injected fixed delay
            "127.0.0.1:18002": {"base_latency_ms": 0, "concurrency": 64, "error_rate": 0.1},  # the injected errors
            "127.0.0.1:18003": {"base_latency_ms": 0, "concurrency": 64},
        },
    )
    scen = LiveScenario.model_validate(
        {
            "name": "short",
            "duration_s": 4,
            "events": [
                {"at_s": 1, "name": "aws dearer", "cloud": "aws", "cost_multiplier": 2},
                {"at_s": 3, "name": "azure slows", "endpoint": "127.0.0.1:18003", "set": {"extra_latency_ms": 200}},
            ],
        }
    )
    kept: dict[str, Any] = {}

    def inspect(stack: Any, res: OpenLoopResult) -> dict[str, Any]:
        counts = _backend_counts(stack)
        kept[stack.settings.envoy.admin_url] = (res, counts, dict(stack.mapping))
        return {"backend_counts": counts}

    plot = tmp_path / "live.png"
    t0 = time.monotonic()
    result = run_live_bench(
        base,
        scen,
        arms=parse_arms("round_robin,least_request"),
        rate_rps=100,
        duration_s=4,
        warmup_s=1,
        arrivals="constant",
        plot_path=plot,
        calibrate=False,
        inspect=inspect,
    )
    assert time.monotonic() - t0 < 90
    assert plot.exists() and plot.stat().st_size > 10_000
    assert result["leftover_processes"] == [] and set(result["arms"]) == {"round_robin", "least_request"}
    runs = list(kept.values())
    assert len(runs) == 2
    # The same arrival schedule in every arm.
    assert np.array_equal(runs[0][0].intended_s, runs[1][0].intended_s)

    for name, (res, counts, mapping) in zip(result["arms"], runs):
        arm = result["arms"][name]
        addr = {old: new for old, new in mapping.items()}
        aws, gcp, azure = addr["127.0.0.1:18001"], addr["127.0.0.1:18002"], addr["127.0.0.1:18003"]
        assert arm["requests"] == 400 and arm["warmup_requests"] == 100
        # Every error the backends produced is counted, and only those: no other failure here.
        names = np.array(res.backend_names(), dtype=object)
        harness_503 = int((res.status == 503).sum())
        assert harness_503 == sum(int(c.get("503", 0)) for c in counts.values()) == int(counts[gcp].get("503", 0))
        assert harness_503 > 0 and set(names[res.status == 503]) == {gcp}
        assert int((~res.ok).sum()) == harness_503
        measured = res.intended_s >= 1.0
        assert arm["errors"] == int((~res.ok & measured).sum())
        assert arm["error_rate"] == pytest.approx(arm["errors"] / 400, abs=1e-5)
        # Every request a backend answered is one the harness saw from that backend.
        for a in (aws, gcp, azure):
            assert int((names == a).sum()) == int(sum(counts[a].values()))
        # The fixed 100 ms delay is in every aws request's latency, measured from intended time.
        aws_lat = res.latency_ms[names == aws]
        assert aws_lat.size > 0 and aws_lat.min() >= 100.0 and np.median(aws_lat) < 100.0 + 25.0, aws_lat
        # After "azure slows" (applied at ~3 s of the replay), azure answers in >= 200 ms.
        ev = {e["name"]: e["applied_s"] for e in arm["events"]}
        assert abs(ev["aws dearer"] - 1.0) < 0.2 and abs(ev["azure slows"] - 3.0) < 0.2
        late = (names == azure) & (res.intended_s >= 1.0 + ev["azure slows"] + 0.05)
        assert late.sum() > 0 and res.latency_ms[late].min() >= 200.0
        # Cost: each request at its backend's price when it was answered (aws doubles at ~1 s).
        initial = {aws: 0.40, gcp: 0.30, azure: 0.50}
        t_change = 1.0 + ev["aws dearer"]  # offsets from the generator's start
        price = np.array(
            [
                0.0 if n is None else (0.80 if n == aws and c >= t_change else initial[n])
                for n, c in zip(names.tolist(), res.completed_s.tolist())
            ]
        )
        assert arm["cost_per_million"] == pytest.approx(float(price[measured].sum()) / 400, abs=2e-3)
        assert arm["price_changes"][aws][0][1] == pytest.approx(0.80)

    rr = result["arms"]["round_robin"]
    # Round robin: a third of the requests go to aws, so before azure slows the 100 ms
    # delay is the tail (p90/p99) and the fast backends the median.
    before = [p for p in rr["phases"] if p["phase"] in ("start", "aws dearer")]
    for p in before:
        assert p["p50_ms"] < 30.0
        assert 100.0 <= p["p99_ms"] < 100.0 + 40.0, p
    last = next(p for p in rr["phases"] if p["phase"] == "azure slows")
    assert 200.0 <= last["p99_ms"] < 200.0 + 60.0
    res = runs[0][0]
    m = res.intended_s >= 1.0
    assert rr["slo_attainment"] == pytest.approx(float((res.ok & (res.latency_ms <= 150.0))[m].mean()), abs=1e-4)
    # Round robin splits evenly: every backend about a third.
    assert all(abs(v - 1 / 3) < 0.05 for c, v in rr["share_by_cloud"].items() if c != "(no backend)")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_queueing_behind_a_stalled_backend_is_in_the_latency(tmp_path: Path) -> None:
    """Coordinated omission, through Envoy: one backend serving one request at a time
    (50 ms each) is offered 40 req/s. It falls further behind with every request; the
    harness must report each request's wait, not its 50 ms of service."""
    base = _settings(
        [{"address": "127.0.0.1:18001", "cloud": "aws", "region": "us-east-1", "cost_per_million_requests": 1.0}],
        {"127.0.0.1:18001": {"base_latency_ms": 50, "concurrency": 1}},
    )
    scen = LiveScenario.model_validate({"name": "stall", "duration_s": 2, "events": []})
    kept: list[OpenLoopResult] = []
    result = run_live_bench(
        base,
        scen,
        arms=parse_arms("round_robin"),
        rate_rps=40,
        duration_s=2,
        warmup_s=0,
        arrivals="constant",
        plot_path=None,
        calibrate=False,
        inspect=lambda stack, res: kept.append(res),
    )
    res = kept[0]
    assert len(res) == 80 and res.ok.all()
    service = float(np.median(np.diff(np.sort(res.completed_s))))
    assert 0.050 <= service < 0.060  # 50 ms + up to 1 ms jitter + Envoy and HTTP
    done, expected = 0.0, []
    for t in res.intended_s:
        done = max(t, done) + service
        expected.append((done - t) * 1000)
    exp = np.array(expected)
    err = np.abs(res.latency_ms - exp)
    assert exp[-1] > 1500 and np.median(err) < 25.0 and err.max() < 100.0, (res.latency_ms[-3:], exp[-3:])
    arm = result["arms"]["round_robin"]
    assert arm["p99_ms"] > 1500 and arm["p50_ms"] > 500  # a closed loop would have said ~50 ms
    assert arm["slo_attainment"] < 0.2
    assert arm["generator"]["schedule_lag_ms"]["p99"] < 20.0  # sent on time: the wait is the backend's queue
    assert arm["generator"]["not_sent"] == 0


@pytest.mark.slow
def test_cswrr_bootstrap_is_accepted_by_envoy() -> None:
    from balanceiq_lab.testbed.envoy import lab_bootstrap, validate_bootstrap

    b = lab_bootstrap(load_config(REPO / "balanceiq.yaml"), lb_policy=CSWRR)
    cluster = b["static_resources"]["clusters"][1]
    assert "lb_policy" not in cluster
    ext = cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert ext["name"] == "envoy.load_balancing_policies.client_side_weighted_round_robin"
    validate_bootstrap(b)
    assert load_live_scenario().name == "degrade_and_dearer"
