"""The Serve entry points, the Grafana dashboard and the static assets ship correctly."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from balanceiq.control.metrics import ControllerMetrics

ROOT = Path(__file__).resolve().parents[3]


def test_serve_app_yaml_is_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_app.yaml").read_text()))
    assert cfg.http_options.host == "127.0.0.1"
    (app,) = cfg.applications
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert app.args == {"config": "balanceiq.yaml"}


def test_serve_app_module_builds_the_application(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve import Application

    monkeypatch.setenv("BALANCEIQ_CONFIG", str(ROOT / "balanceiq.yaml"))
    monkeypatch.syspath_prepend(str(ROOT))
    import serve_app

    mod = importlib.reload(serve_app)
    assert isinstance(mod.app, Application)


def test_grafana_dashboard_queries_metrics_that_exist() -> None:
    board = json.loads((ROOT / "prometheus" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if "expr" in t]
    assert len(exprs) >= 10
    ours = {f.name for f in ControllerMetrics().registry.collect()}
    ours |= {n + "_total" for n in ours}
    ours |= {n + s for n in ours for s in ("_bucket", "_count", "_sum")}
    # The ALS exporter's own series (telemetry/als*.py) are ours too.
    als = "".join(f.read_text() for f in sorted((ROOT / "balanceiq" / "telemetry").glob("als*.py")))
    used = set(re.findall(r"\b(balanceiq_[a-z_]+)", " ".join(exprs)))
    missing = sorted(m for m in used if m not in ours and m.removesuffix("_bucket").removesuffix("_total") not in als)
    assert missing == [], missing


def test_static_assets_are_packaged() -> None:
    static = ROOT / "balanceiq" / "serve" / "static"
    html = (static / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="/static/([^"]+)"', html):
        assert (static / ref).is_file(), ref
    assert "cdn" not in html.lower() and "https://" not in html
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"serve/static/*"' in pyproject and '"serve/static/vendor/*"' in pyproject
