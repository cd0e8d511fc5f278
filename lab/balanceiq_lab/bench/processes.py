"""Processes a benchmark started: the CPU they spent, by role, and any left behind."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

import psutil


def cpu_by_role(roles: Sequence[tuple[str, str]], self_role: str) -> dict[int, tuple[str, float]]:
    """``{pid: (role, cpu seconds so far)}`` for this process (``self_role``) and every
    descendant; a descendant's role is the first of ``roles`` (command-line substring,
    role) that matches its command line, else "other"."""
    me = psutil.Process()
    out: dict[int, tuple[str, float]] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
        except psutil.Error:  # gone between listing and reading
            continue
        role = self_role if p.pid == me.pid else next((r for key, r in roles if key in cmd), "other")
        out[p.pid] = (role, t.user + t.system)
    return out


def cores_by_role(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float
) -> dict[str, float]:
    """Cores each role used between two :func:`cpu_by_role` snapshots ``seconds`` apart, busiest first."""
    agg: dict[str, float] = defaultdict(float)
    for pid, (role, cpu) in after.items():
        agg[role] += cpu - before.get(pid, (role, 0.0))[1]
    return {r: round(v / seconds, 3) for r, v in sorted(agg.items(), key=lambda kv: -kv[1])} if seconds > 0 else {}


def leftovers(pids: set[int], wait_s: float) -> list[str]:
    """``"pid command"`` of the processes among ``pids`` still alive (zombies do not
    count) after waiting up to ``wait_s`` for them to go: what a benchmark left behind."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {' '.join(p.cmdline())[:80]}")
            except psutil.Error:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.3)
