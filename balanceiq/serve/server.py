"""The API on the Controller replica's own HTTP server, beside Serve's proxy (where every request is a
hop and a Ray task). If the port is taken (the proxy, a replica being replaced), binding is retried
for ``retry_s``, then the proxy alone serves the API."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # not the main thread: signals stay Ray's
        pass


def bind(host: str, port: int) -> socket.socket:
    """A listening socket without SO_REUSEPORT, so it never shares the port (with Serve's proxy, an older replica)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class ApiServer:
    """``app`` on ``host:port`` in a daemon thread; :attr:`state` says how it went."""

    def __init__(self, app: Any, host: str, port: int, *, retry_s: float = 60.0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.retry_s = retry_s
        self.state = "starting"
        self._server: _Server | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="balanceiq-api", daemon=True)

    def start(self) -> ApiServer:
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.retry_s
        where = f"{self.host}:{self.port}"
        while True:
            try:
                sock = bind(self.host, self.port)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline or self._stop.is_set():
                    self.state = f"not serving: {where}: {exc.strerror or exc}; Serve's proxy serves the API"
                    log.warning("API server %s", self.state)
                    return
                self.state = f"waiting: {where} in use"
                self._stop.wait(1.0)
        self._server = _Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off"))
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.state = f"serving on http://{host}:{self.port}"
        log.info("API server %s", self.state)
        try:
            self._server.run(sockets=[sock])
        finally:
            sock.close()
            self.state = "stopped"

    @property
    def serving(self) -> bool:
        return self._server is not None and bool(self._server.started) and self.state.startswith("serving")

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
