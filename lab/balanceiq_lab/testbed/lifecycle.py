"""`balanceiq testbed up|down`: a detached testbed that outlives the command.

``up`` connects to a running Ray cluster or starts a local head (``ray start --head``),
gets or creates the xDS actor, starts the backends and Envoy in their own sessions and
records their pids in ``<state_dir>/testbed.json``. ``down`` stops those pids, kills the
xDS actor, and stops Ray only if ``up`` started it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from rich.console import Console

from balanceiq.config import Settings
from balanceiq.exceptions import TestbedError
from balanceiq.testbed.lifecycle import connect_ray, ray_cli
from balanceiq_lab.testbed.testbed import STATE_FILE, Testbed, stop_recorded


def up(settings: Settings, console: Console) -> dict[str, Any]:
    from balanceiq.xds.actor import start_actor

    state = Path(settings.state_dir)
    if (state / STATE_FILE).exists():
        raise TestbedError(f"a testbed is already recorded in {state / STATE_FILE}; run `balanceiq testbed down` first")
    with console.status("connecting to Ray"):
        ray_started = connect_ray(start_if_missing=True)
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
        connect_ray(start_if_missing=False)
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
