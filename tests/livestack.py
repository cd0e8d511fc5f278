"""A whole control plane in this process, on real parts, for integration tests.

Backends, ALS, Envoy and Prometheus come from the real :class:`Testbed`; the xDS server,
telemetry, controller and API are the real classes. Only Ray Serve is left out (the
Serve tests cover it), so a test can step the controller deterministically and read
its state directly as well as over HTTP.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from uvicorn.config import LOGGING_CONFIG

from balanceiq.config import Settings
from balanceiq.control.controller import Controller
from balanceiq.control.xds_client import LocalXdsClient
from balanceiq.serve.api import create_api
from balanceiq.serve.plane import ControlPlane, PolicyClient, cluster_controllers
from balanceiq.serve.policy import PolicyModel
from balanceiq.telemetry.observe import Telemetry
from balanceiq.testbed.ports import settings_on_free_ports
from balanceiq.xds.server import XdsServer
from balanceiq_lab.testbed.load import run_load_sync
from balanceiq_lab.testbed.testbed import Testbed

TOKEN = "test-token-0123456789abcdef"


def fast_settings(base: Settings, interval_s: float = 1.0) -> Settings:
    """Short windows so a test sees a change within seconds, not the production 10 s."""
    return base.model_copy(
        update={
            "prometheus": base.prometheus.model_copy(update={"scrape_interval_s": 0.5}),
            "telemetry": base.telemetry.model_copy(update={"window_s": 2.0, "stale_after_s": 4.0}),
            "control": base.control.model_copy(update={"interval_s": interval_s}),
        }
    )


def two_cluster_settings(n: int = 6, interval_s: float = 1.0) -> Settings:
    """``n`` endpoints on free ports split in two clusters: ``my_service`` and ``checkout``."""
    s = settings_on_free_ports(n)
    eps = s.clusters[0].endpoints
    first = s.clusters[0].model_copy(update={"endpoints": eps[: n // 2]})
    second = s.clusters[0].model_copy(update={"name": "checkout", "endpoints": eps[n // 2 :]})
    return fast_settings(s.model_copy(update={"clusters": [first, second]}), interval_s)


@dataclass
class LiveStack:
    settings: Settings
    testbed: Testbed
    xds: XdsServer
    controller: Controller
    plane: ControlPlane
    url: str
    backend_url: dict[str, str]

    def control(self, address: str, **changes: Any) -> None:
        """Change a backend's behaviour live (latency, errors, health...)."""
        r = httpx.post(self.backend_url[address] + "/control", json=changes, timeout=5, trust_env=False)
        r.raise_for_status()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, trust_env=False)


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # a thread may not own signals
        pass


@contextlib.contextmanager
def serve_asgi(
    app: Any,
    *,
    log_level: str = "warning",
    log_config: dict[str, Any] | None = LOGGING_CONFIG,
    access_log: bool = True,
    port: int = 0,
) -> Iterator[str]:
    """``app`` on a loopback port (``port``, else a free one), in a thread, until the block
    ends. ``log_config=None`` leaves uvicorn's loggers (access log included) to the logging
    tree, where caplog sees them."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:  # taken since it was picked: any free one (Prometheus then misses it)
        sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, log_config=log_config, access_log=access_log, lifespan="off")
    server = _Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def live_stack(
    settings: Settings, workdir: Path, *, rate_rps: float = 120, run_loop: bool = False, max_load_s: float = 240
) -> Iterator[LiveStack]:
    """Everything up, a bounded load running through Envoy; all stopped on exit."""
    settings = settings.model_copy(update={"state_dir": workdir / "state"})
    xds = XdsServer(settings, state_dir=workdir / "state")
    xds.start()
    stop = threading.Event()
    loaders: list[threading.Thread] = []
    telemetry: list[Telemetry] = []
    plane: ControlPlane | None = None
    try:
        with Testbed(settings, workdir / "tb", health_check_interval_s=60) as tb:
            # The same load on every cluster: the first behind "/", the others behind
            # "/<name>/" (testbed.envoy.cluster_routes).
            for i, c in enumerate(settings.clusters):
                url = tb.envoy.listen_url.rstrip("/") + ("" if i == 0 else f"/{c.name}/")
                loaders.append(
                    threading.Thread(
                        target=run_load_sync,
                        args=(url,),
                        kwargs={
                            "total": int(rate_rps * max_load_s),
                            "concurrency": 8,
                            "max_seconds": max_load_s,
                            "rate_rps": rate_rps,
                            "stop": stop,
                        },
                        daemon=True,
                    )
                )
                loaders[-1].start()
            model = PolicyModel()

            def observer(cluster: str) -> Telemetry:
                telemetry.append(Telemetry(settings, cluster, retry_s=0.5))
                return telemetry[-1]

            # One controller per configured cluster, as the Serve app builds them.
            controllers = cluster_controllers(
                settings, LocalXdsClient(xds), lambda rows: model.score_many([rows])[0], observer
            )
            controller = controllers[0]
            plane = ControlPlane(settings, controllers, policy=PolicyClient(model.info, model.reload), token=TOKEN)
            if run_loop:
                plane.start()
            backend_url = dict(zip([b["name"] for b in tb.backends.specs], tb.backends.urls))
            # On api.port, where the testbed's Prometheus scrapes the controller's /metrics.
            with serve_asgi(create_api(plane), port=settings.api.port) as url:
                yield LiveStack(settings, tb, xds, controller, plane, url, backend_url)
    finally:
        if plane is not None:
            plane.stop()
        for t in telemetry:
            t.close()
        stop.set()
        for loader in loaders:
            loader.join(15)
        xds.stop()
