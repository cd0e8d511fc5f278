"""The Controller replica's own API server: serves api.host:api.port, or leaves it to
Serve's proxy when something already listens there."""

from __future__ import annotations

import socket
import time

import httpx
from fastapi import FastAPI

from balanceiq.serve.server import ApiServer, bind
from balanceiq.testbed.ports import free_ports


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/api/health")
    def health() -> dict[str, str]:
        return {"status": "healthy"}

    return app


def _wait(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_serves_on_the_configured_port_and_stops() -> None:
    port = free_ports(1)[0]
    server = ApiServer(_app(), "127.0.0.1", port).start()
    try:
        assert _wait(lambda: server.serving), server.state
        assert server.state == f"serving on http://127.0.0.1:{port}"
        r = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5, trust_env=False)
        assert r.json() == {"status": "healthy"}
    finally:
        server.stop()
    assert server.state == "stopped"
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))


def _waiting_on_a_taken_port(retry_s: float) -> tuple[socket.socket, ApiServer]:
    """A port someone else holds, and a server started on it, seen waiting."""
    taken = bind("127.0.0.1", free_ports(1)[0])
    server = ApiServer(_app(), "127.0.0.1", taken.getsockname()[1], retry_s=retry_s).start()
    assert _wait(lambda: server.state.startswith("waiting"), 2), server.state
    return taken, server


def test_a_taken_port_is_retried_then_left_to_the_proxy() -> None:
    taken, server = _waiting_on_a_taken_port(0.5)
    try:
        assert _wait(lambda: server.state.startswith("not serving"), 5), server.state
        assert "proxy serves the API" in server.state and not server.serving
    finally:
        server.stop()
        taken.close()


def test_it_takes_the_port_once_the_old_holder_lets_go() -> None:
    taken, server = _waiting_on_a_taken_port(30)
    try:
        taken.close()  # a replaced replica's server goes away
        assert _wait(lambda: server.serving, 10), server.state
    finally:
        server.stop()
