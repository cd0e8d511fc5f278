"""The local testbed: sample backends, the ALS latency exporter, Envoy and Prometheus.

Two ways to run it:

* in-process, as a context manager (:class:`Testbed`): tests, the demo and benchmarks;
  everything stops on exit, Ctrl-C included;
* detached (``balanceiq testbed up`` / ``down``): the children run in their own sessions
  and their pids are recorded in ``<state_dir>/testbed.json``; ``down`` stops exactly those
  pids (after checking each one still is the process we started) and the xDS actor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import psutil

from balanceiq.config import Settings
from balanceiq.exceptions import TestbedError
from balanceiq_lab.errors import BackendError
from balanceiq_lab.testbed.envoy import EnvoyProcess, lab_bootstrap
from balanceiq_lab.testbed.process import stop_popen, terminate_pid
from balanceiq_lab.testbed.profiles import behaviour_for
from balanceiq_lab.testbed.prometheus import PrometheusProcess, render_config, render_rules

STATE_FILE = "testbed.json"


def backend_specs(settings: Settings, *, seed: int | None = 0) -> list[dict[str, Any]]:
    """One backend per configured endpoint, named by its address."""
    specs = []
    for cluster in settings.clusters:
        for i, ep in enumerate(cluster.endpoints):
            # base_latency_ms, concurrency, error_rate (+ sigma, tail_prob, tail_ms if set)
            behaviour = behaviour_for(settings.testbed, ep)
            specs.append(
                {
                    "name": ep.address,
                    "host": ep.host,
                    "port": ep.port,
                    "cloud": ep.cloud,
                    "region": ep.region,
                    **behaviour,
                    "cost_per_million_requests": ep.cost_per_million_requests,
                    "seed": None if seed is None else seed + i,
                }
            )
    return specs


class ReadyProcess:
    """A child that prints one ``ready <what>`` line per thing it serves, then runs on.

    Started in its own session, so Ctrl-C in a terminal reaches only the parent, which
    stops it by pid; stdout is closed once ready so a detached child never blocks on it.
    """

    def __init__(self, name: str, argv: list[str], expect: int, workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.expect = expect
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.ready_lines: list[str] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 20.0) -> ReadyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        err_path = self.workdir / f"{self.name}.stderr"
        with open(err_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        stdout = self.proc.stdout
        assert stdout is not None
        while len(self.ready_lines) < self.expect:
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(f"{self.name} not ready after {timeout}s")
            line = stdout.readline()
            if not line:
                code = self.proc.wait(5)
                msg = err_path.read_text(errors="replace").strip()
                self.proc = None
                raise BackendError(f"{self.name} exited with {code}: {msg}")
            if line.startswith("ready "):
                self.ready_lines.append(line.split(" ", 1)[1].strip())
        stdout.close()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_popen(proc, timeout)


class BackendsProcess(ReadyProcess):
    """All sample backends in one child process (`python -m balanceiq_lab.testbed.backend`)."""

    def __init__(self, specs: list[dict[str, Any]], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        spec_path = workdir / "backends.json"
        spec_path.write_text(json.dumps(specs))
        argv = [sys.executable, "-m", "balanceiq_lab.testbed.backend", "--spec", f"@{spec_path}"]
        super().__init__("backends", argv, len(specs), workdir)
        self.specs = specs

    @property
    def urls(self) -> list[str]:
        return self.ready_lines


class AlsProcess(ReadyProcess):
    """BalanceIQ's access-log (latency) exporter (`python -m balanceiq.telemetry.als`)."""

    def __init__(self, grpc_port: int, metrics_port: int, workdir: Path) -> None:
        argv = [
            sys.executable,
            "-m",
            "balanceiq.telemetry.als",
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics_port),
        ]
        super().__init__("als", argv, 1, workdir)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"


