"""The Prometheus config we ship equals what the testbed renders, and promtool accepts it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from balanceiq.config import load_config, settings_from_dict
from balanceiq_lab.errors import PrometheusProcessError
from balanceiq_lab.testbed import prometheus as prom

ROOT = Path(__file__).resolve().parents[3]


def test_shipped_config_matches_rendering() -> None:
    shipped = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    assert shipped == prom.render_config(load_config(ROOT / "balanceiq.yaml"))


def test_shipped_rules_match_rendering() -> None:
    shipped = yaml.safe_load((ROOT / "prometheus" / "rules.yml").read_text())
    assert shipped == prom.render_rules(load_config(ROOT / "balanceiq.yaml"))


def test_promtool_accepts_the_config_and_rules(tmp_path: Path) -> None:
    promtool = prom.prometheus_binary().with_name("promtool")
    for what, name in (("config", "prometheus.yml"), ("rules", "rules.yml")):
        res = subprocess.run(
            [str(promtool), "check", what, str(ROOT / "prometheus" / name)], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stdout + res.stderr


def test_rules_follow_the_window() -> None:
    s = settings_from_dict({"telemetry": {"window_s": 4}, "prometheus": {"scrape_interval_s": 0.5}})
    group = prom.render_rules(s)["groups"][0]
    assert group["interval"] == "500ms" and "[4s]" in group["rules"][0]["expr"]
    no_rules = settings_from_dict({"telemetry": {"recording_rules": False}})
    assert "rule_files" not in prom.render_config(no_rules)
    assert "histogram_quantile" in no_rules.telemetry.queries["p95_ms"].promql


def test_scrape_targets_follow_the_config() -> None:
    s = settings_from_dict(
        {
            "envoy": {"admin_url": "http://127.0.0.1:19901"},
            "prometheus": {"scrape_interval_s": 2},
            "telemetry": {"als_metrics_port": 19978},
        }
    )
    cfg = prom.render_config(s)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["envoy"]["static_configs"][0]["targets"] == ["127.0.0.1:19901"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["balanceiq-als"]["static_configs"][0]["targets"] == ["127.0.0.1:19978"]
    assert cfg["global"]["scrape_interval"] == "2s"
    no_als = prom.render_config(settings_from_dict({"telemetry": {"als_enabled": False}}))
    assert "balanceiq-als" not in {j["job_name"] for j in no_als["scrape_configs"]}


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prom.shutil, "which", lambda name: None)
    monkeypatch.setattr(prom, "Path", lambda p: Path("/nonexistent") / Path(p).name)
    with pytest.raises(PrometheusProcessError, match="apt-get install prometheus"):
        prom.prometheus_binary()


def test_durations_are_valid_prometheus_durations() -> None:
    assert prom.duration(1) == "1s" and prom.duration(0.5) == "500ms" and prom.duration(2.25) == "2250ms"
    assert settings_from_dict({"telemetry": {"window_s": 2.5}}).telemetry.window == "2500ms"
