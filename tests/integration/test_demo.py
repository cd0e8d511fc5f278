"""`balanceiq demo`: the whole loop from nothing, a live scenario, and Ctrl-C stopping everything."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from livestack import fast_settings, settings_on_free_ports

from balanceiq.config import Settings
from balanceiq.testbed.ports import free_ports

pytestmark = pytest.mark.slow

EXE = str(Path(sys.executable).parent / "balanceiq")


def _config(tmp_path: Path) -> Path:
    s: Settings = fast_settings(settings_on_free_ports(6), interval_s=2.0)
    s = s.model_copy(update={"api": s.api.model_copy(update={"port": free_ports(1)[0]})})
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(s.model_dump(mode="json")))
    return path


def _scenario(tmp_path: Path, duration: float) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "short_degrade",
                "duration_s": duration,
                "events": [
                    {"at_s": 12, "name": "gcp degrades", "cloud": "gcp", "set": {"extra_latency_ms": 300}},
                    {"at_s": 28, "name": "gcp recovers", "cloud": "gcp", "reset": True},
                ],
            }
        )
    )
    return path


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_demo_moves_traffic_off_the_degraded_cloud(tmp_path: Path) -> None:
    # With a second cluster (issue #15): steered beside the first through one Envoy.
    out = tmp_path / "out"
    res = subprocess.run(
        [
            EXE,
            "demo",
            "--config",
            str(_config(tmp_path)),
            "--scenario",
            str(_scenario(tmp_path, 40)),
            "--rate",
            "60",
            "--out-dir",
            str(out),
            "--clusters",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dashboard" in res.stderr and "t=" in res.stdout  # the URL, and one line per interval
    report = json.loads((out / "demo-report.json").read_text())
    phases = {p["phase"]: p for p in report["phases"]}
    assert set(phases) == {"start", "gcp degrades", "gcp recovers"}
    before = phases["start"]["clouds"]["gcp"]["share"]
    during = phases["gcp degrades"]["clouds"]["gcp"]["share"]
    assert during < before, (before, during)
    assert report["load"]["failed"] == 0 and report["load"]["sent"] > 1000
    assert [e["name"] for e in report["events"]] == ["gcp degrades", "gcp recovers"]
    assert (out / "demo.png").stat().st_size > 10_000
    assert report["status"]["components"]["xds"]["state"] == "up"
    assert report["clusters"] == ["my_service", "checkout"]
    second = report["others"]["checkout"]
    assert second["pushed"] >= 1 and second["acked"] >= 1, second
    assert [x["failed"] for x in report["others"]["load"]] == [0] and report["others"]["load"][0]["sent"] > 500
    assert "cluster checkout:" in res.stderr
    assert {c["cluster"] for c in report["status"]["clusters"]} == {"my_service", "checkout"}


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    err_path = tmp_path / "demo.stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [
                EXE,
                "demo",
                "--config",
                str(_config(tmp_path)),
                "--scenario",
                str(_scenario(tmp_path, 600)),
                "--rate",
                "40",
                "--out-dir",
                str(tmp_path / "out"),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        line = ""
        while time.monotonic() < deadline and not line.startswith("t="):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, err_path.read_text()[-3000:]
        assert line.startswith("t="), "no interval line within 180 s"
        children = _tree(proc.pid)
        assert any("envoy" in " ".join(c.cmdline()) for c in children if c.is_running())
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
        assert code == 130, err_path.read_text()[-3000:]
        assert "stopping everything" in err_path.read_text()
        time.sleep(1.0)
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], [(c.pid, c.cmdline()[:3]) for c in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
