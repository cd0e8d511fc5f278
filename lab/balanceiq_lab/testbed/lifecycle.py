"""`balanceiq testbed up|down`: a detached testbed that outlives the command.

``up`` connects to a running Ray cluster or starts a local head (``ray start --head``),
gets or creates the xDS actor, starts the backends and Envoy in their own sessions and
records their pids in ``<state_dir>/testbed.json``. ``down`` stops those pids, kills the
xDS actor, and stops Ray only if ``up`` started it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from rich.console import Console

from balanceiq.config import Settings
from balanceiq.exceptions import TestbedError
from balanceiq.xds.client import connect_ray
from balanceiq_lab.testbed.testbed import STATE_FILE, Testbed, stop_recorded


def ray_cli() -> str:
    """The ``ray`` executable beside this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def connect_or_start_ray() -> bool:
    """Connect to the local Ray cluster, starting a head if none runs; True if we started it."""
    import ray

    try:
        connect_ray()
        return False
    except TestbedError:
        pass
    res = subprocess.run(
        [ray_cli(), "start", "--head", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if res.returncode != 0:
        raise TestbedError(f"`ray start --head` failed: {res.stderr.strip()[-2000:]}")
    ray.init(address="auto", namespace="balanceiq", log_to_driver=False)
    return True


def up(settings: Settings, console: Console) -> dict[str, Any]:
    from balanceiq.xds.actor import start_actor

    state = Path(settings.state_dir)
    if (state / STATE_FILE).exists():
        raise TestbedError(f"a testbed is already recorded in {state / STATE_FILE}; run `balanceiq testbed down` first")
    with console.status("connecting to Ray"):
        ray_started = connect_or_start_ray()
    # Record before starting anything else, so `down` (or the cleanup below, on Ctrl-C
    # or a failed start) knows whether Ray is ours to stop.
    state.mkdir(parents=True, exist_ok=True)
    (state / STATE_FILE).write_text(json.dumps({"ray_started": ray_started}))
    try:
        with console.status("starting the xDS actor"):
            start_actor(settings, state_dir=state)
        tb = Testbed(settings, state / "testbed")
        with console.status("starting backends and Envoy"):
            tb.start()
    except BaseException:
        down(settings)
        raise
    tb.record(state / STATE_FILE, {"ray_started": ray_started})
    console.print(f"[green]testbed up[/]: proxy {tb.envoy.listen_url}, admin {tb.envoy.admin_url}")
    return tb.urls()


def down(settings: Settings) -> list[str]:
    import ray

    state = Path(settings.state_dir)
    path = state / STATE_FILE
    ray_started = False
    if path.exists():
        try:
            ray_started = bool(json.loads(path.read_text()).get("ray_started"))
        except (OSError, ValueError):
            ray_started = False
    stopped = stop_recorded(path)
    try:
        connect_ray()
        from balanceiq.xds.actor import get_actor

        ray.kill(get_actor(), no_restart=True)
        stopped.append("xDS actor")
    except (TestbedError, ValueError):
        pass
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if ray_started:
        subprocess.run([ray_cli(), "stop"], capture_output=True, timeout=120)
        stopped.append("Ray (started by testbed up)")
    return stopped


def wait_for_interrupt(settings: Settings, console: Console) -> None:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    console.print("attached; Ctrl-C tears the testbed down")
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    for line in down(settings):
        console.print(f"stopped {line}")
