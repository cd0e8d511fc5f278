"""`balanceiq bench live --suite`: random fleets, their truth, the oracle, the summary.

All fast: nothing is started. The live run itself is in
tests/integration/test_bench_live_suite.py (slow).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from balanceiq.cli import main as cli_main
from balanceiq.config import load_config
from balanceiq_lab.bench.live import (
    ARMS,
    DEFAULT_ARM,
    DEFAULT_LB_POLICY,
    NO_PRIVATE_GAUGES,
    _controller_summary,
    bench_settings,
    oracle_for,
    oracle_split,
)
from balanceiq_lab.bench.suite import (
    CLOUDS,
    SUITE_ARMS,
    arm_summary,
    draw_fleet,
    evaluate_suite_targets,
    geomean,
    markdown_summary,
    parse_suite_arms,
    ratio,
    suite_summary,
    truth,
    validate_suite_args,
)
from balanceiq_lab.errors import BenchError
from balanceiq_lab.testbed.profiles import behaviour_for
from balanceiq_lab.testbed.scenario import load_live_scenario, truth_at

REPO = Path(__file__).resolve().parents[3]


# -- fleets --------------------------------------------------------------------------------------


def test_draw_fleet_is_deterministic_per_seed() -> None:
    a, b, c = draw_fleet(42), draw_fleet(42), draw_fleet(43)
    assert a.to_json() == b.to_json() and a.events_json() == b.events_json()
    assert a.scenario == b.scenario and a.settings == b.settings
    assert a.to_json() != c.to_json()


@pytest.mark.parametrize("seed", range(120))
def test_fleets_stay_in_their_ranges(seed: int) -> None:
    f = draw_fleet(seed, duration_s=30.0)
    n = len(f.backends)
    assert 6 <= n <= 12
    clouds = {b.cloud for b in f.backends}
    assert 2 <= len(clouds) <= 4 and clouds <= set(CLOUDS)
    assert all(b.region in CLOUDS[b.cloud] for b in f.backends)
    assert 100.0 <= f.rate_rps <= 200.0
    # The load is the drawn fraction of the true total capacity.
    assert 0.4 <= f.load_fraction <= 0.8
    assert f.rate_rps / f.total_capacity_rps == pytest.approx(f.load_fraction, rel=1e-6)
    prices = [b.price for b in f.backends]
    assert min(prices) > 0 and max(prices) / min(prices) <= 20.0 + 1e-9
    for b in f.backends:
        assert 5.0 <= b.base_latency_ms <= 150.0
        assert 1 <= b.concurrency <= 64
        assert (b.sigma == pytest.approx(0.1) and 0.01 <= b.tail_prob <= 0.05 and 100 <= b.tail_ms <= 500) or (
            0.2 <= b.sigma <= 0.6 and b.tail_prob == 0.0
        )
    # No capacity hints; one cluster; a testbed profile per backend carrying the tail.
    eps = f.settings.clusters[0].endpoints
    assert len(f.settings.clusters) == 1 and len(eps) == n
    assert all(ep.capacity_rps is None for ep in eps)
    for ep, b in zip(eps, f.backends):
        beh = behaviour_for(f.settings.testbed, ep)
        assert beh == {
            "base_latency_ms": b.base_latency_ms,
            "concurrency": b.concurrency,
            "error_rate": 0.0,
            "sigma": b.sigma,
            "tail_prob": b.tail_prob,
            "tail_ms": b.tail_ms,
        }
        assert ep.cost_per_million_requests == b.price
    # 2-3 events at distinct times in 25-80 % of the run, each hitting something.
    ev = f.scenario.events
    assert 2 <= len(ev) <= 3 and f.scenario.duration_s == 30.0
    times = [e.at_s for e in ev]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert all(7.5 <= t <= 24.0 for t in times)
    f.scenario.check_targets(list(eps))
    kinds = [e["kind"] for e in f.events_json()]
    assert kinds[0] != "recovery"
    # Never less than 1.15 x the rate of capacity after an event.
    for i, e in enumerate(ev):
        cap = sum(t["capacity_rps"] for t in truth(f, e.at_s).values())
        assert cap >= 1.15 * f.rate_rps - 1e-6, (i, cap)
        assert f.events_json()[i]["capacity_after_rps"] == pytest.approx(cap, abs=0.01)


def test_event_kinds_all_occur_and_the_description_is_json() -> None:
    import json

    kinds: set[str] = set()
    for seed in range(60):
        f = draw_fleet(seed)
        kinds |= {e["kind"] for e in f.events_json()}
        json.dumps({"fleet": f.to_json(), "events": f.events_json()})
    assert kinds == {"slowdown", "tail", "errors", "price", "capacity_loss", "recovery"}


def test_a_fixed_rate_range_and_bad_arguments() -> None:
    f = draw_fleet(5, (120.0, 120.0))
    assert f.rate_rps == 120.0
    for bad in (-1, 1.5, True):
        with pytest.raises(BenchError):
            draw_fleet(bad)  # type: ignore[arg-type]
    for rng in ((0.0, 100.0), (200.0, 100.0), (100.0, math.inf)):
        with pytest.raises(BenchError):
            draw_fleet(1, rng)
    for n, seed in ((0, 0), (51, 0), (1, -1), (1, 10**9 + 1)):
        with pytest.raises(BenchError):
            validate_suite_args(n, seed, (100.0, 200.0))
    validate_suite_args(50, 10**9, (100.0, 200.0))


# -- truth ---------------------------------------------------------------------------------------


def test_truth_capacity_is_concurrency_over_mean_service_time() -> None:
    f = draw_fleet(3)
    t0 = truth(f, 0.0)
    for b in f.backends:
        mean = b.base_latency_ms * math.exp(b.sigma**2 / 2) + 0.5 + b.tail_prob * b.tail_ms
        assert t0[b.address]["mean_service_ms"] == pytest.approx(mean)
        assert t0[b.address]["capacity_rps"] == pytest.approx(b.concurrency * 1000.0 / mean)
        assert t0[b.address]["price"] == b.price and t0[b.address]["healthy"]


def test_truth_follows_the_shipped_scenario() -> None:
    base = load_config(REPO / "balanceiq.yaml")
    scen = load_live_scenario("degrade_and_dearer")
    gcp = [ep.address for ep in base.clusters[0].endpoints if ep.cloud == "gcp"]
    azure = [ep.address for ep in base.clusters[0].endpoints if ep.cloud == "azure"]
    before, degraded, dearer, after = (truth_at(base, scen, t) for t in (0.0, 35.0, 80.0, 120.0))
    for a in gcp:  # 25 ms (90 in europe-west1), 8 slots -> +150 ms, 4 slots -> back
        assert degraded[a]["mean_service_ms"] == pytest.approx(before[a]["mean_service_ms"] + 150.0)
        assert degraded[a]["capacity_rps"] == pytest.approx(4000.0 / degraded[a]["mean_service_ms"])
        assert after[a] == before[a]
    for a in azure:
        assert dearer[a]["price"] == pytest.approx(4 * before[a]["price"]) and after[a]["price"] == dearer[a]["price"]
    assert before["127.0.0.1:18006"]["error_rate"] == 0.02
    assert before["127.0.0.1:18001"]["capacity_rps"] == pytest.approx(8000.0 / 15.5)


# -- the oracle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 11, 23])
def test_oracle_shares_are_valid_and_use_the_truth(seed: int) -> None:
    f = draw_fleet(seed)
    for n_events in range(len(f.scenario.events) + 1):
        o = oracle_for(f.settings, f.scenario.events[:n_events], demand_rps=f.rate_rps, slo_ms=150.0)
        shares = np.array(list(o["shares"].values()))
        assert o["status"] == "optimal" and shares.min() >= 0 and shares.sum() == pytest.approx(1.0, abs=1e-3)
        w = o["weights"]
        assert set(w) == {b.address for b in f.backends} and all(isinstance(v, int) and v >= 1 for v in w.values())
        # No backend above its true capacity (the fleet always has 15 % headroom).
        t = truth(f, f.scenario.events[n_events - 1].at_s if n_events else 0.0)
        for a, s in o["shares"].items():
            assert s * f.rate_rps <= t[a]["capacity_rps"] * 1.001 + 0.01 * f.rate_rps
        for a in o["excluded"]:
            assert t[a]["error_rate"] > 0 and w[a] == 1


def test_oracle_split_prefers_cheap_fast_and_drops_erring_backends() -> None:
    truth_ = {
        "a": {"capacity_rps": 100.0, "mean_service_ms": 10.0, "price": 0.1, "error_rate": 0.0, "healthy": True},
        "b": {"capacity_rps": 100.0, "mean_service_ms": 10.0, "price": 1.0, "error_rate": 0.0, "healthy": True},
        "c": {"capacity_rps": 100.0, "mean_service_ms": 100.0, "price": 0.1, "error_rate": 0.0, "healthy": True},
        "d": {"capacity_rps": 100.0, "mean_service_ms": 10.0, "price": 0.1, "error_rate": 0.2, "healthy": True},
        "e": {"capacity_rps": 100.0, "mean_service_ms": 10.0, "price": 0.1, "error_rate": 0.0, "healthy": False},
    }
    o = oracle_split(truth_, demand_rps=60.0, slo_ms=150.0, cost_weight=0.1, util_target=0.5, latency_weight=0.2)
    assert set(o["excluded"]) == {"d", "e"} and o["weights"]["d"] == 1 and o["weights"]["e"] == 1
    s = o["shares"]
    assert s["a"] > s["b"] and s["a"] > s["c"] and s["a"] * 60 <= 50.0 + 1e-6  # filled to the knee first
    # When the others cannot carry the demand, the erring backend keeps its place.
    o2 = oracle_split(truth_, demand_rps=290.0, slo_ms=150.0, cost_weight=0.1, util_target=0.5, latency_weight=0.2)
    assert o2["excluded"] == ["e"] and o2["shares"]["d"] > 0


# -- arms, settings, reversals ------------------------------------------------------------------------


def test_arms_and_private_gauges() -> None:
    assert ARMS["oracle"].family == "oracle" and ARMS["oracle"].lb_policy == DEFAULT_LB_POLICY
    assert DEFAULT_ARM.family == "balanceiq" and DEFAULT_ARM.lb_policy == DEFAULT_LB_POLICY
    assert [a.name for a in parse_suite_arms(None)][: len(SUITE_ARMS)] == list(SUITE_ARMS)
    assert [a.name for a in parse_suite_arms("least_request,oracle")] == ["least_request", "oracle"]
    f = draw_fleet(9)
    off, mapping = bench_settings(f.settings, Path("/tmp/unused"))
    on, _ = bench_settings(f.settings, Path("/tmp/unused"), private_gauges=True)
    assert off.telemetry.queries["saturation"] == NO_PRIVATE_GAUGES
    assert "backend_inflight_requests" in on.telemetry.queries["saturation"].promql
    assert off.telemetry.queries["rps"] == on.telemetry.queries["rps"]
    orca, _ = bench_settings(f.settings, Path("/tmp/unused"), orca=True)
    assert "balanceiq_upstream_orca_utilization" in orca.telemetry.queries["saturation"].promql
    # The profiles (with the tails) move with the endpoints.
    for ep in f.settings.clusters[0].endpoints:
        new = next(e for e in off.clusters[0].endpoints if e.address == mapping[ep.address])
        assert behaviour_for(off.testbed, new) == behaviour_for(f.settings.testbed, ep)


def _rec(t: float, weights: dict[str, int], pushed: bool = True, previous: dict[str, int] | None = None) -> Any:
    return SimpleNamespace(
        timestamp=t, weights=weights, previous=previous or {}, pushed=pushed, mode="policy", error=None
    )


def test_controller_summary_counts_reversals_after_the_warm_up() -> None:
    a, b = "127.0.0.1:1", "127.0.0.1:2"
    flip = [{a: 50, b: 50}, {a: 80, b: 20}, {a: 50, b: 50}]  # a up 30 points, then back: 2 reversals (a and b)
    recs = [_rec(100.0 + i, w) for i, w in enumerate(flip)]  # warm-up (t < 0 after 10 s)
    recs += [_rec(110.0 + i, w) for i, w in enumerate([*flip, {a: 50, b: 50}])]
    recs.append(_rec(114.0, {a: 90, b: 10}, pushed=False, previous={a: 50, b: 50}))  # not pushed: Envoy kept 50/50
    log = SimpleNamespace(recent=lambda n: list(reversed(recs)))
    cluster = SimpleNamespace(
        endpoints=[SimpleNamespace(address=a, cloud="aws"), SimpleNamespace(address=b, cloud="gcp")]
    )
    s = _controller_summary(SimpleNamespace(log=log, cluster=cluster), 100.0, 10.0, {a: "10.0.0.1:80"})
    assert s["decisions"] == 8 and s["measured_decisions"] == 5 and s["reversals"] == 2
    assert s["weight_timeline"][-1]["weights"] == {"10.0.0.1:80": 50, b: 50}
    assert s["weight_timeline"][4]["weights"] == {"10.0.0.1:80": 80, b: 20}
    assert s["weight_timeline"][4]["share_by_cloud"] == {"aws": 0.8, "gcp": 0.2}


# -- summary --------------------------------------------------------------------------------------


def _a(p99: float | None, cost: float | None, err: float = 0.0, rev: int = 0, **kw: Any) -> dict[str, Any]:
    return {"p99_ms": p99, "cost_per_million": cost, "error_rate": err, "reversals": rev, **kw}


FLEETS = [
    {
        "seed": 0,
        "arms": {
            "least_request": _a(200, 0.5, 0.01),
            "cswrr": _a(100, 0.4),
            "oracle": _a(80, 0.25),
            "balanceiq_lr": _a(100, 0.25, 0.005, 2),
        },
    },
    {
        "seed": 1,
        "arms": {
            "least_request": _a(100, 0.4, 0.0),
            "cswrr": _a(100, 0.4),
            "oracle": _a(100, 0.4),
            "balanceiq_lr": _a(125, 0.1, 0.001, 1),
        },
    },
    {
        "seed": 2,
        "arms": {
            "least_request": _a(300, 1.0),
            "cswrr": _a(None, None, error="boom"),
            "oracle": _a(300, 0.5),
            "balanceiq_lr": _a(150, 0.8, 0.0, 0),
        },
    },
]


def test_ratio_and_geomean() -> None:
    assert ratio(50, 100) == 0.5 and ratio(None, 1) is None and ratio(1, 0) is None and ratio(math.nan, 1) is None
    assert ratio(0, 1) is None and ratio(True, 1) is None
    assert geomean([0.5, 2.0]) == pytest.approx(1.0) and geomean([None, 4.0]) == pytest.approx(4.0)
    assert geomean([]) is None and geomean([None]) is None


def test_arm_summary_math() -> None:
    s = arm_summary("balanceiq_lr", FLEETS)
    assert s["fleets"] == 3 and s["reversals_total"] == 3
    # p99 vs LR: 0.5, 1.25, 0.5; cost: 0.5, 0.25, 0.8
    assert s["p99_vs_least_request"] == pytest.approx((0.5 * 1.25 * 0.5) ** (1 / 3), abs=1e-4)
    assert s["cost_vs_least_request"] == pytest.approx((0.5 * 0.25 * 0.8) ** (1 / 3), abs=1e-4)
    assert s["both_le_least_request_fraction"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["max_p99_vs_least_request"] == pytest.approx(1.25)
    assert s["errors_le_least_request_every_fleet"] is False and s["errors_le_least_request_fleets"] == 2
    # CSWRR failed on fleet 2: two fleets only.
    assert s["fleets_vs_cswrr"] == 2 and s["p99_vs_cswrr"] == pytest.approx(math.sqrt(1.0 * 1.25), abs=1e-4)
    assert s["cost_vs_oracle"] == pytest.approx((1.0 * 0.25 * 1.6) ** (1 / 3), abs=1e-4)
    lr = arm_summary("least_request", FLEETS)
    assert "p99_vs_least_request" not in lr and lr["p99_vs_oracle"] is not None
    assert arm_summary("cswrr", FLEETS)["fleets"] == 2


def test_targets_and_summary() -> None:
    summary = suite_summary(FLEETS, "balanceiq_lr")
    assert list(summary["by_arm"]) == ["least_request", "cswrr", "oracle", "balanceiq_lr"]
    t = summary["targets"]
    assert t["arm"] == "balanceiq_lr" and t["of"] == 9
    g = t["targets"]
    assert g["p99_vs_least_request"]["met"] is True  # 0.68 <= 0.8
    assert g["cost_vs_least_request"]["met"] is True  # 0.46 <= 0.9
    assert g["both_le_least_request_fraction"]["met"] is False  # 0.67 < 0.75
    assert g["max_p99_vs_least_request"]["met"] is False  # 1.25 > 1.2
    assert g["errors_le_least_request_every_fleet"]["met"] is False
    assert g["p99_vs_cswrr"]["met"] is False and g["cost_vs_cswrr"]["met"] is True
    assert g["p99_vs_oracle"]["met"] is True and g["cost_vs_oracle"]["met"] is True
    assert t["all_met"] is False and t["met"] == 5
    good = {
        k: (True if k.startswith("errors") else 0.5 if not k.startswith("both") else 1.0) for k, *_ in [(k,) for k in g]
    }
    assert evaluate_suite_targets(good, "x")["all_met"] is True
    missing = evaluate_suite_targets(None, "x")
    assert missing["all_met"] is None and missing["met"] == 0
    table = markdown_summary(summary)
    assert "**balanceiq_lr**" in table and "5/9 met" in table and table.count("\n| ") >= 4


# -- CLI -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--suite", "0"], "--suite"),
        (["--suite", "51"], "--suite"),
        (["--suite", "1", "--seed", "-3"], "--seed"),
        (["--suite", "1", "--scenario", "degrade_and_dearer"], "--scenario"),
        (["--suite", "1", "--duration", "1"], "--duration"),
        (["--suite", "1", "--arms", "nope"], "nope"),
        (["--suite", "3", "--only", "3"], "--only"),
        (["--suite", "3", "--only", "1,x"], "--only"),
        (["--only", "0"], "--suite"),
        (["--record", "somewhere"], "--suite"),
        (["--suite", "1", "--orca"], "--orca"),
    ],
)
def test_cli_refuses_bad_suite_arguments(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "live", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
