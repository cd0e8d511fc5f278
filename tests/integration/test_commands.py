"""The user-facing commands end to end: demo, bench xds, testbed up/down (real everything)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from balanceiq.config import Settings
from balanceiq_lab.testbed.envoy import endpoint_weights

pytestmark = pytest.mark.slow

EXE = str(Path(sys.executable).parent / "balanceiq")


def write_config(settings: Settings, path: Path) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    return path


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)


def test_bench_xds_prints_one_json_object() -> None:
    res = run("bench", "xds", "--json", "--streams", "20", "--endpoints", "50", "--pushes", "10")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)  # exactly one JSON document on stdout
    assert out["streams"] == 21 and out["endpoints"] == 50 and out["pushes"] == 10
    for key in ("push_to_ack_ms", "push_to_applied_ms", "fanout_s"):
        assert out[key]["n"] == 10 and 0 < out[key]["p50"] <= out[key]["p99"] <= out[key]["max"]
    # Fan-out ends with the last ACK, so it is never shorter than the real Envoy's ACK.
    assert out["fanout_s"]["max"] * 1000 >= out["push_to_ack_ms"]["max"] - 1e-3
    assert out["rss_mb"] > out["rss_baseline_mb"] > 0
    assert out["envoy_nacks"] == 0


def test_demo_runs_the_schedule(ports_settings: Settings, tmp_path: Path) -> None:
    s = ports_settings.model_copy(update={"state_dir": tmp_path / "state"})
    cfg = write_config(s, tmp_path / "demo.yaml")
    res = run("demo", "--scripted", "--config", str(cfg), "--requests", "400", "--out-dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "demo-report.json").read_text())
    assert [p["phase"] for p in report["phases"]][:4] == ["round robin", "capacity", "cost-aware", "drain"]
    assert report["failed_requests"] == 0 and report["max_share_error"] <= 0.03
    drain = report["phases"][3]
    drained = [r for r in drain["rows"] if r["envoy"] == "eds_draining"]
    assert len(drained) == 1 and drained[0]["observed_share"] == 0.0
    assert report["xds"]["nodes"][0]["nacks"] == 0


def test_testbed_up_and_down_leave_nothing_running(ports_settings: Settings, tmp_path: Path) -> None:
    s = ports_settings.model_copy(update={"state_dir": tmp_path / "state"})
    cfg = write_config(s, tmp_path / "tb.yaml")
    try:
        up = run("testbed", "up", "--config", str(cfg))
        assert up.returncode == 0, up.stderr[-3000:]
        urls = json.loads(up.stdout)
        recorded = json.loads((tmp_path / "state" / "testbed.json").read_text())
        pids = [recorded[k] for k in ("backends_pid", "envoy_pid", "als_pid", "prometheus_pid")]
        assert all(psutil.pid_exists(p) for p in pids)
        assert httpx.get(f"{urls['envoy_admin']}/ready", timeout=2).text.strip() == "LIVE"
        assert httpx.get(f"{urls['prometheus']}/-/ready", timeout=2).status_code == 200

        addrs = [ep.address for ep in s.clusters[0].endpoints]
        res = run("xds", "set", f"{addrs[0]}=9", f"{addrs[1]}=4", "--drain", addrs[2])
        assert res.returncode == 0, res.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            shown = endpoint_weights(
                httpx.get(f"{urls['envoy_admin']}/clusters?format=json", timeout=2).json(), "my_service"
            )
            if shown.get(addrs[0]) == 9 and shown.get(addrs[1]) == 4:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"weights never reached Envoy: {shown}")
        status = json.loads(run("xds", "status").stdout)
        assert status["nodes"][0]["connected"] and status["nodes"][0]["nacks"] == 0
        observed = run("observe", "--config", str(cfg))
        assert observed.returncode == 0, observed.stderr
        obs = json.loads(observed.stdout)
        assert [e["address"] for e in obs["endpoints"]] == addrs and obs["source"] in ("prometheus", "envoy-admin")

        again = run("testbed", "up", "--config", str(cfg))
        assert again.returncode == 2 and "testbed down" in again.stderr and "Traceback" not in again.stderr
    finally:
        down = run("testbed", "down", "--config", str(cfg))
    assert down.returncode == 0, down.stderr
    assert "xDS actor" in down.stderr
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "testbed processes still running after down"
        time.sleep(0.1)
    assert not (tmp_path / "state" / "testbed.json").exists()
    # A second down is harmless.
    assert run("testbed", "down", "--config", str(cfg)).returncode == 0


def test_bench_sim_prints_one_json_object_with_every_metric(tmp_path: Path) -> None:
    res = run(
        "bench",
        "sim",
        "--json",
        "--scenarios",
        "degrade",
        "--policies",
        "equal,inverse_latency,cfr_rl,oracle",
        "--plot",
        str(tmp_path / "sim.png"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    rows = out["results"]["degrade"]
    for policy in ("equal", "inverse_latency", "cfr_rl", "oracle", "full_lp"):
        r = rows[policy]
        for key in (
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "error_rate",
            "cost_per_million",
            "reward",
            "performance_ratio",
            "traffic_moved",
        ):
            assert key in r and r[key] == r[key], (policy, key)  # present and not NaN
        assert 0 < r["performance_ratio"] <= 1
        assert 0 <= r["traffic_moved_first"] <= 1 and r["full_moved_same_state"] >= 0
    # Full re-optimisation moves, from its own state, exactly what it moves.
    assert rows["full_lp"]["traffic_moved_vs_full_same_state"] == pytest.approx(1.0)
    # The oracle is the physical limit: nothing does meaningfully better.
    assert rows["oracle"]["reward"] >= max(r["reward"] for r in rows.values()) - 0.25
    assert rows["equal"]["reward"] < rows["oracle"]["reward"]
    assert out["sim_steps_per_s"]["n8"] > 0
    assert (tmp_path / "sim.png").stat().st_size > 10_000
