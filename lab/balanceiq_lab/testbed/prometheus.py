"""The testbed's Prometheus: config rendered from Settings, and a launcher for the binary.

The Debian package's ``/usr/bin/prometheus`` runs with its own temporary data directory
and listens only on the host and port of ``prometheus.url`` (loopback by default). It
scrapes Envoy's ``/stats/prometheus``, every backend's ``/metrics``, BalanceIQ's ALS
exporter and the controller's API ``/metrics`` every ``prometheus.scrape_interval_s``. ``prometheus/prometheus.yml`` in the repo
is the default rendering (a test keeps it identical).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from balanceiq.config import Settings
from balanceiq_lab.errors import PrometheusProcessError
from balanceiq_lab.testbed.process import stop_popen


def _hostport(url: str) -> str:
    u = httpx.URL(url)
    return f"{u.host}:{u.port or (443 if u.scheme == 'https' else 80)}"


def duration(seconds: float) -> str:
    """A Prometheus duration: whole seconds as ``5s``, anything else in ms (``500ms``);
    Prometheus rejects fractional units like ``0.5s``."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def render_config(settings: Settings, *, als_metrics_port: int | None = None) -> dict[str, Any]:
    interval = duration(settings.prometheus.scrape_interval_s)
    backends = [ep.address for c in settings.clusters for ep in c.endpoints]
    jobs: list[dict[str, Any]] = [
        {
            "job_name": "envoy",
            "metrics_path": "/stats/prometheus",
            "static_configs": [{"targets": [_hostport(settings.envoy.admin_url)]}],
        },
        {"job_name": "backends", "static_configs": [{"targets": backends}]},
    ]
    if settings.telemetry.als_enabled:
        port = als_metrics_port or settings.telemetry.als_metrics_port
        jobs.append({"job_name": "balanceiq-als", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]})
    # The controller's own metrics (decisions, pushes, ACKs, mode, shares) for the Grafana
    # dashboard, from the API's /metrics wherever `serve run` or the demo serves it.
    host = "127.0.0.1" if settings.api.host in ("0.0.0.0", "::", "") else settings.api.host
    api = f"[{host}]:{settings.api.port}" if ":" in host else f"{host}:{settings.api.port}"
    jobs.append({"job_name": "balanceiq", "metrics_path": "/metrics", "static_configs": [{"targets": [api]}]})
    cfg: dict[str, Any] = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
    }
    if settings.telemetry.als_enabled and settings.telemetry.recording_rules:
        cfg["rule_files"] = [RULES_FILE]
    cfg["scrape_configs"] = jobs
    return cfg


RULES_FILE = "rules.yml"


def render_rules(settings: Settings) -> dict[str, Any]:
    """Recording rules that precompute per-endpoint latency quantiles every interval.

    Rules in a group run in order, so the quantiles read the bucket rates recorded a
    moment before in the same evaluation.
    """
    window = settings.telemetry.window
    rate = "balanceiq:upstream_rq_time_seconds_bucket:rate"
    return {
        "groups": [
            {
                "name": "balanceiq-telemetry",
                "interval": duration(settings.prometheus.scrape_interval_s),
                "rules": [
                    {
                        "record": rate,
                        "expr": f"sum by (cluster, endpoint, le) (rate(balanceiq_upstream_rq_time_seconds_bucket[{window}]))",
                    },
                    {"record": "balanceiq:upstream_rq_time_ms:p50", "expr": f"histogram_quantile(0.5, {rate}) * 1000"},
                    {"record": "balanceiq:upstream_rq_time_ms:p95", "expr": f"histogram_quantile(0.95, {rate}) * 1000"},
                ],
            }
        ]
    }


def prometheus_binary() -> Path:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if not found:
        raise PrometheusProcessError(
            "prometheus binary not found: `make setup` installs Debian's `prometheus` package "
            "(apt-get install prometheus)"
        )
    return Path(found)


class PrometheusProcess:
    """A Prometheus with a throwaway TSDB; start()/stop() or use as a context manager."""

    def __init__(
        self, config: dict[str, Any], url: str, workdir: Path | None = None, rules: dict[str, Any] | None = None
    ) -> None:
        self.config = config
        self.rules = rules
        self.url = url.rstrip("/")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="balanceiq-prom-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, ready_timeout: float = 30.0) -> PrometheusProcess:
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config, sort_keys=False))
        if self.rules is not None:
            (self.workdir / RULES_FILE).write_text(yaml.safe_dump(self.rules, sort_keys=False))
        data = self.workdir / "data"
        shutil.rmtree(data, ignore_errors=True)  # a fresh TSDB: no series from an earlier run
        cmd = [
            str(prometheus_binary()),
            f"--config.file={cfg}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address={_hostport(self.url)}",
            "--storage.tsdb.retention.time=2h",
            "--log.level=warn",
        ]
        with open(self.workdir / "prometheus.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = (self.workdir / "prometheus.log").read_text(errors="replace")[-2000:]
                    self.proc = None
                    raise PrometheusProcessError(f"prometheus exited at start: {tail.strip()}")
                try:
                    if client.get(f"{self.url}/-/ready").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise PrometheusProcessError(f"prometheus not ready at {self.url} after {ready_timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        stop_popen(proc, timeout)

    def __enter__(self) -> PrometheusProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
