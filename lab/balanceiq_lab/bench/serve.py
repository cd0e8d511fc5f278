"""`balanceiq bench serve`: the Ray Serve app under load (policy inference, API, loop).

One run, everything real: the sample backends, the ALS exporter, Envoy and Prometheus (a
:class:`~balanceiq_lab.stack.Stack` without its own xDS server), a private local Ray
cluster, and the product's Serve application (``build_app``: the batched ``Policy``
deployment and the ``Controller`` FastAPI ingress, which starts the xDS actor and the
control loop). A bounded background load (~100 req/s through Envoy) gives the controller
real telemetry for the whole run. Measured:

* ``inference_ms.handle``: ``policy.score.remote(rows).result()`` from the driver through
  a ``DeploymentHandle``, N = ``--endpoints`` rows of a synthetic observation, sequential;
* ``inference_ms.http``: ``POST /api/policy/score`` with the same endpoints as JSON
  through Serve's HTTP proxy (validation, encoding, the same handle call inside the
  Controller replica, JSON out), sequential;
* ``inference_ms.concurrent``: 8 driver threads sharing the same number of handle calls,
  so ``@serve.batch`` has something to batch (mean batch size from Serve's own
  ``serve_actual_batch_size`` metric when Ray's metrics agent answers);
* ``api``: an open-loop load (requests sent on a fixed schedule, latency measured from
  the *intended* send time, so a stalled server cannot hide its queue by slowing the
  client down) over the read-only routes the dashboard polls; plus CPU by process during
  it, and a short closed-loop ``calibration`` of the same mix (CPU each request costs
  the Serve proxy and the Controller replica when nothing queues), to say why if the
  target rate is not reached;
* ``decision_loop_ms``: the controller's own ``step_ms`` (lease, observe, decide, push,
  ACK) from ``GET /api/decisions``, with the control interval at 1 s.

``direct_ingress=True`` runs the same measurements with Ray Serve's experimental direct
ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the environment of every process of
the private cluster): the Controller replica runs its own uvicorn server on a port Serve
allocates from ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT..MAX`` (default 30000..31000,
*not* ``http_options.port``, where the proxy still listens), found from Serve's target
groups; every HTTP measurement goes there. ``also_rate`` adds a second open-loop phase
(``api_also``, run first) at a lower rate. :func:`run_serve_compare` runs both ingress
modes one after the other, each in a fresh process with a fresh Ray, and reports both
plus direct/proxy ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console

from balanceiq.config import Settings, critical_count
from balanceiq.exceptions import BalanceIQError
from balanceiq.policy.baselines import PolicyContext
from balanceiq.policy.decide import observe_only
from balanceiq.policy.features import encode
from balanceiq.policy.knobs import Knobs
from balanceiq.policy.reward import RewardWeights
from balanceiq.telemetry.observation import EndpointObservation, Observation
from balanceiq.testbed.ports import free_ports
from balanceiq_lab.bench.processes import cores_by_role, cpu_by_role, leftovers
from balanceiq_lab.bench.settings import CLOUDS
from balanceiq_lab.bench.settings import bench_settings as common_settings
from balanceiq_lab.errors import BenchError
from balanceiq_lab.openloop import Request, run_open_loop
from balanceiq_lab.progress import progress_bar
from balanceiq_lab.results import latency_summary

APP_NAME = "balanceiq-bench"
TESTBED_ENDPOINTS = 6  # the controller's own cluster; --endpoints sizes the scoring requests
CONTROL_INTERVAL_S = 1.0
WARMUP_CALLS = 20
CONCURRENT_CALLERS = 8
BACKGROUND_RPS = 100.0
API_PATHS = ("/api/status", "/api/weights", "/api/metrics/all", "/api/health", "/api/decisions")
API_CONNECTIONS = 32
API_TIMEOUT_S = 10.0
CALIBRATION_REQUESTS = 250
SATURATION_CONNECTIONS = 16
BATCH_BUCKETS = ",".join(str(i) for i in range(1, 33))  # Policy's max_batch_size is 32
TARGETS = {
    "handle_p99_ms_at_64_endpoints": 10.0,
    "api_errors_at_200_rps_for_30_s": 0,
    "api_p99_ms_at_200_rps": 100.0,
    "decision_score_ms_p99": 10.0,
}
# Set in os.environ before ray.init (the raylet, and so every worker, inherits it) and in
# the job's runtime_env. Ray reads these at import time in the Serve controller and the
# replicas; the driver does not use them.
DIRECT_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # Ray holds a direct-ingress replica open >= this long when it stops (default 30 s, so
    # an external load balancer can deregister it); nothing sits in front of it here.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}
PROXY_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}  # explicit: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 would turn it on
# replica_server: the app as `serve run serve_app.py` starts it (the Controller replica's
# own HTTP server on api.port, Serve's proxy on another port); proxy: Serve's proxy
# alone on api.port; direct_ingress: Ray Serve's experimental direct ingress.
MODES = ("proxy", "direct_ingress", "replica_server")
DEFAULT_MODE = "replica_server"
COMPARE_METRICS = (
    "api.rps",
    "api.errors",
    "api.p99_ms",
    "inference_ms.http.p99",
    "inference_ms.handle.p99",
    "api.p50_ms",
    "inference_ms.http.p50",
    "inference_ms.handle.p50",
    "api.calibration.closed_loop_rps",
    "api.calibration.saturation.rps",
    "api.calibration.saturation.p99_ms",
    "api.calibration.cpu_ms_per_request.serve_proxy",
    "api.calibration.cpu_ms_per_request.controller_replica",
    "api_also.rps",
    "api_also.errors",
    "api_also.p50_ms",
    "api_also.p99_ms",
    "decision_loop_ms.p50",
    "decision_loop_ms.p99",
)


# -- pure helpers (unit-tested) ----------------------------------------------------------


def summary(values: Sequence[float] | np.ndarray, digits: int = 3) -> dict[str, float | int | None]:
    """``p50``, ``p99``, ``mean``, ``max`` and ``n`` of latencies (ms), rounded."""
    return latency_summary(values, digits, keys=("p50", "p99", "mean", "max", "n"))


def validate_args(
    *, endpoints: int, duration_s: float, rate_rps: float, calls: int, also_rate_rps: float | None = None
) -> None:
    """Refuse values that cannot give a meaningful, bounded run (``BenchError``)."""
    problems = []
    if also_rate_rps is not None and not (math.isfinite(also_rate_rps) and 0 < also_rate_rps <= 2000):
        problems.append(f"--also-rate must be in (0, 2000] requests/s, got {also_rate_rps}")
    if not 1 <= endpoints <= 1000:
        problems.append(f"--endpoints must be in 1..1000 (the API's ScoreRequest limit), got {endpoints}")
    if not (math.isfinite(duration_s) and 1 <= duration_s <= 600):
        problems.append(f"--duration must be in 1..600 seconds, got {duration_s}")
    if not (math.isfinite(rate_rps) and 0 < rate_rps <= 2000):
        problems.append(f"--rate must be in (0, 2000] requests/s (loopback, 2 cores), got {rate_rps}")
    if not 1 <= calls <= 100_000:
        problems.append(f"--calls must be in 1..100000, got {calls}")
    if problems:
        raise BenchError("; ".join(problems))


def send_schedule(rate_rps: float, duration_s: float) -> list[float]:
    """Intended send offsets (s) of an open-loop load: ``i / rate`` for every request
    that starts inside ``duration_s``."""
    n = max(1, math.floor(rate_rps * duration_s + 1e-9))
    return [i / rate_rps for i in range(n)]


def split_calls(total: int, workers: int) -> list[int]:
    """``total`` calls shared by ``workers`` as evenly as possible (no empty worker)."""
    workers = max(1, min(workers, total))
    return [total // workers + (1 if i < total % workers else 0) for i in range(workers)]


def synthetic_observation(n: int, seed: int = 0) -> tuple[Observation, np.ndarray]:
    """A plausible live observation of ``n`` endpoints in three clouds and the capacity
    hint (rps) of each: mostly healthy, a few hot or erroring, one down."""
    rng = np.random.default_rng(seed)
    capacity = rng.choice([150.0, 300.0, 400.0], size=n)
    util = rng.uniform(0.2, 0.85, size=n)
    hot = rng.random(n) < 0.1
    util[hot] = rng.uniform(0.9, 1.3, size=int(hot.sum()))
    rps = capacity * util
    base = np.array([(15.0, 25.0, 35.0)[i % 3] for i in range(n)]) + rng.uniform(0, 10, size=n)
    p50 = base * (1 + np.maximum(0, util - 0.7) * 4)
    p95 = p50 * rng.uniform(1.5, 2.5, size=n)
    err = np.where(rng.random(n) < 0.08, rng.uniform(0.02, 0.1, size=n), rng.uniform(0, 0.003, size=n))
    weights = np.maximum(1, np.round(10000 * capacity / capacity.sum()))
    eps = []
    for i in range(n):
        healthy = not (n > 4 and i == n - 1)
        eps.append(
            EndpointObservation(
                address=f"10.{i // 250 % 250}.{i % 250 + 1}.10:8080",
                p50_ms=float(p50[i]),
                p95_ms=float(p95[i]),
                error_rate=float(err[i]),
                saturation=float(util[i]),
                inflight=float(rps[i] * p50[i] / 1000),
                rps=float(rps[i] if healthy else 0.0),
                cost_per_million=CLOUDS[i % 3][2],
                weight=float(weights[i]),
                healthy=healthy,
                age_s=0.5,
            )
        )
    return Observation(cluster="my_service", endpoints=tuple(eps), source="api", window_s=10.0), capacity


def policy_rows(obs: Observation, capacity_hint: np.ndarray, slo_ms: float | None = None) -> np.ndarray:
    """What the controller (and ``POST /api/policy/score``) sends the Policy deployment."""
    slo = RewardWeights().slo_ms if slo_ms is None else slo_ms
    n = len(obs.endpoints)
    rps = np.array([e.rps for e in obs.endpoints], dtype=np.float64)
    ctx = PolicyContext(np.full(n, 1.0 / n), capacity_hint, np.ones(n), float(np.nansum(rps)), critical_count(n))
    est, _ = observe_only(obs, ctx, Knobs(k=critical_count(n), slo_ms=slo))
    return encode(obs, est.capacity, n, slo)


def score_request(obs: Observation, capacity_hint: np.ndarray) -> dict[str, Any]:
    """The same observation as a ``ScoreRequest`` body (unknown values as null)."""

    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "endpoints": [
            {
                "address": e.address,
                "p50_ms": num(e.p50_ms),
                "p95_ms": num(e.p95_ms),
                "error_rate": num(e.error_rate),
                "saturation": num(e.saturation),
                "inflight": num(e.inflight),
                "rps": num(e.rps),
                "cost_per_million": num(e.cost_per_million),
                "weight": num(e.weight),
                "healthy": e.healthy,
                "capacity_rps": num(float(c)),
            }
            for e, c in zip(obs.endpoints, capacity_hint)
        ]
    }


def decision_stats(
    decisions: Sequence[dict[str, Any]], since: float = 0.0, window: tuple[float, float] | None = None
) -> dict[str, Any]:
    """``step_ms`` of the decisions taken at or after ``since`` (epoch s). The headline
    p50/p99 covers full decisions (mode policy or baseline: lease, observe, decide, push
    or "unchanged", ACK); hold (telemetry blind) and standby steps are only counted.
    ``window`` (epoch s): also split the full decisions into inside / outside it."""
    rows = [d for d in decisions if d.get("timestamp", 0) >= since and d.get("step_ms") is not None]
    full = [d for d in rows if d.get("mode") in ("policy", "baseline")]
    s = summary([d["step_ms"] for d in full])
    out: dict[str, Any] = {
        "p50": s["p50"],
        "p99": s["p99"],
        "mean": s["mean"],
        "max": s["max"],
        "decisions": len(full),
        "pushed": summary([d["step_ms"] for d in full if d.get("pushed")]),
        "unchanged": summary([d["step_ms"] for d in full if not d.get("pushed")]),
        "push_ms": summary([d["push_ms"] for d in full if d.get("push_ms") is not None]),
        "ack_ms": summary([d["ack_ms"] for d in full if d.get("ack_ms") is not None]),
        # The policy's share of each decision: scored in the Controller replica.
        "score_ms": summary([d["score_ms"] for d in full if d.get("score_ms") is not None]),
        "by_mode": dict(Counter(d.get("mode", "?") for d in rows)),
        "by_source": dict(Counter(d.get("source", "?") for d in full)),
        "errors": sum(1 for d in rows if d.get("error")),
        "slowest": [
            {
                k: d.get(k)
                for k in ("seq", "timestamp", "mode", "source", "step_ms", "score_ms", "push_ms", "ack_ms", "pushed")
            }
            for d in sorted(full, key=lambda d: -d["step_ms"])[:3]
        ],
    }
    if window is not None:
        inside = [d["step_ms"] for d in full if window[0] <= d.get("timestamp", 0) <= window[1]]
        outside = [d["step_ms"] for d in full if not window[0] <= d.get("timestamp", 0) <= window[1]]
        out["during_api_load"] = summary(inside)
        out["outside_api_load"] = summary(outside)
        inw = [d for d in full if window[0] <= d.get("timestamp", 0) <= window[1] and d.get("score_ms") is not None]
        outw = [
            d for d in full if not window[0] <= d.get("timestamp", 0) <= window[1] and d.get("score_ms") is not None
        ]
        # Outside the API phase the bench saturates both cores itself (the inference phase).
        out["score_ms_during_api_load"] = summary([d["score_ms"] for d in inw])
        out["score_ms_outside_api_load"] = summary([d["score_ms"] for d in outw])
    return out


def score_by_window(
    decisions: Sequence[dict[str, Any]], windows: dict[str, tuple[float, float]], interval_s: float
) -> dict[str, Any]:
    """``score_ms`` of the full decisions whose step overlaps each window (a step starts
    at its ``timestamp`` and lasts at most one interval)."""
    full = [d for d in decisions if d.get("mode") in ("policy", "baseline") and d.get("score_ms") is not None]
    return {
        name: summary([d["score_ms"] for d in full if lo - interval_s <= d.get("timestamp", 0) <= hi])
        for name, (lo, hi) in windows.items()
    }


def bench_settings(state_dir: Path, n_endpoints: int = TESTBED_ENDPOINTS, base: Settings | None = None) -> Settings:
    """Settings on free ports (:func:`balanceiq_lab.bench.settings.settings_on_free_ports`), a
    1 s control interval, a decision log that holds the whole run, and a private state dir."""
    s = common_settings(n_endpoints, base, state_dir=state_dir, control_interval_s=CONTROL_INTERVAL_S)
    return s.model_copy(update={"api": s.api.model_copy(update={"host": "127.0.0.1", "decision_log_size": 1000})})


def direct_ingress_targets(target_groups: Sequence[dict[str, Any]], app_name: str, proxy_port: int) -> list[int]:
    """HTTP ports of ``app_name``'s ingress replicas, from Serve's target groups
    (``ServeInstanceDetails.target_groups``, as ``get_serve_details()`` returns them).
    Serve lists the proxy instead while the app has no running replica (and always when
    direct ingress is off): those targets, on ``proxy_port``, are left out."""
    ports = []
    for group in target_groups:
        protocol = str(group.get("protocol", "")).split(".")[-1].upper()
        if protocol != "HTTP" or group.get("app_name") != app_name:
            continue
        for target in group.get("targets", []):
            port = int(target["port"])
            if port != proxy_port and port not in ports:
                ports.append(port)
    return ports


def dig(d: Any, path: str) -> Any:
    """``d["a"]["b"]`` for ``path`` ``"a.b"``; ``None`` if any step is missing."""
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def ratio(new: Any, old: Any, digits: int = 3) -> float | None:
    """``new / old``; ``None`` when either is missing or ``old`` is 0 (0 errors against
    0 errors has no ratio; the two values are reported beside it)."""
    if not isinstance(new, (int, float)) or not isinstance(old, (int, float)) or isinstance(new, bool):
        return None
    if old == 0 or not (math.isfinite(new) and math.isfinite(old)):
        return None
    return round(new / old, digits)


def compare_ratios(
    proxy: dict[str, Any], direct: dict[str, Any], metrics: Sequence[str] = COMPARE_METRICS
) -> dict[str, dict[str, Any]]:
    """Each metric of both runs side by side with ``direct_ingress / proxy``; metrics
    that neither run reports (e.g. ``api_also`` without ``--also-rate``) are left out."""
    out = {}
    for m in metrics:
        a, b = dig(proxy, m), dig(direct, m)
        if a is None and b is None:
            continue
        out[m] = {"proxy": a, "direct_ingress": b, "ratio": ratio(b, a)}
    return out


def last_json_object(stdout: str) -> dict[str, Any]:
    """The last line of ``stdout`` that is a JSON object (anything a library printed
    after it, e.g. at interpreter exit, is skipped); ``{}`` if there is none."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return {}


