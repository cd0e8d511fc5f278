"""Free loopback ports for tests and benchmarks."""

from __future__ import annotations

import socket
from contextlib import ExitStack


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now.

    All ``n`` sockets are held open until every port is chosen, so the kernel cannot hand
    the same port out twice (closing each before asking for the next can, and did).
    Another process may still take one before its user binds it; callers bind soon after.
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
