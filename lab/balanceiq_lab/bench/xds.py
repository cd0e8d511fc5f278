"""`balanceiq bench xds`: how fast a weight push reaches Envoy, and how far it fans out.

One run, side by side: an in-process :class:`~balanceiq.xds.server.XdsServer`, one real
Envoy, and ``streams`` simulated ADS clients in two child processes (real gRPC streams
that ACK every response). Each push changes every endpoint's weight. Measured:

* ``push_to_ack_ms``: ``set_assignment`` called -> the real Envoy's ACK arrives;
* ``push_to_applied_ms``: -> the new weight is visible in Envoy's admin (``/clusters``
  for small clusters; for large ones, the cluster's ``update_success`` counter, since
  rendering /clusters for 1,000 hosts takes longer than the push itself);
* ``fanout_s``: -> the last ACK of all streams (simulated and real);
* ``rss_mb``: peak resident memory of the process hosting the server.
"""

from __future__ import annotations

import math
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console

from balanceiq.config import Settings, settings_from_dict
from balanceiq.testbed.envoy import render_bootstrap
from balanceiq.testbed.ports import free_ports
from balanceiq.xds.server import XdsServer
from balanceiq_lab.bench.settings import CLOUDS
from balanceiq_lab.bench.xds_clients import AckListeningRegistry, ClientProcesses
from balanceiq_lab.errors import BenchError
from balanceiq_lab.progress import progress_bar
from balanceiq_lab.results import latency_summary
from balanceiq_lab.testbed.envoy import EnvoyProcess, endpoint_weights

CLUSTER = "my_service"
ENVOY_NODE = "bench-envoy"
TARGETS = {
    "push_to_ack_p99_ms": 20.0,
    "push_to_applied_p99_ms": 100.0,
    "fanout_s_at_1000x1000": 1.0,
    "rss_mb_at_1000x1000": 1024.0,
}


def xds_settings(endpoints: int) -> Settings:
    """``endpoints`` endpoints on loopback addresses nothing listens on, xDS/Envoy on free ports."""
    eps = []
    for i in range(endpoints):
        cloud, region, cost = CLOUDS[i % 3]
        # 127.0.0.0/8 gives enough distinct loopback addresses; nothing listens there.
        eps.append(
            {
                "address": f"127.0.{1 + i // 250}.{1 + i % 250}:9",
                "cloud": cloud,
                "region": region,
                "zone": f"{region}-{'abc'[i % 3]}",
                "cost_per_million_requests": cost,
            }
        )
    xds_port, admin_port, listen_port = free_ports(3)
    return settings_from_dict(
        {
            "clusters": [{"name": CLUSTER, "endpoints": eps}],
            "xds": {"port": xds_port},
            "envoy": {"admin_url": f"http://127.0.0.1:{admin_port}", "listen_port": listen_port},
        },
        source="bench",
    )


class AckCollector:
    """Records when each node first ACKs each version; wakes a waiter when all have."""

    def __init__(self, expected_nodes: int) -> None:
        self.expected = expected_nodes
        self._lock = threading.Lock()
        self.acks: dict[str, dict[str, float]] = {}
        self._done: dict[str, threading.Event] = {}

    def expect(self, version: str) -> threading.Event:
        with self._lock:
            self.acks.setdefault(version, {})
            ev = self._done.setdefault(version, threading.Event())
            if len(self.acks[version]) >= self.expected:
                ev.set()
            return ev

    def __call__(self, node_id: str, version: str, t: float) -> None:
        with self._lock:
            by_node = self.acks.setdefault(version, {})
            by_node.setdefault(node_id, t)
            if len(by_node) >= self.expected and version in self._done:
                self._done[version].set()


def _pct(values: list[float], digits: int = 3) -> dict[str, float]:
    s = latency_summary(values, digits, keys=("p50", "p99", "max", "n"))
    return {k: math.nan if v is None else v for k, v in s.items()}


