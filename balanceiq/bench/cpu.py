"""CPU seconds of this process and its descendants, by role: what a benchmark spent where."""

from __future__ import annotations

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
