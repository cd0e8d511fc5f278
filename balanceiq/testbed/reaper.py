"""A reaper process that stops an owner's children when the owner dies, however it dies: the kernel then closes the
owner's end of a pipe (SIGKILL included), and the reaper, in its own session, stops the registered pids (checked against
their creation time, so a recycled pid is never hit) and deletes the work directory."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import psutil

_REAPER = r"""
import contextlib, shutil, sys
import psutil
procs = []
for line in sys.stdin:
    with contextlib.suppress(ValueError, psutil.Error):
        pid, created = line.split()
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(created)) <= 0.01:
            procs.append(p)
alive = []
for p in procs:
    with contextlib.suppress(psutil.Error):
        p.terminate()
        alive.append(p)
gone, alive = psutil.wait_procs(alive, timeout=5)
for p in alive:
    with contextlib.suppress(psutil.Error):
        p.kill()
psutil.wait_procs(alive, timeout=5)
if len(sys.argv) > 1:  # the owner's work directory (logs, xDS state)
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class Reaper:
    """Kills registered pids when this process dies, however it dies."""

    def __init__(self, workdir: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _REAPER, *([str(workdir)] if workdir else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    def add(self, pid: int | None) -> None:
        if pid is None or self.proc.stdin is None or self.proc.stdin.closed:
            return
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self.proc.stdin.write(f"{pid} {created}\n")
        self.proc.stdin.flush()

    def close(self, timeout: float = 10.0) -> None:
        """Closing the pipe is the signal: anything registered and still alive is stopped."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
