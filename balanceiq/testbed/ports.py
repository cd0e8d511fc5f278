"""Free loopback ports (LiveEnv, tests, benchmarks), and a check that configured ones are free."""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack

import httpx

from balanceiq.config import Settings
from balanceiq.exceptions import TestbedError


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low, high = (int(x) for x in fh.read().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now, chosen *below* the kernel's ephemeral range, where
    only listeners compete (an outgoing connection, and Ray opens many, could take a port in
    the range between choosing and binding it); random draws keep concurrent callers apart."""
    low, _ = _ephemeral_range()
    top = max(low - 1, 2048)
    candidates = random.Random().sample(range(1024 if top < 12000 else 10000, top + 1), k=min(4 * n + 64, top - 1024))
    with ExitStack() as stack:
        ports: list[int] = []
        for port in candidates:
            if len(ports) == n:
                break
            s = stack.enter_context(socket.socket())
            try:
                s.bind((host, port))
            except OSError:
                continue
            ports.append(port)
        while len(ports) < n:  # a crowded low range: fall back to the kernel's choice
            s = stack.enter_context(socket.socket())
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def check_ports_free(settings: Settings, *, api: bool = False) -> None:
    """TestbedError naming every configured port that is already taken (before starting
    anything, so a clash is reported instead of half a stack left running)."""
    admin, prom = httpx.URL(settings.envoy.admin_url), httpx.URL(settings.prometheus.url)
    wanted = [
        ("xDS", settings.xds.host, settings.xds.port),
        ("Envoy listener", settings.envoy.listen_host, settings.envoy.listen_port),
        ("Envoy admin", admin.host, admin.port or 80),
        ("Prometheus", prom.host, prom.port or 80),
    ]
    if settings.telemetry.als_enabled:
        wanted += [
            ("ALS", "127.0.0.1", settings.telemetry.als_grpc_port),
            ("ALS metrics", "127.0.0.1", settings.telemetry.als_metrics_port),
        ]
    if api:
        wanted.append(("API", settings.api.host, settings.api.port))
    wanted += [("backend", ep.host, ep.port) for c in settings.clusters for ep in c.endpoints]
    busy = []
    for what, host, port in wanted:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            # As the servers themselves bind (SO_REUSEADDR): the last run's connections
            # in TIME_WAIT do not keep them off the port, a listener does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(f"{what} {host}:{port}")
    if busy:
        raise TestbedError(
            "ports already in use: " + ", ".join(busy) + " (is `balanceiq testbed up` or another demo running? "
            "run `balanceiq testbed down`, or pass --config with other ports)"
        )
