"""Sustained load (issue #8): the API at 200 req/s for 60 s, and 1,000 xDS streams for 60 s.

Both call the functions behind `balanceiq bench api-load` and `balanceiq bench xds-soak`
with the numbers recorded in BENCHMARKS.md. Loopback only, bounded in count and time.
"""

from __future__ import annotations

import pytest

from balanceiq_lab.bench.load import SOAK_GROWTH_BOUND_MB, SOAK_GROWTH_BOUND_PCT, run_api_load, run_xds_soak

pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)
def test_api_sustains_200_rps_for_60_s_without_an_error() -> None:
    r = run_api_load(rate_rps=200, duration_s=60)
    assert r["requests"] == 12_000
    assert r["errors"] == 0, r["error_kinds"]
    assert r["server"]["api_5xx"] == 0
    # Over the wall clock to the last answer, which a 2-core box's stalls stretch by a second
    # or two (194.8 in one CI run): the API's own pace is the errors and p99 checked here.
    assert r["achieved_rps"] >= 190
    # Every route got its share and answered; the control loop kept deciding meanwhile.
    assert all(v["errors"] == 0 and v["n"] > 0 for v in r["by_route"].values())
    assert {"PUT /api/weights", "POST /api/policy/score", "GET /api/status", "GET /metrics"} <= set(r["by_route"])
    assert r["server"]["controller_decisions"] >= 30
    assert r["latency_ms"]["p99"] < 1000, r["latency_ms"]


@pytest.mark.timeout(300)
def test_1000_xds_streams_pushed_every_second_for_60_s_do_not_grow_memory() -> None:
    r = run_xds_soak(streams=1000, duration_s=60, push_interval_s=1.0)
    assert r["streams"] == 1001 and r["connected_at_end"] == 1001
    assert r["pushes"] == 60 and r["pushes_fully_acked"] == 60, r["missed"]
    assert r["envoy_nacks"] == 0 and r["envoy_last_acked"]
    assert r["requests_refused"] == {}
    assert r["rss_growth_after_warmup_mb"] < SOAK_GROWTH_BOUND_MB, r["rss_mb"]
    assert r["rss_growth_after_warmup_pct"] < SOAK_GROWTH_BOUND_PCT, r["rss_mb"]
    assert r["within_bound"]


@pytest.mark.parametrize(
    "args",
    [
        ["xds-soak", "--streams", "20", "--duration", "3", "--warmup", "1"],
        ["api-load", "--rate", "20", "--duration", "3", "--background-rps", "10"],
    ],
    ids=["xds-soak", "api-load"],
)
def test_cli_prints_one_json_object(args: list[str]) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "balanceiq")
    res = subprocess.run([exe, "bench", *args, "--json"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    (line,) = res.stdout.splitlines()
    out = json.loads(line)
    assert out["bench"] == args[0]
    if args[0] == "xds-soak":
        # A push a second for 3 s: on a loaded machine the third can fall past the end
        # (seen once in CI). What this smoke test checks is that every push was ACKed.
        assert out["pushes"] >= 2 and out["pushes_fully_acked"] == out["pushes"] and out["streams"] == 21, (
            out["missed"],
            out,
        )
    else:
        assert out["requests"] == 60 and out["errors"] == 0