def bench_argv(
    *,
    endpoints: int,
    duration_s: float,
    rate_rps: float,
    calls: int,
    also_rate_rps: float | None,
    direct_ingress: bool = False,
    mode: str | None = None,
) -> list[str]:
    """Arguments of one ``python -m balanceiq_lab.bench.serve`` run (one ingress mode)."""
    argv = [
        "--json",
        "--endpoints",
        str(endpoints),
        "--duration",
        f"{duration_s:g}",
        "--rate",
        f"{rate_rps:g}",
        "--calls",
        str(calls),
    ]
    if also_rate_rps is not None:
        argv += ["--also-rate", f"{also_rate_rps:g}"]
    if direct_ingress or mode == "direct_ingress":
        argv.append("--direct-ingress")
    elif mode is not None:
        argv += ["--ingress", mode]
    return argv


# -- measurements ------------------------------------------------------------------------


def _timed_calls(fn: Callable[[], Any], n: int, on_done: Callable[[], None] | None = None) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
        if on_done:
            on_done()
    return out


async def open_loop(
    base_url: str,
    paths: Sequence[str],
    rate_rps: float,
    duration_s: float,
    *,
    connections: int = API_CONNECTIONS,
    timeout_s: float = API_TIMEOUT_S,
    on_done: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """GET ``paths`` round-robin on a fixed schedule; latency from the intended send time."""
    schedule = send_schedule(rate_rps, duration_s)
    res = await run_open_loop(
        base_url,
        schedule,
        max_inflight=len(schedule),  # unbounded: every request leaves on time
        timeout_s=timeout_s,
        start_wall=time.time() + 0.05,
        on_progress=None if on_done is None else (lambda _: on_done()),
        requests=[Request(p) for p in paths],
        connections=connections,
        keepalive_s=2.0,  # below uvicorn's 5 s
    )
    s = res.summary()
    ok, path_of = res.ok, [paths[i % len(paths)] for i in range(len(res))]
    by_path: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(path_of):
        by_path[p].append(i)
    size = {path_of[i]: int(res.nbytes[i]) for i in np.flatnonzero(ok)} if res.nbytes is not None else {}
    lat = summary(res.latency_ms)
    return {
        "rps": round(s["ok"] / res.wall_s, 1) if res.wall_s > 0 else None,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "errors": s["errors"],
        "requests": len(schedule),
        "ok": s["ok"],
        "target_rps": rate_rps,
        "duration_s": duration_s,
        "wall_s": round(res.wall_s, 2),
        "error_kinds": s["error_kinds"],
        "status": dict(Counter(str(c) for c in res.status.tolist() if c > 0)),
        "client_send_lag_ms": {k: summary(res.schedule_lag_ms())[k] for k in ("p50", "p99", "max")},
        "by_path": {
            p: {
                **latency_summary(res.latency_ms[idx], 3, keys=("p50", "p99", "max", "n")),
                "errors": int((~ok[idx]).sum()),
                "bytes": size.get(p),
            }
            for p, idx in sorted(by_path.items())
        },
        "connections": connections,
        "method": "open loop: fixed schedule, latency from the intended send time",
    }


def _wait_for_source(client: Any, source: str, timeout_s: float) -> float | None:
    """Epoch time of the controller's first full decision observed from ``source``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = client.get("/api/decisions", params={"limit": 5})
            for d in r.json().get("decisions", []) if r.status_code == 200 else []:
                if d.get("source") == source and d.get("mode") in ("policy", "baseline"):
                    return float(d["timestamp"])
        except Exception:  # the app is starting: any failure here means "not yet"
            pass
        time.sleep(0.5)
    return None


def _calibrate(client: Any, paths: Sequence[str], n: int) -> dict[str, Any]:
    """Closed loop, one connection: the CPU each request of the mix costs the Serve proxy
    and the Controller replica when nothing queues (per request, in ms), and latency."""
    per_path: dict[str, list[float]] = defaultdict(list)
    before = _cpu_by_role()
    t0 = time.perf_counter()
    for i in range(n):
        path = paths[i % len(paths)]
        t = time.perf_counter()
        r = client.get(path)
        per_path[path].append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            raise BenchError(f"GET {path} answered {r.status_code} before any load: {r.text[:200]}")
    wall = time.perf_counter() - t0
    cores = _cpu_delta_by_role(before, wall)
    return {
        "requests": n,
        "closed_loop_rps": round(n / wall, 1),
        "cpu_ms_per_request": {
            r: round(1000 * cores.get(r, 0.0) * wall / n, 2) for r in ("serve_proxy", "controller_replica", "driver")
        },
        "p50_ms_by_path": {p: summary(v)["p50"] for p, v in sorted(per_path.items())},
    }


async def closed_loop(base_url: str, paths: Sequence[str], connections: int, seconds: float) -> dict[str, Any]:
    """``connections`` clients each sending the next request when the last one answered,
    for ``seconds``: the throughput the API saturates at (no timeouts, no backlog)."""
    import aiohttp

    ok = errors = 0
    lat: list[float] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal ok, errors
        i = k
        while loop.time() < end:
            t = loop.time()
            try:
                async with session.get(base_url + paths[i % len(paths)]) as resp:
                    await resp.read()
                    ok, errors = (ok + 1, errors) if 200 <= resp.status < 300 else (ok, errors + 1)
            except (TimeoutError, aiohttp.ClientError):
                errors += 1
            lat.append((loop.time() - t) * 1000)
            i += connections

    t0 = loop.time()
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=2.0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=API_TIMEOUT_S)
    ) as session:
        await asyncio.gather(*(client(session, k) for k in range(connections)))
    wall = loop.time() - t0
    s = summary(lat)
    return {
        "connections": connections,
        "seconds": round(wall, 2),
        "rps": round(ok / wall, 1),
        "errors": errors,
        "p50_ms": s["p50"],
        "p99_ms": s["p99"],
    }


def _batch_metrics(port: int | None) -> dict[float, float] | None:
    """Cumulative bucket counts (``le`` -> count) of Serve's ``serve_actual_batch_size``
    for ``Policy.score``, from Ray's metrics agent; ``None`` if it does not answer.

    Buckets, not ``_sum``: Ray's exporter builds a histogram's sum from bucket midpoints
    (a batch of 1 counts as 0.5), so only the bucket counts are exact."""
    if not port:
        return None
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2.0, trust_env=False).text
    except httpx.HTTPError:
        return None
    cum: dict[float, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        if not fam.name.endswith("serve_actual_batch_size"):
            continue
        for sample in fam.samples:
            labels = sample.labels
            if not sample.name.endswith("_bucket") or labels.get("deployment") != "Policy":
                continue
            if "score" not in labels.get("function_name", ""):
                continue
            cum[float(labels["le"])] += sample.value
    return dict(cum) or None


def _batch_metrics_settled(port: int | None, wait_s: float = 6.0) -> dict[float, float] | None:
    """The metric once it stops changing (exported every second), at most ``wait_s``."""
    last = _batch_metrics(port)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(1.5)
        cur = _batch_metrics(port)
        if cur == last and cur is not None:
            return cur
        last = cur
    return last


def batch_sizes(
    before: dict[float, float] | None, after: dict[float, float]
) -> tuple[dict[str, int], float | None, bool]:
    """Batches by size between two cumulative bucket snapshots: ``({size or range: count},
    mean size, exact)``. Exact when every bucket holds one integer size (the bench asks
    Serve for buckets 1, 2, ..., 32); otherwise the mean uses each range's midpoint."""
    before = before or {}
    counts: dict[str, int] = {}
    total = weighted = 0.0
    exact = True
    lo, prev_cum = 0.0, 0.0
    for le in sorted(after):
        cum = after[le] - before.get(le, 0.0)
        n = cum - prev_cum
        prev_cum = cum
        first = math.floor(lo) + 1
        last = first if math.isinf(le) else math.floor(le)
        lo = le
        if n <= 0 or last < first:
            continue
        if math.isinf(le):
            exact, size, key = False, float(first), f"{first}+"
        elif first == last:
            size, key = float(first), str(first)
        else:
            exact, size, key = False, (first + last) / 2, f"{first}-{last}"
        counts[key] = counts.get(key, 0) + round(n)
        total += n
        weighted += n * size
    return counts, (round(weighted / total, 2) if total else None), exact


def _cpu_by_foreign_process() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process that is not this one or its descendants."""
    me = psutil.Process()
    ours = {me.pid} | {c.pid for c in me.children(recursive=True)}
    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        if p.info["pid"] in ours or p.info["cpu_times"] is None:
            continue
        cmd = " ".join(p.info["cmdline"] or [])[:80] or p.info["name"]
        out[p.info["pid"]] = (cmd, p.info["cpu_times"].user + p.info["cpu_times"].system)
    return out


def _foreign_cpu_delta(before: dict[int, tuple[str, float]], seconds: float) -> dict[str, Any]:
    after = _cpu_by_foreign_process()
    used = []
    for pid, (cmd, cpu) in after.items():
        d = cpu - before.get(pid, (cmd, 0.0))[1]
        if d > 0.05:
            used.append((d, cmd))
    used.sort(reverse=True)
    return {
        "cores": round(sum(d for d, _ in used) / seconds, 2) if seconds > 0 else None,
        "top": [{"cmd": c, "cores": round(d / seconds, 2)} for d, c in used[:3]],
    }


_ROLES = (
    ("ProxyActor", "serve_proxy"),
    (f"ServeReplica:{APP_NAME}:Controller", "controller_replica"),
    (f"ServeReplica:{APP_NAME}:Policy", "policy_replica"),
    ("ServeController", "serve_controller"),
    ("XdsServerActor", "xds_actor"),
)


def _cpu_by_role() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process ("driver": the load generators and the bench)
    and its descendants, by role; the rest of Ray and the testbed is "other"."""
    return cpu_by_role(_ROLES, "driver")


def _cpu_delta_by_role(before: dict[int, tuple[str, float]], seconds: float) -> dict[str, float]:
    return cores_by_role(before, _cpu_by_role(), seconds)


# -- the run -----------------------------------------------------------------------------


def run_serve_bench(
    *,
    endpoints: int = 64,
    duration_s: float = 30.0,
    rate_rps: float = 200.0,
    calls: int = 500,
    direct_ingress: bool = False,
    also_rate_rps: float | None = None,
    console: Console | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """One run in one ingress ``mode`` (default: the replica's own server, as shipped;
    ``direct_ingress=True`` is ``mode="direct_ingress"``)."""
    validate_args(
        endpoints=endpoints, duration_s=duration_s, rate_rps=rate_rps, calls=calls, also_rate_rps=also_rate_rps
    )
    mode = "direct_ingress" if direct_ingress else (mode or DEFAULT_MODE)
    if mode not in MODES:
        raise BenchError(f"unknown ingress mode {mode!r}; use one of {', '.join(MODES)}")
    console = console or Console(stderr=True)
    env = DIRECT_INGRESS_ENV if mode == "direct_ingress" else PROXY_ENV
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init: the local cluster's processes inherit it
    try:
        # Ray's driver prints task errors from its own threads to sys.stdout (e.g. Serve's
        # controller being killed at shutdown); stdout is for the one JSON object only.
        with contextlib.redirect_stdout(sys.stderr):
            return _run(endpoints, duration_s, rate_rps, calls, console, mode, also_rate_rps)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_serve_compare(
    *,
    endpoints: int = 64,
    duration_s: float = 30.0,
    rate_rps: float = 200.0,
    calls: int = 500,
    also_rate_rps: float | None = None,
    console: Console | None = None,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Every ingress mode, one after the other, each in its own ``python -m
    balanceiq_lab.bench.serve`` process (fresh Ray, fresh Serve, fresh testbed; the
    environment decides the mode before anything imports Ray), and the ratios to the proxy."""
    validate_args(
        endpoints=endpoints, duration_s=duration_s, rate_rps=rate_rps, calls=calls, also_rate_rps=also_rate_rps
    )
    console = console or Console(stderr=True)
    runs: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for mode in MODES:
        argv = bench_argv(
            endpoints=endpoints,
            duration_s=duration_s,
            rate_rps=rate_rps,
            calls=calls,
            also_rate_rps=also_rate_rps,
            mode=mode,
        )
        console.rule(f"bench serve: {mode}")
        t = time.monotonic()
        try:
            # stderr (progress, Ray's messages) passes through; stdout is the JSON object.
            proc = subprocess.run(
                [sys.executable, "-m", "balanceiq_lab.bench.serve", *argv],
                stdout=subprocess.PIPE,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            runs[mode] = {"error": f"no result within {timeout_s:g} s"}
            notes.append(f"{mode}: timed out after {timeout_s:g} s")
            continue
        runs[mode] = last_json_object(proc.stdout)
        if proc.returncode != 0 or not runs[mode]:
            runs[mode] = {"error": f"exit status {proc.returncode}; its stderr is above"}
            notes.append(f"{mode}: the run failed (exit status {proc.returncode})")
        runs[mode]["wall_s"] = round(time.monotonic() - t, 1)
        for n in runs[mode].get("notes", []):
            notes.append(f"{mode}: {n}")
    proxy, direct, replica = runs.get("proxy", {}), runs.get("direct_ingress", {}), runs.get("replica_server", {})
    return {
        "bench": "serve-compare",
        "order": list(MODES),
        "ratio_is": "direct_ingress / proxy",
        "ratios": compare_ratios(proxy, direct),
        "ratios_replica_server": {
            m: {"proxy": v["proxy"], "replica_server": v["direct_ingress"], "ratio": v["ratio"]}
            for m, v in compare_ratios(proxy, replica).items()
        },
        "proxy": proxy,
        "direct_ingress": direct,
        "replica_server": replica,
        "notes": notes,
    }


def _direct_ingress_port(client: Any, proxy_port: int, timeout_s: float = 30.0) -> tuple[int, list[dict[str, Any]]]:
    """The Controller replica's own HTTP port, from the Serve controller's target groups
    (they list the proxy until the replica has its port)."""
    deadline = time.monotonic() + timeout_s
    groups: list[dict[str, Any]] = []
    while True:
        groups = client.get_serve_details().get("target_groups") or []
        ports = direct_ingress_targets(groups, APP_NAME, proxy_port)
        if ports:
            return ports[0], groups
        if time.monotonic() > deadline:
            raise BenchError(
                f"direct ingress was requested but after {timeout_s:g} s Serve's target groups name no replica port for "
                f"{APP_NAME!r} (only the proxy): {groups}"
            )
        time.sleep(0.5)


def _replica_env(keys: Sequence[str]) -> dict[str, str | None]:
    """``keys`` as the Controller replica's process sees them (evidence the mode took)."""
    for p in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:{APP_NAME}:Controller" in " ".join(p.cmdline()):
                env = p.environ()
                return {k: env.get(k) for k in keys}
        except psutil.Error:
            continue
    return {}


@dataclass
class _Inference:
    """What the inference phase measured (ms per call, seconds per phase)."""

    handle_ms: list[float]
    http_ms: list[float]
    conc_ms: list[float]
    http_inner: list[float]
    callers: int
    seq_s: float
    conc_s: float
    batches: dict[str, int]
    mean_batch: float | None
    foreign_cpu: dict[str, Any]
    windows: dict[str, tuple[float, float]]
    """Wall-clock (epoch s) start and end of each part of the phase (warm-up, handle, http,
    the batch-metric waits, concurrent)."""


def _start_serve(
    settings: Settings, http_port: int, mode_env: dict[str, str], console: Console, remember: Callable[[], None]
) -> float:
    """A new local Ray cluster, Serve on ``http_port`` and the app on it; the deploy time (s)."""
    import ray
    from ray import serve

    from balanceiq.serve.app import build_app

    # Ray and the app first: the Controller deployment starts the xDS actor, and
    # Envoy only reports ready once it has its clusters from it.
    with console.status("starting a local Ray cluster and Serve"):
        try:
            # address="local": always a new cluster, never one `ray start` left running.
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                namespace="balanceiq-bench",
                # Metrics every second and one histogram bucket per batch size, so
                # the batching figure is exact and ready right after the phase.
                _system_config={"metrics_report_interval_ms": 1000},
                runtime_env={"env_vars": {"RAY_SERVE_BATCH_SIZE_BUCKETS": BATCH_BUCKETS, **mode_env}},
            )
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        except Exception as exc:
            raise BenchError(f"could not start Ray/Serve: {type(exc).__name__}: {exc}") from exc
    remember()
    with console.status("deploying the BalanceIQ app (Policy + Controller)"):
        t_deploy = time.monotonic()
        try:
            serve.run(build_app({"settings": settings}), name=APP_NAME, route_prefix="/")
        except Exception as exc:
            raise BenchError(f"the Serve app did not deploy: {type(exc).__name__}: {exc}") from exc
        deploy_s = time.monotonic() - t_deploy
    remember()
    return deploy_s


def _ingress_url(base: str, http_port: int, ingress: dict[str, Any], mode_env: dict[str, str]) -> str:
    """The URL every HTTP measurement goes to (the replica's own port with direct ingress)."""
    ingress["replica_env"] = _replica_env(list(mode_env))
    if ingress["mode"] == "direct_ingress":
        from ray.serve.context import _get_global_client

        port, groups = _direct_ingress_port(_get_global_client(), http_port)
        base = f"http://127.0.0.1:{port}"
        ingress.update(replica_port=port, proxy_port=http_port, target_groups=groups)
    ingress["url"] = base
    return base


def _background_load(url: str, stop: threading.Event, into: dict[str, Any]) -> threading.Thread:
    """~``BACKGROUND_RPS`` through Envoy until ``stop``, so the controller has real telemetry."""
    from balanceiq_lab.testbed.load import run_load_sync

    def background() -> None:
        res = run_load_sync(
            url, total=int(BACKGROUND_RPS * 900), concurrency=8, max_seconds=900, rate_rps=BACKGROUND_RPS, stop=stop
        )
        into.update(res.to_json())

    loader = threading.Thread(target=background, name="bench-background-load", daemon=True)
    loader.start()
    return loader


def _wait_healthy(client: Any, base: str, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.get("/api/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"the API at {base} did not answer /api/health within {timeout_s:g} s")
        time.sleep(0.2)


def _proxy_still_serves(client: Any, http_port: int) -> bool | str:
    """Serve keeps its proxy on the head node with direct ingress or the replica's own
    server; whether it still routes to the app."""
    import httpx

    try:
        return bool(client.get(f"http://127.0.0.1:{http_port}/api/health").status_code == 200)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


def _measure_inference(
    client: Any, rows: np.ndarray, body: dict[str, Any], endpoints: int, calls: int, console: Console, notes: list[str]
) -> _Inference:
    """Sequential handle calls, sequential HTTP calls, then concurrent handle calls."""
    import ray
    from ray import serve

    policy = serve.get_deployment_handle("Policy", app_name=APP_NAME)
    metrics_port = ray._private.worker.global_worker.node.metrics_export_port
    http_inner: list[float] = []

    def handle_call() -> None:
        out = policy.score.remote(rows).result(timeout_s=10.0)
        if len(out) != endpoints:
            raise BenchError(f"Policy.score returned {len(out)} scores for {endpoints} endpoints")

    def http_call() -> None:
        r = client.post("/api/policy/score", json=body)
        if r.status_code != 200:
            raise BenchError(f"POST /api/policy/score answered {r.status_code}: {r.text[:200]}")
        got = r.json()
        if len(got["scores"]) != endpoints:
            raise BenchError(f"/api/policy/score returned {len(got['scores'])} scores for {endpoints}")
        http_inner.append(float(got["inference_ms"]))

    foreign_inf0, t_inf = _cpu_by_foreign_process(), time.monotonic()
    with progress_bar(console) as progress:
        try:
            task = progress.add_task("warm-up", total=2 * WARMUP_CALLS)
            w0 = time.time()
            _timed_calls(handle_call, WARMUP_CALLS, lambda: progress.advance(task))
            _timed_calls(http_call, WARMUP_CALLS, lambda: progress.advance(task))
            warmup = (w0, time.time())
            http_inner.clear()
            task = progress.add_task(f"handle, N={endpoints}", total=calls)
            t, w0 = time.perf_counter(), time.time()
            handle_ms = _timed_calls(handle_call, calls, lambda: progress.advance(task))
            seq_s = time.perf_counter() - t
            windows = {"warmup": warmup, "handle": (w0, time.time())}
            task = progress.add_task(f"HTTP /api/policy/score, N={endpoints}", total=calls)
            w0 = time.time()
            http_ms = _timed_calls(http_call, calls, lambda: progress.advance(task))
            windows["http"] = (w0, time.time())

            shares = split_calls(calls, CONCURRENT_CALLERS)
            task = progress.add_task(f"handle, {len(shares)} concurrent callers", total=calls)
            w0 = time.time()
            batch0 = _batch_metrics_settled(metrics_port)
            windows["metrics_before"] = (w0, time.time())
            t, w0 = time.perf_counter(), time.time()
            with ThreadPoolExecutor(len(shares)) as pool:
                parts = list(pool.map(lambda k: _timed_calls(handle_call, k, lambda: progress.advance(task)), shares))
            conc_s = time.perf_counter() - t
            windows["concurrent"] = (w0, time.time())
            w0 = time.time()
            batch1 = _batch_metrics_settled(metrics_port)
            windows["metrics_after"] = (w0, time.time())
        except BalanceIQError:
            raise
        except Exception as exc:
            raise BenchError(f"policy inference failed: {type(exc).__name__}: {exc}") from exc
    batches: dict[str, int] = {}
    mean_batch, exact = None, False
    if batch0 is not None and batch1 is not None:
        batches, mean_batch, exact = batch_sizes(batch0, batch1)
    if mean_batch is None:
        notes.append("mean batch size not reported: Ray's metrics agent did not export serve_actual_batch_size")
    elif not exact:
        notes.append("mean batch size estimated from coarse histogram buckets")
    return _Inference(
        handle_ms=handle_ms,
        http_ms=http_ms,
        conc_ms=[x for part in parts for x in part],
        http_inner=http_inner,
        callers=len(shares),
        seq_s=seq_s,
        conc_s=conc_s,
        batches=batches,
        mean_batch=mean_batch,
        foreign_cpu=_foreign_cpu_delta(foreign_inf0, time.monotonic() - t_inf),
        windows=windows,
    )


def _measure_api(
    client: Any, base: str, rate_rps: float, also_rate_rps: float | None, duration_s: float, console: Console
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], tuple[float, float]]:
    """Calibration, then the open-loop phases: results by phase, the last phase's foreign
    CPU and the phases' wall-clock window."""
    with console.status("API calibration: the same mix, closed loop (1, then 16 connections)"):
        c0 = time.time()
        calibration = _calibrate(client, API_PATHS, CALIBRATION_REQUESTS)
        calibration["saturation"] = asyncio.run(closed_loop(base, API_PATHS, SATURATION_CONNECTIONS, 5.0))
        calibration["window"] = [round(c0, 3), round(time.time(), 3)]
    # The lower --also-rate first, so a queue the main rate may leave cannot spill into it.
    phases = ([("api_also", also_rate_rps)] if also_rate_rps is not None else []) + [("api", rate_rps)]
    results: dict[str, dict[str, Any]] = {}
    foreign: dict[str, Any] = {}
    t_phases = time.time()
    for key, rate in phases:
        foreign0, ours0 = _cpu_by_foreign_process(), _cpu_by_role()
        with progress_bar(console) as progress:
            task = progress.add_task(f"API open loop, {rate:g} req/s", total=len(send_schedule(rate, duration_s)))
            t_api = time.monotonic()
            res = asyncio.run(
                open_loop(base, API_PATHS, rate, duration_s, on_done=functools.partial(progress.advance, task))
            )
            api_wall = time.monotonic() - t_api
        foreign = _foreign_cpu_delta(foreign0, api_wall)
        res["cpu_cores_by_process"] = _cpu_delta_by_role(ours0, api_wall)
        res["foreign_cpu_cores"] = foreign["cores"]
        results[key] = res
        if key == "api_also":
            time.sleep(2.0)
    results["api"]["calibration"] = calibration
    return results, foreign, (t_phases, time.time())


def _all_decisions(client: Any) -> list[dict[str, Any]]:
    r = client.get("/api/decisions", params={"limit": 1000})
    if r.status_code != 200:
        raise BenchError(f"GET /api/decisions?limit=1000 answered {r.status_code}: {r.text[:200]}")
    return list(r.json()["decisions"])


def _teardown(client: Any, stack: Any, console: Console, notes: list[str], remember: Callable[[], None]) -> None:
    import ray
    from ray import serve

    from balanceiq.xds.actor import get_actor

    with console.status("tearing down Serve, the xDS actor, Ray and the testbed"):
        if client is not None:
            client.close()
        if ray.is_initialized():  # also after a half-finished ray.init
            remember()
            try:
                serve.shutdown()
            except Exception as exc:  # teardown continues; say what failed
                notes.append(f"serve.shutdown failed: {type(exc).__name__}: {exc}")
            try:
                ray.kill(get_actor())
            except ValueError:
                pass  # never started, or already gone
            except Exception as exc:
                notes.append(f"killing the xDS actor failed: {type(exc).__name__}: {exc}")
            remember()
            ray.shutdown()
        stack.stop()


def _contention_note(cpu: dict[str, Any], phase: str) -> str | None:
    if not (cpu["cores"] and cpu["cores"] > 0.3):
        return None
    return (
        f"other processes on this machine used {cpu['cores']} of {os.cpu_count()} cores during the {phase} "
        f"phase (top: {cpu['top'][0]['cmd']!r}); latencies include that contention"
    )


def _result_notes(
    notes: list[str],
    *,
    inf: _Inference,
    results: dict[str, dict[str, Any]],
    foreign: dict[str, Any],
    decisions_taken: int,
    leftover: Any,
    rate_rps: float,
    mode: str,
) -> None:
    """What a reader of the result must know to trust it (appended to ``notes``)."""
    if decisions_taken == 0:
        notes.append("no full decision (policy/baseline) was taken: telemetry stayed blind; see by_mode")
    if leftover:
        notes.append(f"processes still alive after teardown: {leftover}")
    notes.extend(n for n in (_contention_note(inf.foreign_cpu, "inference"), _contention_note(foreign, "API")) if n)
    handle_p99 = summary(inf.handle_ms)["p99"]
    if handle_p99 is not None and handle_p99 > TARGETS["handle_p99_ms_at_64_endpoints"]:
        notes.append(f"handle p99 {handle_p99} ms is above the 10 ms target")
    api = results["api"]
    if api["errors"]:
        notes.append(f"API errors under load: {api['error_kinds']}")
    also = results.get("api_also")
    if also is not None and (also["errors"] or (also["rps"] or 0) < 0.95 * also["target_rps"]):
        notes.append(
            f"API at --also-rate {also['target_rps']:g} req/s: {also['rps']} req/s, {also['errors']} errors "
            f"{also['error_kinds']}"
        )
    if api["errors"] or (api["rps"] or 0) < 0.95 * rate_rps:
        calibration = api["calibration"]
        per = calibration["cpu_ms_per_request"]
        need = (per["serve_proxy"] + per["controller_replica"]) * rate_rps / 1000
        notes.append(
            f"API below target ({mode}): {api['rps']} of {rate_rps:g} req/s. Unloaded, Serve's HTTP proxy costs "
            f"{per['serve_proxy']} ms and the Controller replica {per['controller_replica']} ms of CPU per request "
            f"(calibration), i.e. {need:.2f} cores at {rate_rps:g} req/s on a {os.cpu_count()}-core machine that also "
            f"runs Envoy, Prometheus, the backends, Ray and the load generators (other processes: {foreign['cores']} cores); "
            f"closed loop with {calibration['saturation']['connections']} connections it saturates at "
            f"{calibration['saturation']['rps']} req/s"
        )


def _inference_report(inf: _Inference, calls: int) -> dict[str, Any]:
    return {
        "windows": {k: [round(a, 3), round(b, 3)] for k, (a, b) in inf.windows.items()},
        "handle": summary(inf.handle_ms),
        "http": {**summary(inf.http_ms), "inside_replica": {k: summary(inf.http_inner)[k] for k in ("p50", "p99")}},
        "concurrent": {
            **summary(inf.conc_ms),
            "callers": inf.callers,
            "calls_per_s": round(calls / inf.conc_s, 1),
            "sequential_calls_per_s": round(calls / inf.seq_s, 1),
            "mean_batch_size": inf.mean_batch,
            "batches_by_size": inf.batches,
            "batching_note": "Serve's own serve_actual_batch_size over the phase; the control loop's 1/s calls are included",
        },
    }


def _run(
    endpoints: int,
    duration_s: float,
    rate_rps: float,
    calls: int,
    console: Console,
    mode: str = DEFAULT_MODE,
    also_rate_rps: float | None = None,
) -> dict[str, Any]:
    import httpx
    import ray

    from balanceiq_lab.stack import Stack

    if ray.is_initialized():
        raise BenchError("Ray is already initialised in this process; the bench starts its own local cluster")
    load0 = os.getloadavg()
    obs, hint = synthetic_observation(endpoints)
    rows, body = policy_rows(obs, hint), score_request(obs, hint)
    notes: list[str] = []
    me = psutil.Process()
    started_pids: set[int] = set()

    def remember_children() -> None:
        started_pids.update(c.pid for c in me.children(recursive=True))

    own_server = mode == "replica_server"
    mode_env = DIRECT_INGRESS_ENV if mode == "direct_ingress" else PROXY_ENV
    ingress: dict[str, Any] = {"mode": mode, "env": mode_env}
    with tempfile.TemporaryDirectory(prefix="balanceiq-bench-serve-") as work:
        settings = bench_settings(Path(work) / "state")
        settings = settings.model_copy(update={"api": settings.api.model_copy(update={"serve_directly": own_server})})
        # Serve's proxy (it also runs with direct ingress, on the head node); with the
        # replica's own server on api.port, on a port of its own as serve_app.yaml has it.
        http_port = free_ports(1)[0] if own_server else settings.api.port
        stop_load = threading.Event()
        loader: threading.Thread | None = None
        load_result: dict[str, Any] = {}
        # The Serve app serves xDS (the Ray actor): the stack has no xDS server of its own.
        stack = Stack(settings, Path(work), xds=False, health_check_interval_s=5)
        client: httpx.Client | None = None
        try:
            deploy_s = _start_serve(settings, http_port, mode_env, console, remember_children)
            base = _ingress_url(f"http://127.0.0.1:{settings.api.port}", http_port, ingress, mode_env)
            with console.status("starting backends, ALS, Envoy and Prometheus"):
                try:
                    stack.start()
                except BalanceIQError as exc:
                    raise BenchError(f"testbed did not start: {exc}") from exc
            remember_children()
            loader = _background_load(stack.listen_url, stop_load, load_result)
            client = httpx.Client(base_url=base, timeout=10.0, trust_env=False)
            _wait_healthy(client, base)
            remember_children()
            if mode in ("direct_ingress", "replica_server"):
                ingress["proxy_port_still_serves"] = _proxy_still_serves(client, http_port)
            # Steady state from here: the app came up before Prometheus did, so its first
            # observations came from Envoy's admin (>= 0.25 s each, by design); the loop
            # returns to Prometheus on its next retry once Prometheus has samples.
            with console.status("waiting for the controller's first decision from Prometheus"):
                t_app = _wait_for_source(client, "prometheus", timeout_s=45.0)
            if t_app is None:
                notes.append("no decision from Prometheus within 45 s of start; decision_loop_ms covers whatever came")
                t_app = time.time()
            inf = _measure_inference(client, rows, body, endpoints, calls, console, notes)
            results, foreign, api_window = _measure_api(client, base, rate_rps, also_rate_rps, duration_s, console)
            decisions = _all_decisions(client)
            remember_children()
        finally:
            stop_load.set()
            if loader is not None:
                loader.join(15)
            _teardown(client, stack, console, notes, remember_children)
        leftover = leftovers(started_pids, 15.0)

    load1 = os.getloadavg()
    dl = decision_stats(decisions, since=t_app, window=api_window)
    _result_notes(
        notes,
        inf=inf,
        results=results,
        foreign=foreign,
        decisions_taken=dl["decisions"],
        leftover=leftover,
        rate_rps=rate_rps,
        mode=mode,
    )
    return _report(
        endpoints=endpoints,
        calls=calls,
        inf=inf,
        results=results,
        foreign=foreign,
        decisions=decisions,
        dl=dl,
        t_app=t_app,
        background=load_result,
        setup={"deploy_s": round(deploy_s, 1), "http_port": http_port, "ingress": ingress},
        loadavg=(load0, load1),
        leftover=leftover,
        notes=notes,
    )


def _report(
    *,
    endpoints: int,
    calls: int,
    inf: _Inference,
    results: dict[str, dict[str, Any]],
    foreign: dict[str, Any],
    decisions: list[dict[str, Any]],
    dl: dict[str, Any],
    t_app: float,
    background: dict[str, Any],
    setup: dict[str, Any],
    loadavg: tuple[Any, Any],
    leftover: Any,
    notes: list[str],
) -> dict[str, Any]:
    load0, load1 = loadavg
    return {
        "bench": "serve",
        "endpoints": endpoints,
        "calls": calls,
        "inference_ms": _inference_report(inf, calls),
        "api": results["api"],
        **({"api_also": results["api_also"]} if "api_also" in results else {}),
        "decision_loop_ms": {
            **dl,
            "interval_s": CONTROL_INTERVAL_S,
            "testbed_endpoints": TESTBED_ENDPOINTS,
            "startup_decisions_excluded": sum(1 for d in decisions if d.get("timestamp", 0) < t_app),
            # The API's closed-loop calibration keeps the replica's API thread busy.
            "score_ms_by_inference_phase": score_by_window(
                decisions,
                {**inf.windows, "api_calibration": tuple(results["api"]["calibration"]["window"])},
                CONTROL_INTERVAL_S,
            ),
        },
        "background_load": {k: background.get(k) for k in ("sent", "ok", "failed", "rps", "p99_ms")},
        "setup": setup,
        "machine": {
            "cpu_count": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in load1],
            "foreign_cpu_during_inference": inf.foreign_cpu,
            "foreign_cpu_during_api": foreign,
        },
        "leftover_processes": leftover,
        "notes": notes,
        "targets": TARGETS,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m balanceiq_lab.bench.serve``: one run (one JSON object on stdout), or
    ``--compare`` (both ingress modes). The CLI's ``balanceiq bench serve`` is the same."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m balanceiq_lab.bench.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--endpoints", type=int, default=64)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--also-rate", type=float, default=None, help="a second, earlier API phase at this rate")
    ap.add_argument("--direct-ingress", action="store_true", help="Ray Serve direct ingress (no proxy hop)")
    ap.add_argument("--ingress", choices=MODES, default=None, help="ingress mode (default: replica_server, as shipped)")
    ap.add_argument("--compare", action="store_true", help="both ingress modes, each with a fresh Ray; ratios")
    ap.add_argument("--json", action="store_true", help="compact JSON (one line)")
    a = ap.parse_args(argv)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    kw = {
        "endpoints": a.endpoints,
        "duration_s": a.duration,
        "rate_rps": a.rate,
        "calls": a.calls,
        "also_rate_rps": a.also_rate,
        "console": console,
    }
    try:
        if a.compare and a.direct_ingress:
            raise BenchError("--compare runs both modes; leave out --direct-ingress")
        result = (
            run_serve_compare(**kw)
            if a.compare
            else run_serve_bench(direct_ingress=a.direct_ingress, mode=a.ingress, **kw)
        )
    except BalanceIQError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    sys.stdout.write(json.dumps(result, indent=None if a.json else 2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
