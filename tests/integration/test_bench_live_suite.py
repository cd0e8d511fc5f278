"""`balanceiq bench live --suite`: one random fleet, live, end to end (slow: real Envoy,
Prometheus, backends and the open-loop generator per arm). The fleet drawing, the truth,
the oracle and the summary math are unit-tested in tests/unit/bench/test_live_suite.py."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

from balanceiq.config import load_config
from balanceiq_lab.bench.live import DEFAULT_ARM, parse_arms
from balanceiq_lab.bench.suite import draw_fleet, run_live_suite

REPO = Path(__file__).resolve().parents[2]


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_one_fleet_two_arms_end_to_end(tmp_path: Path) -> None:
    base = load_config(REPO / "balanceiq.yaml")
    plot = tmp_path / "suite.png"
    t0 = time.monotonic()
    result = run_live_suite(
        base, 1, seed=4, arms=parse_arms("least_request,oracle"), duration_s=5.0, warmup_s=1.0, plot_path=plot
    )
    assert time.monotonic() - t0 < 120
    assert result["bench"] == "live-suite" and result["default_arm"] == DEFAULT_ARM.name
    setup = result["setup"]
    assert setup["fleet_seeds"] == [4000] and setup["private_gauges"] is False and setup["capacity_hints"] is False
    assert setup["arms"] == ["least_request", "oracle"]
    assert result["leftover_processes"] == []
    assert all("schedule lag" in n for n in result["notes"]), result["notes"]  # a busy box may say so; nothing else
    assert plot.exists() and plot.stat().st_size > 5_000 and result["plot"] == str(plot)

    (fleet,) = result["fleets"]
    drawn = draw_fleet(4000, duration_s=5.0, base=base)
    assert fleet["seed"] == 4000 and fleet["fleet"] == drawn.to_json() and fleet["events"] == drawn.events_json()
    assert set(fleet["arms"]) == {"least_request", "oracle"}
    for name, arm in fleet["arms"].items():
        assert "error" not in arm, arm
        for key in ("p50_ms", "p99_ms", "p999_ms", "cost_per_million", "error_rate", "slo_attainment"):
            assert _finite(arm[key]), (name, key, arm[key])
        assert arm["p50_ms"] <= arm["p99_ms"] <= arm["p999_ms"]
        assert 0.0 <= arm["error_rate"] <= 1.0 and 0.0 <= arm["slo_attainment"] <= 1.0
        assert arm["requests"] > 0.5 * fleet["fleet"]["rate_rps"] * 5.0
        assert isinstance(arm["reversals"], int) and arm["reversals"] >= 0
        assert next(p["phase"] for p in arm["phases"]) == "start"
    assert fleet["arms"]["least_request"]["reversals"] == 0
    # The oracle pushed at the start and right after every event, weights for every backend.
    pushes = fleet["arms"]["oracle"]["oracle_pushes"]
    assert [p["after"] for p in pushes] == ["start"] + [e["name"] for e in fleet["events"]]
    addresses = {b["address"] for b in fleet["fleet"]["backends"]}
    assert all(set(p["weights"]) == addresses and min(p["weights"].values()) >= 1 for p in pushes)

    summary = result["summary"]["by_arm"]
    assert summary["oracle"]["fleets"] == 1 and _finite(summary["oracle"]["p99_vs_least_request"])
    assert _finite(summary["oracle"]["cost_vs_least_request"])
    targets = result["summary"]["targets"]
    assert targets["arm"] == DEFAULT_ARM.name and targets["all_met"] is None  # BalanceIQ did not run
    assert "| oracle |" in result["markdown"]
