"""`balanceiq bench api-load` and `balanceiq bench xds-soak`: sustained load, loopback only.

**api-load** serves the real API (FastAPI on uvicorn, in this process) over a live stack
(:class:`~balanceiq_lab.stack.Stack`): sample backends, Envoy, Prometheus and the ALS
collector, the in-process xDS server, real telemetry, the controller with its loop running
every second, and a steady open-loop background load through Envoy (its own process). A
second process sends API requests open loop at a fixed rate, each at its scheduled time
whatever the previous ones are doing, so a slow server shows as latency instead of fewer
requests. The mix is what operators and the dashboard send: every read route, policy
scoring, and authenticated overrides. Latency is measured from the intended send time; an
error is any answer that is not 2xx, or none.

**xds-soak** holds ``streams`` simulated ADS clients (real gRPC streams in two child
processes, ACKing like Envoy) plus one real Envoy on the in-process xDS server, pushes
new weights for every endpoint every ``push_interval_s`` for ``duration_s``, checks that
every stream ACKs every push before the next one goes out, and samples the resident memory of the process hosting the
server once a second. Growth is taken from the ``warmup_s`` mark (allocator pools,
caches and gRPC buffers have settled by then) to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import random
import secrets
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console

from balanceiq.config import Settings
from balanceiq_lab.bench.settings import bench_settings
from balanceiq_lab.bench.xds_clients import AckListeningRegistry, ClientProcesses
from balanceiq_lab.errors import BenchError
from balanceiq_lab.openloop import Request, cli_argv, run_open_loop
from balanceiq_lab.progress import progress_bar
from balanceiq_lab.results import latency_summary

MAX_RATE = 2000.0
MAX_DURATION_S = 3600.0
API_TIMEOUT_S = 10.0
API_CONNECTIONS = 64
XDS_ENVOY_NODE = "soak-envoy"
# Bounds the soak is judged by (recorded in BENCHMARKS.md): memory may not grow by more
# than this between the warm-up mark and the end, and every push reaches every stream.
SOAK_GROWTH_BOUND_MB = 20.0
SOAK_GROWTH_BOUND_PCT = 5.0
SOAK_ACK_TIMEOUT_S = 10.0


def _pct(values: Sequence[float] | np.ndarray, digits: int = 2) -> dict[str, Any]:
    return latency_summary(values, digits, keys=("p50", "p90", "p99", "max", "n"))


def _check(rate_rps: float, duration_s: float) -> None:
    if not 0 < rate_rps <= MAX_RATE:
        raise BenchError(f"--rate must be in (0, {MAX_RATE:g}] requests/s, got {rate_rps}")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise BenchError(f"--duration must be in (0, {MAX_DURATION_S:g}] s, got {duration_s}")


# -- the API load ---------------------------------------------------------------------------------


def request_mix(addresses: Sequence[str]) -> list[tuple[str, str, dict[str, Any] | None, bool]]:
    """One cycle of 100 requests ``(method, path, json body, authenticated)``.

    90 reads round-robin over every read route, 8 policy scorings (a six-endpoint
    observation, as a dashboard "what if" would send), 2 authenticated overrides. The
    overrides clear an override that is not there: a real authenticated write (token
    check, guardrails, a wake-up of the control loop) that leaves routing as it was.
    """
    reads = [
        "/api/health",
        "/api/status",
        "/api/weights",
        "/api/metrics/all",
        "/api/metrics/weights",
        "/api/metrics/training",
        "/api/decisions?limit=20",
        "/api/policy",
        "/metrics",
    ]
    score = {
        "endpoints": [
            {
                "address": f"10.0.0.{i}:80",
                "p95_ms": 20.0 + 15 * i,
                "rps": 40.0,
                "saturation": 0.2 + 0.1 * i,
                "error_rate": 0.0,
                "cost_per_million": 0.3 + 0.05 * i,
                "healthy": True,
            }
            for i in range(6)
        ]
    }
    cycle: list[tuple[str, str, dict[str, Any] | None, bool]] = []
    r = 0
    for i in range(100):
        if i in (25, 75):
            cycle.append(("PUT", "/api/weights", {"address": addresses[i % len(addresses)], "action": "clear"}, True))
        elif i % 12 == 6:
            cycle.append(("POST", "/api/policy/score", score, False))
        else:
            cycle.append(("GET", reads[r % len(reads)], None, False))
            r += 1
    return cycle


async def _open_loop(
    url: str, token: str, rate_rps: float, duration_s: float, addresses: Sequence[str]
) -> dict[str, Any]:
    mix = request_mix(addresses)
    auth = {"Authorization": f"Bearer {token}"}
    n = int(rate_rps * duration_s)
    res = await run_open_loop(
        url,
        np.arange(n) / rate_rps,
        max_inflight=max(n, 1),  # unbounded: every request leaves on time
        timeout_s=API_TIMEOUT_S,
        start_wall=time.time() + 0.05,
        requests=[Request(path, method, body, auth if authed else None) for method, path, body, authed in mix],
        connections=API_CONNECTIONS,
        keepalive_s=2.0,  # below uvicorn's 5 s
    )
    ok = res.ok
    errors: Counter[str] = Counter()
    by_route: dict[str, list[int]] = {}
    for i, (status, err) in enumerate(zip(res.status.tolist(), res.error.tolist())):
        method, path, _, _ = mix[i % len(mix)]
        if not ok[i]:
            errors[f"{res.error_kinds[err] if err >= 0 else f'HTTP {status}'} {method} {path}"] += 1
        by_route.setdefault(f"{method} {path.split('?')[0]}", []).append(i)
    done = int(ok.sum())
    return {
        "requests": n,
        "ok": done,
        "errors": n - done,
        "error_kinds": dict(errors),
        "status": dict(Counter(str(s) for s in res.status.tolist() if s > 0)),
        "achieved_rps": round(done / res.wall_s, 1) if res.wall_s > 0 else None,
        "wall_s": round(res.wall_s, 2),
        "latency_ms": _pct(res.latency_ms),
        "by_route": {
            route: {**_pct(res.latency_ms[idx]), "errors": int((~ok[idx]).sum())}
            for route, idx in sorted(by_route.items())
        },
        "client": {
            "schedule_lag_ms": _pct(res.schedule_lag_ms()),
            "cpu_s": round(res.cpu_s, 2),
            "connections": API_CONNECTIONS,
            "timeout_s": API_TIMEOUT_S,
        },
    }


def _api_client(conn: Any, url: str, token: str, rate_rps: float, duration_s: float, addresses: list[str]) -> None:
    """Child-process entry: the generator gets a core of its own, not a share of the
    server's GIL, so its timing errors do not pass for the API's latency."""
    try:
        conn.send(("ok", asyncio.run(_open_loop(url, token, rate_rps, duration_s, addresses))))
    except Exception as exc:  # reported to the parent, which raises BenchError
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _Uvicorn:
    """uvicorn on a loopback socket in a thread (a thread may not own signal handlers)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def install_signal_handlers(self) -> None:
                pass

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise BenchError("uvicorn did not start within 15 s")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@contextlib.contextmanager
def _background_traffic(
    url: str, rate_rps: float, duration_s: float, workdir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Open-loop traffic through Envoy in its own process, so the controller sees real load."""
    out = workdir / "background.json"
    proc = subprocess.Popen(
        cli_argv(url, rate_rps, duration_s, out, arrivals="constant"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def run_api_load(
    *,
    rate_rps: float = 200.0,
    duration_s: float = 60.0,
    background_rps: float = 50.0,
    warmup_s: float = 8.0,
    console: Console | None = None,
    base: Settings | None = None,
) -> dict[str, Any]:
    """The API at ``rate_rps`` for ``duration_s`` over a live stack; one JSON-able dict."""
    _check(rate_rps, duration_s)
    if not 0 <= background_rps <= MAX_RATE:
        raise BenchError(f"--background-rps must be in [0, {MAX_RATE:g}], got {background_rps}")
    from balanceiq.serve.api import create_api
    from balanceiq.serve.plane import PolicyClient
    from balanceiq.serve.policy import PolicyModel
    from balanceiq_lab.stack import Stack

    console = console or Console(stderr=True)
    token = secrets.token_urlsafe(32)
    proc = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="balanceiq-api-load-") as tmp:
        work = Path(tmp)
        # Telemetry and control tuned so the loop decides every second.
        settings = bench_settings(
            6,
            base,
            state_dir=work / "state",
            scrape_interval_s=1.0,
            window_s=5.0,
            stale_after_s=10.0,
            control_interval_s=1.0,
        )
        addresses = [ep.address for ep in settings.clusters[0].endpoints]
        # The stack stops the plane first, so its last decisions do not report a
        # Prometheus that is merely shutting down.
        with Stack(settings, work, health_check_interval_s=60) as stack:
            with console.status("starting the controller and the API"):
                model = PolicyModel()
                plane = stack.control_plane(
                    lambda rows: model.score_many([rows])[0],
                    token=token,
                    policy=PolicyClient(model.info, model.reload),
                    retry_s=1.0,
                )
            plane.start()
            with (
                _background_traffic(stack.listen_url, background_rps, warmup_s + duration_s + 5, work),
                _Uvicorn(create_api(plane)) as url,
            ):
                time.sleep(warmup_s)  # Prometheus has samples, the loop has decided
                steps0, cpu0 = plane.loop.steps, proc.cpu_times()
                result = _drive(url, token, rate_rps, duration_s, addresses, console)
                cpu1 = proc.cpu_times()
                server = {
                    "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                    "cpu_cores": round((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / result["wall_s"], 2),
                    "controller_decisions": plane.loop.steps - steps0,
                    "api_5xx": _api_5xx(plane),
                }
    return {
        "bench": "api-load",
        "target_rps": rate_rps,
        "duration_s": duration_s,
        **result,
        "server": server,
        "stack": (
            "uvicorn + FastAPI over a real ControlPlane: 6 sample backends, Envoy, Prometheus, ALS, in-process "
            f"xDS server, control loop every 1 s, {background_rps:g} req/s through Envoy"
        ),
        "method": "open loop at a fixed rate from a separate process; latency from the intended send time; "
        "error = not 2xx or no answer",
    }


def _api_5xx(plane: Any) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0
    for fam in text_string_to_metric_families(plane.metrics.exposition().decode()):
        for s in fam.samples:
            if s.name == "balanceiq_api_responses_total" and s.labels.get("code", "").startswith("5"):
                total += int(s.value)
    return total


def _drive(
    url: str, token: str, rate_rps: float, duration_s: float, addresses: list[str], console: Console
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    gen = ctx.Process(target=_api_client, args=(child, url, token, rate_rps, duration_s, addresses), daemon=True)
    gen.start()
    child.close()
    limit = duration_s + API_TIMEOUT_S + 60  # the schedule, the last answers, a spawn
    t0 = time.monotonic()
    try:
        with progress_bar(
            console, f"API at {rate_rps:g} req/s", count="{task.completed:.0f}/{task.total:.0f} s"
        ) as progress:
            task = progress.add_task("load", total=duration_s)
            while not parent.poll(0.5):
                progress.update(task, completed=min(duration_s, time.monotonic() - t0))
                if not gen.is_alive() and not parent.poll(0):
                    raise BenchError(f"the load generator exited with code {gen.exitcode} and no result")
                if time.monotonic() - t0 > limit:
                    raise BenchError(f"the load generator did not finish within {limit:.0f} s")
            kind, payload = parent.recv()
    finally:
        gen.join(10)
        if gen.is_alive():
            gen.kill()
            gen.join(5)
        parent.close()
    if kind != "ok":
        raise BenchError(f"the load generator failed: {payload}")
    return payload


# -- the xDS soak ---------------------------------------------------------------------------------


class _Fanout:
    """ACKs per version for the last few versions only, so the bench itself does not grow
    in memory while it measures the server's growth. Counting starts before ``expect``:
    a fast stream ACKs a push before ``set_assignment`` has even returned its version."""

    KEEP = 4

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self._lock = threading.Lock()
        self._counts: OrderedDict[str, list[float]] = OrderedDict()  # version -> [count, last ACK time]
        self._version: str | None = None
        self._done = threading.Event()

    def expect(self, version: str) -> threading.Event:
        with self._lock:
            self._version = version
            self._done = threading.Event()
            if self._counts.get(version, [0, 0.0])[0] >= self.expected:
                self._done.set()
            return self._done

    def count(self) -> tuple[int, float]:
        with self._lock:
            n, last = self._counts.get(self._version or "", [0, 0.0])
            return int(n), last

    def __call__(self, node_id: str, version: str, t: float) -> None:
        with self._lock:
            entry = self._counts.get(version)
            if entry is None:
                entry = self._counts[version] = [0, 0.0]
                while len(self._counts) > self.KEEP:
                    self._counts.popitem(last=False)
            entry[0] += 1
            entry[1] = t
            if version == self._version and entry[0] >= self.expected:
                self._done.set()


def run_xds_soak(
    *,
    streams: int = 1000,
    duration_s: float = 60.0,
    push_interval_s: float = 1.0,
    endpoints: int = 50,
    warmup_s: float = 10.0,
    api: str = "ads-sotw",
    console: Console | None = None,
) -> dict[str, Any]:
    """``streams`` simulated clients + one real Envoy; a push every ``push_interval_s``."""
    from balanceiq.testbed.envoy import render_bootstrap
    from balanceiq.xds.server import XdsServer
    from balanceiq_lab.bench.xds import xds_settings
    from balanceiq_lab.testbed.envoy import EnvoyProcess

    if api not in ("ads-sotw", "ads-delta"):
        raise BenchError(f"--api must be ads-sotw or ads-delta, got {api!r}")
    if not 1 <= streams <= 20_000 or not 1 <= endpoints <= 10_000:
        raise BenchError("--streams must be in 1..20000 and --endpoints in 1..10000")
    if not 0.05 <= push_interval_s <= 60 or not 0 < duration_s <= MAX_DURATION_S or not 0 <= warmup_s < duration_s:
        raise BenchError("--push-interval in [0.05, 60] s, --duration in (0, 3600] s, and --warmup below --duration")
    console = console or Console(stderr=True)
    proc = psutil.Process()
    settings = xds_settings(endpoints)
    addrs = [ep.address for ep in settings.clusters[0].endpoints]
    fanout = _Fanout(streams + 1)
    samples: list[tuple[float, float]] = []  # (seconds since the first push, RSS MiB)
    fanout_s: list[float] = []
    missed: list[str] = []
    late = 0  # pushes that left more than 100 ms after their slot (the previous fan-out overran)
    rng = random.Random(11)
    with tempfile.TemporaryDirectory(prefix="balanceiq-xds-soak-") as work:
        server = XdsServer(settings, state_dir=None)
        server.registry = AckListeningRegistry(fanout)
        port = server.start()
        envoy = EnvoyProcess(
            render_bootstrap(settings, api=api, node_id=XDS_ENVOY_NODE, health_check_interval_s=300),
            workdir=Path(work) / "envoy",
        )
        clients = ClientProcesses(f"127.0.0.1:{port}", "soak", streams, api, settings.clusters[0].name)
        try:
            with console.status(f"starting Envoy and {streams} simulated streams"):
                envoy.start()
                clients.start()
                if server.status()["connected"] != streams + 1:
                    raise BenchError(f"{server.status()['connected']} of {streams + 1} streams connected")
            rss0 = proc.memory_info().rss / 2**20
            pushes = int(duration_s / push_interval_s)
            with progress_bar(console, "pushes", count="{task.completed}/{task.total}") as progress:
                task = progress.add_task("soak", total=pushes)
                t_start = time.monotonic()
                for i in range(pushes):
                    due = t_start + i * push_interval_s
                    time.sleep(max(0.0, due - time.monotonic()))
                    t0 = time.monotonic()
                    late += t0 - due > 0.1
                    weights = {a: rng.randint(1, 1000) for a in addrs}
                    weights[addrs[0]] = 1001 + i  # every push a new version
                    version = server.set_assignment(settings.clusters[0].name, weights)
                    done = fanout.expect(version)
                    # Every stream must ACK before the next push. A fan-out slower than the
                    # interval (a busy machine) delays the next push and shows in "late";
                    # one never completed is a stream that stopped receiving: "missed".
                    if done.wait(SOAK_ACK_TIMEOUT_S):
                        fanout_s.append(fanout.count()[1] - t0)
                    else:
                        got, _ = fanout.count()
                        missed.append(f"{version}: {got}/{streams + 1} ACKs within {SOAK_ACK_TIMEOUT_S:g} s")
                    samples.append((time.monotonic() - t_start, proc.memory_info().rss / 2**20))
                    progress.advance(task)
            status = server.status()
        finally:
            clients.stop()
            envoy.stop()
            server.stop()

    at_warmup = next((mb for t, mb in samples if t >= warmup_s), samples[0][1])
    end = samples[-1][1]
    growth = end - at_warmup
    envoy_node = next(n for n in status["nodes"] if n["node_id"] == XDS_ENVOY_NODE)
    rss_series = [round(mb, 1) for _, mb in samples]
    return {
        "bench": "xds-soak",
        "api": api,
        "streams": streams + 1,
        "simulated_streams": streams,
        "real_envoys": 1,
        "endpoints": endpoints,
        "duration_s": duration_s,
        "push_interval_s": push_interval_s,
        "pushes": len(samples),
        "pushes_fully_acked": len(fanout_s),
        "missed": missed[:10],
        "late_pushes": late,
        "fanout_s": _pct(fanout_s, digits=4),
        "rss_mb": {
            "before_pushes": round(rss0, 1),
            f"at_{warmup_s:g}s": round(at_warmup, 1),
            "end": round(end, 1),
            "max": round(max(mb for _, mb in samples), 1),
            "every_s": rss_series,
        },
        "rss_growth_after_warmup_mb": round(growth, 2),
        "rss_growth_after_warmup_pct": round(100 * growth / at_warmup, 2),
        "bound": {"mb": SOAK_GROWTH_BOUND_MB, "pct": SOAK_GROWTH_BOUND_PCT},
        "within_bound": growth < SOAK_GROWTH_BOUND_MB and 100 * growth / at_warmup < SOAK_GROWTH_BOUND_PCT,
        "connected_at_end": status["connected"],
        "envoy_nacks": envoy_node["nacks"],
        "envoy_last_acked": envoy_node["last_acked_version"] == status["version"],
        "requests_refused": status["requests_refused"],
        "method": "RSS of the process hosting the xDS server, sampled after every push",
    }