class Testbed:
    """Backends + Envoy pointed at an xDS server on ``xds_port``. A context manager."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        *,
        xds_port: int | None = None,
        api: str | None = None,
        admin_port: int | None = None,
        listen_port: int | None = None,
        lb_policy: str | None = None,
        health_check_interval_s: float = 5.0,
        node_id: str = "balanceiq-envoy-0",
        prometheus: bool = True,
        isolate: Collection[str] = (),
        orca: bool = False,
    ) -> None:
        self.settings = settings
        self.workdir = Path(workdir)
        specs = backend_specs(settings)
        if orca:  # every backend sends ORCA load reports (endpoint-load-metrics)
            specs = [{**s, "orca": True} for s in specs]
        unknown = sorted(set(isolate) - {s["name"] for s in specs})
        if unknown:
            raise TestbedError(f"isolate names unknown endpoint(s): {', '.join(unknown)}")
        shared = [s for s in specs if s["name"] not in isolate]
        if not shared:
            raise TestbedError("isolate must leave at least one backend in the shared process")
        self.backends = BackendsProcess(shared, self.workdir / "backends")
        # The backends share one process; an isolated one gets its own, so a fault test
        # can kill exactly that endpoint (SIGKILL) while the others keep serving.
        self.isolated = {
            s["name"]: BackendsProcess([s], self.workdir / f"backend-{i}")
            for i, s in enumerate(specs)
            if s["name"] in isolate
        }
        tel = settings.telemetry
        self.als = (
            AlsProcess(tel.als_grpc_port, tel.als_metrics_port, self.workdir / "als") if tel.als_enabled else None
        )
        bootstrap = lab_bootstrap(
            settings,
            api=api,
            node_id=node_id,
            admin_port=admin_port,
            listen_port=listen_port,
            xds_port=xds_port,
            lb_policy=lb_policy,
            health_check_interval_s=health_check_interval_s,
        )
        self.envoy = EnvoyProcess(bootstrap, workdir=self.workdir / "envoy")
        self.prometheus = (
            PrometheusProcess(
                render_config(settings),
                settings.prometheus.url,
                self.workdir / "prometheus",
                rules=render_rules(settings),
            )
            if prometheus
            else None
        )

    def _parts(self) -> list[Any]:
        """In start order; stopped in reverse."""
        return [
            p for p in (self.backends, *self.isolated.values(), self.als, self.envoy, self.prometheus) if p is not None
        ]

    def start(self) -> Testbed:
        try:
            for part in self._parts():
                part.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for part in reversed(self._parts()):
            part.stop()

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def urls(self) -> dict[str, Any]:
        urls: dict[str, Any] = {
            "proxy": self.envoy.listen_url,
            "envoy_admin": self.envoy.admin_url,
            "backends": self.backends.urls,
            "xds": f"{self.settings.xds.host}:{self.settings.xds.port}",
        }
        if self.prometheus is not None:
            urls["prometheus"] = self.prometheus.url
        if self.als is not None:
            urls["als_metrics"] = self.als.metrics_url
        return urls

    def record(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Write the pids for ``testbed down``."""
        data = {
            "backends_pid": self.backends.pid,
            "envoy_pid": self.envoy.pid,
            "als_pid": self.als.pid if self.als else None,
            "prometheus_pid": self.prometheus.pid if self.prometheus else None,
            "workdir": str(self.workdir),
            "urls": self.urls(),
            **(extra or {}),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))


def stop_recorded(path: Path, timeout: float = 5.0) -> list[str]:
    """Stop what ``testbed up`` recorded; returns what was stopped. Safe to call twice."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TestbedError(f"unreadable testbed state {path}: {exc}") from exc
    stopped = []
    for key, marker in (
        ("prometheus_pid", "prometheus"),
        ("envoy_pid", "envoy"),
        ("als_pid", "balanceiq.telemetry.als"),
        ("backends_pid", "balanceiq_lab.testbed.backend"),
    ):
        pid = data.get(key)
        if not pid:
            continue
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if marker not in cmd:  # the pid was reused by something else: leave it alone
            continue
        terminate_pid(pid, timeout)
        stopped.append(f"{key.removesuffix('_pid')} (pid {pid})")
    os.unlink(path)
    return stopped
