"""One live stack on real parts: the composition root of the tests, benchmarks and demo.

:class:`Stack` composes the lab's sample fleet (:class:`~balanceiq_lab.testbed.testbed.Testbed`:
backends, the ALS exporter, Envoy and, unless asked not to, Prometheus) with the product's
in-process :class:`~balanceiq.xds.server.XdsServer` (unless ``xds=False``: the Ray actor or
the Serve app serves it) and, on request, one controller per cluster behind a
:class:`~balanceiq.serve.plane.ControlPlane` (:meth:`Stack.control_plane`), the API over
uvicorn (:meth:`Stack.serve_api`) and bounded load through Envoy (:meth:`Stack.bounded_load`).
Whatever it starts, or is handed with :meth:`Stack.defer`, stops on :meth:`Stack.stop`,
in reverse order. The live stack of the tests (``tests/livestack.py``), ``bench live``,
``bench faults``, ``bench serve``, ``bench api-load``, ``bench telemetry``, the demo (live
and ``--scripted``), the ALS tests and LiveEnv's sample fleet
(:mod:`balanceiq_lab.testbed.fleet`) are all built from it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import uvicorn
from uvicorn.config import LOGGING_CONFIG

from balanceiq.config import Settings
from balanceiq.exceptions import TestbedError
from balanceiq.xds.server import XdsServer
from balanceiq_lab.testbed.envoy import endpoint_health, endpoint_weights
from balanceiq_lab.testbed.load import LoadResult, run_load_sync
from balanceiq_lab.testbed.testbed import Testbed


class Stack:
    """The xDS server (in-process, unless ``xds=False``) and the testbed, on the ports in
    ``settings``; state in ``workdir/state``, the testbed's files in ``workdir/tb``. A
    context manager; :meth:`start` and :meth:`stop` otherwise.

    ``lb_policy``, ``health_check_interval_s``, ``prometheus``, ``isolate`` (endpoints
    whose backend gets a process of its own, to be killed alone) and ``orca`` (backends
    send ORCA load reports) go to the :class:`Testbed`; ``envoy_bootstrap`` edits Envoy's
    bootstrap before it starts."""

    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        *,
        xds: bool = True,
        lb_policy: str | None = None,
        health_check_interval_s: float = 5.0,
        prometheus: bool = True,
        isolate: Collection[str] = (),
        orca: bool = False,
        envoy_bootstrap: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.workdir = Path(workdir)
        self.xds = XdsServer(settings, state_dir=self.workdir / "state") if xds else None
        self.testbed = Testbed(
            settings,
            self.workdir / "tb",
            lb_policy=lb_policy,
            health_check_interval_s=health_check_interval_s,
            prometheus=prometheus,
            isolate=isolate,
            orca=orca,
        )
        if envoy_bootstrap is not None:
            envoy_bootstrap(self.testbed.envoy.bootstrap)
        self.plane: Any = None  # ControlPlane, once control_plane() made one
        self.api_url: str | None = None  # once serve_api()
        self._loads: list[BackgroundLoad] = []
        self._loads_stop = threading.Event()
        self._exit = contextlib.ExitStack()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        try:
            if self.xds is not None:
                self.xds.start()
                self.defer(self.xds.stop)
            self.testbed.start()
            self.defer(self.testbed.stop)
        except BaseException:
            self.stop()
            raise
        return self

    def defer(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on :meth:`stop`, before whatever was started earlier stops."""
        self._exit.callback(fn, *args)

    def stop(self) -> None:
        """Everything, in reverse order; safe to call twice."""
        self._exit.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what is running ------------------------------------------------------------------------

    @property
    def cluster(self) -> str:
        """The first configured cluster's name."""
        return self.settings.clusters[0].name

    @property
    def addresses(self) -> list[str]:
        return [ep.address for ep in self.settings.clusters[0].endpoints]

    @property
    def listen_url(self) -> str:
        return self.testbed.envoy.listen_url

    @property
    def proxy_url(self) -> str:
        return self.listen_url + "/"

    @property
    def backend_urls(self) -> dict[str, str]:
        """Endpoint address -> its backend's base URL (isolated backends included)."""
        procs = [self.testbed.backends, *self.testbed.isolated.values()]
        return {spec["name"]: url for p in procs for spec, url in zip(p.specs, p.urls)}

    @property
    def pids(self) -> list[int]:
        """The testbed's child processes (backends, ALS, Envoy, Prometheus)."""
        tb = self.testbed
        parts = (tb.backends, *tb.isolated.values(), tb.als, tb.envoy, tb.prometheus)
        return [p.pid for p in parts if p is not None and p.pid is not None]

    # -- acting on it ---------------------------------------------------------------------------

    def control(self, address: str, **changes: Any) -> None:
        """Change a backend's behaviour live (its ``POST /control``: latency, errors, health...)."""
        r = httpx.post(self.backend_urls[address] + "/control", json=changes, timeout=5.0, trust_env=False)
        if r.status_code != 200:
            raise TestbedError(f"backend {address} refused {changes}: {r.text[:200]}")

    def control_all(self, changes: dict[str, Any]) -> None:
        for address in self.backend_urls:
            self.control(address, **changes)

    def envoy_clusters(self) -> dict[str, Any]:
        """Envoy's admin ``/clusters?format=json``."""
        url = f"{self.testbed.envoy.admin_url}/clusters?format=json"
        return httpx.get(url, timeout=2.0, trust_env=False).json()

    def envoy_weights(self, cluster: str | None = None) -> dict[str, int]:
        return endpoint_weights(self.envoy_clusters(), cluster or self.cluster)

    def wait_routable(self, timeout_s: float = 30.0) -> None:
        """Until Envoy has every endpoint of the first cluster from EDS and none fails its
        health check."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                health = endpoint_health(self.envoy_clusters(), self.cluster)
                last = health
                if set(health) == set(self.backend_urls) and not any(health.values()):
                    return
            except (httpx.HTTPError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise TestbedError(f"Envoy did not get every endpoint healthy within {timeout_s:.0f}s: {last}")

    def push(self, weights: dict[str, int], timeout_s: float = 5.0) -> str:
        """Weights for the first cluster through the in-process xDS server, ACKed by Envoy."""
        assert self.xds is not None, "push() needs the in-process xDS server"
        version = self.xds.set_assignment(self.cluster, weights, {})
        if not self.xds.wait_for_ack(version, None, timeout_s):
            raise TestbedError(f"Envoy did not ACK the weights (version {version}) within {timeout_s:.0f}s")
        return version

    # -- optional parts -------------------------------------------------------------------------

    def control_plane(
        self,
        scorer: Any,
        *,
        token: str,
        policy: Any = None,
        recording: Path | None = None,
        retry_s: float = 5.0,
        xds_client: Any = None,
    ) -> Any:
        """One controller per configured cluster (as the Serve app builds them), each with
        its own telemetry (Prometheus retried every ``retry_s``), pushing through
        ``xds_client`` (default: the in-process server), behind a :class:`ControlPlane`
        (returned; not started: ``.start()`` runs the loops)."""
        from balanceiq.serve.plane import ControlPlane, cluster_controllers
        from balanceiq.telemetry.observe import Telemetry
        from balanceiq.xds.client import LocalXdsClient

        if xds_client is None:
            assert self.xds is not None, "control_plane() needs the in-process xDS server or an xds_client"
            xds_client = LocalXdsClient(self.xds)

        def observer(cluster: str) -> Telemetry:
            telemetry = Telemetry(self.settings, cluster, retry_s=retry_s)
            self.defer(telemetry.close)
            return telemetry

        controllers = cluster_controllers(self.settings, xds_client, scorer, observer, recording=recording)
        self.plane = ControlPlane(self.settings, controllers, policy=policy, token=token)
        self.defer(self.plane.stop)
        return self.plane

    @property
    def controller(self) -> Any:
        """The first cluster's controller (``None`` without a control plane)."""
        return self.plane.controller if self.plane is not None else None

    def serve_api(self) -> str:
        """The control plane's API on ``api.port`` (where the testbed's Prometheus scrapes
        the controller's ``/metrics``), in a thread; returns its URL."""
        from balanceiq.serve.api import create_api

        assert self.plane is not None, "serve_api() needs control_plane() first"
        self.api_url = self._exit.enter_context(serve_asgi(create_api(self.plane), port=self.settings.api.port))
        return self.api_url

    def client(self) -> httpx.Client:
        """An HTTP client on the API."""
        assert self.api_url is not None, "client() needs serve_api() first"
        return httpx.Client(base_url=self.api_url, timeout=10, trust_env=False)

    def cluster_url(self, cluster: str | None = None) -> str:
        """Where Envoy routes to ``cluster``: the first behind "/", the others behind
        "/<name>/" (:func:`balanceiq.testbed.envoy.cluster_routes`)."""
        base = self.listen_url
        return base if cluster in (None, self.cluster) else base.rstrip("/") + f"/{cluster}/"

    def bounded_load(
        self, cluster: str | None = None, *, rate_rps: float, max_s: float, concurrency: int
    ) -> BackgroundLoad:
        """A bounded load (:func:`~balanceiq_lab.testbed.load.run_load_sync`) through Envoy to
        ``cluster`` (default the first) in a thread, started; every one stops together in
        :meth:`stop_loads` (on :meth:`stop` at the latest)."""
        if not self._loads:
            self.defer(self.stop_loads)
        load = BackgroundLoad(
            self.cluster_url(cluster), self._loads_stop, rate_rps=rate_rps, max_s=max_s, concurrency=concurrency
        )
        self._loads.append(load)
        load.thread.start()
        return load

    def stop_loads(self, timeout: float = 15.0) -> None:
        """Stop every bounded load, then wait up to ``timeout`` for each."""
        self._loads_stop.set()
        for load in self._loads:
            load.thread.join(timeout)


class BackgroundLoad:
    """``rate_rps`` for at most ``max_s`` through ``url`` in a thread (not started) until
    ``stop`` is set; ``result`` once done."""

    def __init__(self, url: str, stop: threading.Event, *, rate_rps: float, max_s: float, concurrency: int) -> None:
        self.url = url
        self.result: LoadResult | None = None
        kwargs = {
            "total": int(rate_rps * max_s),
            "concurrency": concurrency,
            "max_seconds": max_s,
            "rate_rps": rate_rps,
            "stop": stop,
        }
        self.thread = threading.Thread(target=self._run, kwargs=kwargs, daemon=True)

    def _run(self, **kwargs: Any) -> None:
        self.result = run_load_sync(self.url, **kwargs)


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
