"""Stopping the testbed's child processes: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess

import psutil


def stop_popen(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Stop a child we started and reap it (no zombie left behind)."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout)


def terminate_pid(pid: int, timeout: float = 5.0) -> None:
    """Stop a process known only by pid (``testbed down`` after ``up`` has exited)."""
    try:
        p = psutil.Process(pid)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout)
    except psutil.TimeoutExpired:
        p.kill()
    except psutil.NoSuchProcess:
        pass
