"""The local testbed: sample backends (one child process), Envoy, and the xDS server.

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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from balanceiq.config import Settings
from balanceiq.exceptions import BackendError, TestbedError
from balanceiq.testbed.envoy import EnvoyProcess, render_bootstrap

STATE_FILE = "testbed.json"


def backend_specs(settings: Settings, *, seed: int | None = 0) -> list[dict[str, Any]]:
    """One backend per configured endpoint, named by its address."""
    specs = []
    for cluster in settings.clusters:
        for i, ep in enumerate(cluster.endpoints):
            latency, concurrency, error_rate = settings.testbed.profile_for(ep)
            specs.append(
                {
                    "name": ep.address,
                    "host": ep.host,
                    "port": ep.port,
                    "cloud": ep.cloud,
                    "region": ep.region,
                    "base_latency_ms": latency,
                    "concurrency": concurrency,
                    "error_rate": error_rate,
                    "cost_per_million_requests": ep.cost_per_million_requests,
                    "seed": None if seed is None else seed + i,
                }
            )
    return specs


class BackendsProcess:
    """All sample backends in one child process (`python -m balanceiq.testbed.backend`)."""

    def __init__(self, specs: list[dict[str, Any]], workdir: Path) -> None:
        self.specs = specs
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.urls: list[str] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 20.0) -> BackendsProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        spec_path = self.workdir / "backends.json"
        spec_path.write_text(json.dumps(self.specs))
        err_path = self.workdir / "backends.stderr"
        with open(err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "balanceiq.testbed.backend", "--spec", f"@{spec_path}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while len(self.urls) < len(self.specs):
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(f"backends not ready after {timeout}s")
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait(5)
                msg = err_path.read_text(errors="replace").strip()
                self.proc = None
                raise BackendError(f"backends exited with {code}: {msg}")
            if line.startswith("ready "):
                self.urls.append(line.split(" ", 1)[1].strip())
        # Nothing more is printed; close our end so a detached child never blocks on it.
        self.proc.stdout.close()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            _terminate(proc.pid, timeout)
            proc.wait(timeout)


def _terminate(pid: int, timeout: float) -> None:
    try:
        p = psutil.Process(pid)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout)
    except psutil.TimeoutExpired:
        p.kill()
    except psutil.NoSuchProcess:
        pass


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
        lb_policy: str = "ROUND_ROBIN",
        health_check_interval_s: float = 5.0,
        node_id: str = "balanceiq-envoy-0",
    ) -> None:
        self.settings = settings
        self.workdir = Path(workdir)
        self.backends = BackendsProcess(backend_specs(settings), self.workdir / "backends")
        bootstrap = render_bootstrap(
            settings,
            api=api,
            node_id=node_id,
            admin_port=admin_port,
            listen_port=listen_port,
            xds_port=xds_port,
            lb_policy=lb_policy,
            health_check_interval_s=health_check_interval_s,
        )
        (self.workdir / "envoy").mkdir(parents=True, exist_ok=True)
        self.envoy = EnvoyProcess(bootstrap, workdir=self.workdir / "envoy")

    def start(self) -> Testbed:
        try:
            self.backends.start()
            self.envoy.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.envoy.stop()
        self.backends.stop()

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def urls(self) -> dict[str, Any]:
        return {
            "proxy": self.envoy.listen_url,
            "envoy_admin": self.envoy.admin_url,
            "backends": self.backends.urls,
            "xds": f"{self.settings.xds.host}:{self.settings.xds.port}",
        }

    def record(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Write the pids for ``testbed down``."""
        data = {
            "backends_pid": self.backends.pid,
            "envoy_pid": self.envoy.pid,
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
    for key, marker in (("envoy_pid", "envoy"), ("backends_pid", "balanceiq.testbed.backend")):
        pid = data.get(key)
        if not pid:
            continue
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if marker not in cmd:  # the pid was reused by something else: leave it alone
            continue
        _terminate(pid, timeout)
        stopped.append(f"{key.removesuffix('_pid')} (pid {pid})")
    os.unlink(path)
    return stopped
