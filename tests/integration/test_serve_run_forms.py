"""The three `serve run` forms our users were given start the same application on a real
local Ray: `serve run serve_app:app`, `serve run serve_app.py` (which Ray's CLI reads as a
YAML config, because the file exists) and `serve run serve_app.yaml`. Each serves the API
at the config's api.host:api.port (the Controller replica's own server) and through
Serve's proxy on the port the form gives it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from livestack import settings_on_free_ports

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SERVE = str(Path(sys.executable).parent / "serve")
# Serve's proxy: what serve_app.py and serve_app.yaml say, and Serve's default for serve_app:app.
PROXY_PORT = {"serve_app:app": 8000, "serve_app.py": 8001, "serve_app.yaml": 8001}
TOKEN = "serve-run-token-0123456789"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    # The entry files as shipped, beside a config whose every port is free (the one the
    # yaml form names, balanceiq.yaml, by its relative path).
    s = settings_on_free_ports(3)
    data = s.model_dump(mode="json")
    data["state_dir"] = str(tmp_path / "state")
    data["api"]["token"] = TOKEN
    (tmp_path / "balanceiq.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for name in ("serve_app.py", "serve_app.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("form", ["serve_app:app", "serve_app.py", "serve_app.yaml"])
def test_each_serve_run_form_serves_the_api(workdir: Path, form: str) -> None:
    proxy = PROXY_PORT[form]
    if not _port_free(proxy):
        pytest.skip(f"127.0.0.1:{proxy} is taken by another process; the shipped form's proxy listens there")
    api_port = yaml.safe_load((workdir / "balanceiq.yaml").read_text())["api"]["port"]
    env = {**os.environ, "BALANCEIQ_CONFIG": str(workdir / "balanceiq.yaml")}
    env.pop("RAY_ADDRESS", None)
    # --address local: a new Ray of its own, never someone else's on this machine.
    log = workdir / "serve-run.log"
    with log.open("w") as sink:  # a file, not a pipe: a full pipe would stall `serve run`
        proc = subprocess.Popen(
            [SERVE, "run", "--address", "local", form],
            cwd=workdir,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    status = None
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{api_port}/api/status", timeout=5, trust_env=False)
                if r.status_code == 200:
                    status = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert status is not None, f"{form}: no API on api.port :{api_port} (exit {proc.poll()})"
        assert set(status["components"]) >= {"controller", "policy", "xds"}, status
        assert status["api_server"] == f"serving on http://127.0.0.1:{api_port}", status["api_server"]
        # The proxy path serves the same app.
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{proxy}/api/health", timeout=5, trust_env=False).json()
            except (httpx.HTTPError, ValueError):
                time.sleep(1)
        assert health is not None and health["status"] == "healthy", f"{form}: no API through the proxy on :{proxy}"
        # The token from this config, not another: mutations need it, on either path.
        for port in (api_port, proxy):
            r = httpx.put(f"http://127.0.0.1:{port}/api/policy", json={"k": 2}, timeout=10, trust_env=False)
            assert r.status_code == 401, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: Serve and its Ray shut down
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        out = log.read_text(errors="replace")
        if status is None:
            print(out[-4000:])  # -rP
    assert "Traceback" not in out.split("KeyboardInterrupt")[0], out[-4000:]
