"""Reaching the running stack: connect to the local Ray cluster and call the xDS actor."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from balanceiq.exceptions import BalanceIQError, TestbedError


def ray_cli() -> str:
    """The ``ray`` executable beside this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def connect_ray(start_if_missing: bool) -> bool:
    """Connect this driver to the local Ray cluster; returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address="auto", namespace="balanceiq", log_to_driver=False)
        return False
    except ConnectionError:
        if not start_if_missing:
            raise TestbedError("no Ray cluster is running (start one with `balanceiq testbed up`)") from None
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


def actor_call(method: str, *args: Any) -> Any:
    """Call the named xDS actor's ``method`` (its own errors re-raised as they are)."""
    import ray

    from balanceiq.xds.actor import get_actor

    connect_ray(start_if_missing=False)
    try:
        actor = get_actor()
    except ValueError as exc:
        raise TestbedError("no xDS actor is running (start it with `balanceiq testbed up`)") from exc
    try:
        return ray.get(getattr(actor, method).remote(*args), timeout=30)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if hasattr(exc, "cause") else exc
        if isinstance(cause, BalanceIQError):
            raise cause from exc
        raise TestbedError(f"xDS actor call {method} failed: {cause}") from exc