def run_xds_bench(
    *, streams: int, endpoints: int, pushes: int, api: str = "ads-sotw", console: Console | None = None
) -> dict[str, Any]:
    if api not in ("ads-sotw", "ads-delta"):
        raise BenchError(f"--api must be ads-sotw or ads-delta, got {api!r}")
    if streams < 0 or endpoints < 1 or pushes < 1:
        raise BenchError("--streams >= 0, --endpoints >= 1 and --pushes >= 1 are required")
    console = console or Console(stderr=True)
    proc = psutil.Process()
    rss_baseline = proc.memory_info().rss
    settings = xds_settings(endpoints)
    addrs = [ep.address for ep in settings.clusters[0].endpoints]
    probe_clusters = endpoints <= 100

    collector = AckCollector(expected_nodes=streams + 1)
    rss_peak = rss_baseline
    with tempfile.TemporaryDirectory(prefix="balanceiq-bench-") as work:
        server = XdsServer(settings, state_dir=None)
        server.registry = AckListeningRegistry(collector)
        port = server.start()
        envoy = EnvoyProcess(
            render_bootstrap(settings, api=api, node_id=ENVOY_NODE, health_check_interval_s=300),
            workdir=Path(work) / "envoy",
        )
        clients = ClientProcesses(f"127.0.0.1:{port}", "bench", streams, api, CLUSTER)
        try:
            with console.status(f"starting Envoy and {streams} simulated streams"):
                envoy.start()
                clients.start()
                first = server.store.latest()
                assert first is not None
                if not collector.expect(first.version).wait(30):
                    raise BenchError("not every client ACKed the initial snapshot within 30 s")

            ack_ms: list[float] = []
            applied_ms: list[float] = []
            fanout_s: list[float] = []
            rng = random.Random(7)
            admin = httpx.Client(base_url=envoy.admin_url, timeout=5.0)
            stat = f"cluster.{CLUSTER}.update_success"
            with progress_bar(console, "pushes") as progress:
                task = progress.add_task("push", total=pushes)
                for i in range(pushes):
                    weights = {a: rng.randint(1, 1000) for a in addrs}
                    probe = addrs[0]
                    weights[probe] = 1001 + i  # unique per push, so "applied" is unambiguous
                    before = _counter(admin, stat) if not probe_clusters else 0
                    t0 = time.monotonic()
                    version = server.set_assignment(CLUSTER, weights)
                    done = collector.expect(version)
                    # Poll Envoy's admin until the push is visible there.
                    while True:
                        if probe_clusters:
                            seen = endpoint_weights(admin.get("/clusters?format=json").json(), CLUSTER).get(probe)
                            if seen == weights[probe]:
                                break
                        elif _counter(admin, stat) > before:
                            break
                        if time.monotonic() - t0 > 10:
                            raise BenchError(f"push {version} not applied by Envoy within 10 s")
                    applied_ms.append((time.monotonic() - t0) * 1000)
                    if not done.wait(30):
                        got = len(collector.acks.get(version, {}))
                        raise BenchError(f"only {got}/{streams + 1} streams ACKed {version} within 30 s")
                    acks = collector.acks[version]
                    ack_ms.append((acks[ENVOY_NODE] - t0) * 1000)
                    fanout_s.append(max(acks.values()) - t0)
                    rss_peak = max(rss_peak, proc.memory_info().rss)
                    progress.advance(task)
                    time.sleep(0.02)
            admin.close()
            status = server.status()
        finally:
            clients.stop()
            envoy.stop()
            server.stop()

    envoy_node = next(n for n in status["nodes"] if n["node_id"] == ENVOY_NODE)
    result = {
        "bench": "xds",
        "api": api,
        "streams": streams + 1,
        "simulated_streams": streams,
        "real_envoys": 1,
        "endpoints": endpoints,
        "pushes": pushes,
        "push_to_ack_ms": _pct(ack_ms),
        "push_to_applied_ms": _pct(applied_ms),
        "applied_probe": "admin /clusters weight" if probe_clusters else f"admin stat {stat}",
        "fanout_s": _pct(fanout_s, digits=6),  # microseconds, like the *_ms figures
        "rss_mb": round(rss_peak / 2**20, 1),
        "rss_baseline_mb": round(rss_baseline / 2**20, 1),
        "envoy_nacks": envoy_node["nacks"],
        "targets": TARGETS,
    }
    return result


def side_by_side(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """``first`` at the top level (so its keys stay where readers expect them), both runs
    under ``runs``, and ``second / first`` ratios of the p50/p99 figures."""
    ratios = {
        f"{key}.{q}": round(second[key][q] / first[key][q], 3) if first[key][q] else None
        for key in ("push_to_ack_ms", "push_to_applied_ms", "fanout_s")
        for q in ("p50", "p99")
    }
    ratios["rss_mb"] = round(second["rss_mb"] / first["rss_mb"], 3)
    return {**first, "runs": [first, second], "ratios": {f"{second['api']}/{first['api']}": ratios}}


def _counter(admin: httpx.Client, name: str) -> int:
    text = admin.get(f"/stats?filter=^{name}$").text
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return int(value.strip())
    return 0
