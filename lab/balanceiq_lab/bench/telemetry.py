"""`balanceiq bench telemetry`: how fast, fresh and accurate observations are.

One run, everything real: N sample backends with known ("injected") latency and error
rates, Envoy with the ALS latency source, Prometheus scraping every second, and a steady
background load. Then:

* ``observe_ms``: wall time of one observation of all N endpoints, from Prometheus and
  from the Envoy-admin fallback (steady state: the fallback already holds a scrape);
* ``staleness_s``: age of the newest sample behind each endpoint (median, max);
* ``p95_abs_error_ms`` / ``error_rate_abs_error``: observed vs injected ground truth
  (ground truth p95 = base latency + 0.95 x jitter; queueing is avoided by generous
  backend concurrency, so the injected numbers are the truth);
* ``latency_source_overhead``: a separate 3-backend stack with two Envoys side by side,
  one streaming access logs and one not, under the same closed-loop load, alternated:
  throughput ratio (on / off) and Envoy CPU seconds per 1,000 requests (on / off).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from balanceiq.config import Settings, settings_from_dict
from balanceiq.telemetry.envoy_admin import EnvoyAdminSource
from balanceiq.telemetry.observe import Telemetry
from balanceiq.testbed.ports import free_ports
from balanceiq_lab.bench.settings import CLOUDS
from balanceiq_lab.bench.xds import _pct
from balanceiq_lab.errors import BenchError
from balanceiq_lab.results import latency_summary
from balanceiq_lab.stack import Stack
from balanceiq_lab.testbed.envoy import EnvoyProcess, lab_bootstrap
from balanceiq_lab.testbed.load import run_load_sync
from balanceiq_lab.testbed.testbed import backend_specs

TARGETS = {"observe_ms_at_100_endpoints": 50.0, "p95_abs_error_ms": 10.0}


def telemetry_settings(
    n: int,
    *,
    window_s: float,
    latency_ms: list[float] | None = None,
    error_rates: list[float] | None = None,
    als: bool = True,
) -> Settings:
    latency_ms = latency_ms or [10.0 + 10.0 * (i % 10) for i in range(n)]
    error_rates = error_rates or [(0.1 if i % 5 == 4 else 0.0) for i in range(n)]
    endpoints, overrides = [], {}
    ports = iter(free_ports(n + 7))
    for i in range(n):
        cloud, region, cost = CLOUDS[i % 3]
        address = f"127.0.0.1:{next(ports)}"
        endpoints.append({"address": address, "cloud": cloud, "region": region, "cost_per_million_requests": cost})
        overrides[address] = {"base_latency_ms": latency_ms[i], "error_rate": error_rates[i], "concurrency": 256}
    return settings_from_dict(
        {
            "clusters": [{"name": "my_service", "endpoints": endpoints}],
            "xds": {"port": next(ports)},
            "envoy": {"admin_url": f"http://127.0.0.1:{next(ports)}", "listen_port": next(ports)},
            "prometheus": {"url": f"http://127.0.0.1:{next(ports)}", "scrape_interval_s": 1},
            "telemetry": {
                "window_s": window_s,
                "stale_after_s": 5,
                "als_enabled": als,
                "als_grpc_port": next(ports),
                "als_metrics_port": next(ports),
            },
            "testbed": {"overrides": overrides},
        },
        source="bench",
    )


def run_telemetry_bench(
    *, endpoints: int = 100, samples: int = 20, rate_rps: float = 250.0, console: Console | None = None
) -> dict[str, Any]:
    if endpoints < 1 or samples < 1 or rate_rps <= 0:
        raise BenchError("--endpoints >= 1, --samples >= 1 and --rate > 0 are required")
    console = console or Console(stderr=True)
    window_s = 10.0
    settings = telemetry_settings(endpoints, window_s=window_s)
    specs = {s["name"]: s for s in backend_specs(settings)}
    truth_p95 = {a: s["base_latency_ms"] + 0.95 * 1.0 for a, s in specs.items()}  # jitter U(0, 1 ms)
    truth_err = {a: s["error_rate"] for a, s in specs.items()}

    with tempfile.TemporaryDirectory(prefix="balanceiq-bench-tel-") as work:
        stop = threading.Event()
        with console.status(f"starting {endpoints} backends, Envoy, ALS and Prometheus"):
            stack = Stack(settings, Path(work), health_check_interval_s=300).start()
        try:
            loader = threading.Thread(
                target=run_load_sync,
                args=(stack.listen_url,),
                kwargs={"total": 10**7, "concurrency": 48, "max_seconds": 600, "rate_rps": rate_rps, "stop": stop},
                daemon=True,
            )
            loader.start()
            als = stack.testbed.als
            telemetry = Telemetry(settings, als_metrics_url=als.metrics_url if als else None)
            fallback = EnvoyAdminSource(settings.envoy.admin_url, als_metrics_url=als.metrics_url if als else None)
            addrs, costs = telemetry.addresses, telemetry.costs
            warm_s = window_s + 5
            with Progress(
                TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console, transient=True
            ) as progress:
                task = progress.add_task("warming up (one rate window)", total=warm_s)
                t0 = time.monotonic()
                while (elapsed := time.monotonic() - t0) < warm_s:
                    progress.update(task, completed=elapsed)
                    time.sleep(0.25)
                task = progress.add_task("observing", total=samples)
                prom_ms, fb_ms, last = [], [], None
                fallback.observe("my_service", addrs, costs)  # holds a scrape from here on
                time.sleep(0.5)  # as between the samples below: no sample waits for a window
                for _ in range(samples):
                    t = time.perf_counter()
                    last = telemetry.observe()
                    prom_ms.append((time.perf_counter() - t) * 1000)
                    if last.source != "prometheus":
                        raise BenchError(f"Prometheus did not answer: {last.errors}")
                    t = time.perf_counter()
                    fb = fallback.observe("my_service", addrs, costs)
                    fb_ms.append((time.perf_counter() - t) * 1000)
                    progress.advance(task)
                    time.sleep(0.5)
            served, served_p95 = _served(telemetry, window_s)
            telemetry.close()
            fallback.close()
        finally:
            stop.set()
            stack.stop()
        assert last is not None
        usable = [e for e in last.endpoints if e.usable and math.isfinite(e.p95_ms)]
        p95_err = [abs(e.p95_ms - truth_p95[e.address]) for e in usable]
        err_err = [abs(e.error_rate - truth_err[e.address]) for e in usable if math.isfinite(e.error_rate)]
        served_err = [
            abs(e.error_rate - served[e.address]) for e in usable if math.isfinite(e.error_rate) and e.address in served
        ]
        served_p95_err = [abs(e.p95_ms - served_p95[e.address]) for e in usable if e.address in served_p95]
        worst = sorted(usable, key=lambda e: -abs(e.error_rate - truth_err[e.address]))[:3]
        worst_err = [
            {
                "address": e.address,
                "injected": truth_err[e.address],
                "observed": round(e.error_rate, 4),
                "rps": round(e.rps, 2),
                "healthy": e.healthy,
            }
            for e in worst
        ]
        ages = [e.age_s for e in last.endpoints if math.isfinite(e.age_s)]
        fb_usable = sum(1 for e in fb.endpoints if e.usable)
        overhead = _overhead(Path(work) / "overhead", console)

    return {
        "bench": "telemetry",
        "endpoints": endpoints,
        "samples": samples,
        "load_rps": {
            "target": rate_rps,
            "achieved": round(sum(e.rps for e in last.endpoints if math.isfinite(e.rps)), 1),
        },
        "window_s": window_s,
        "scrape_interval_s": settings.prometheus.scrape_interval_s,
        "observe_ms": {"prometheus": _pct(prom_ms), "fallback": _pct(fb_ms)},
        "usable_endpoints": {"prometheus": len(usable), "fallback": fb_usable},
        "staleness_s": {
            "median": round(statistics.median(ages), 3) if ages else None,
            "max": round(max(ages), 3) if ages else None,
        },
        # Against the injected base latency (+ jitter): holds while the backends' process
        # is not CPU-starved; and against the p95 the backends measured themselves.
        "p95_abs_error_ms": _summary(p95_err),
        "p95_abs_error_ms_vs_served": _summary(served_p95_err),
        # Against the injected probability: includes binomial noise of the few requests
        # each endpoint gets per window (see "requests_per_endpoint_window").
        "error_rate_abs_error": {**_summary(err_err, digits=4), "worst": worst_err},
        # Against what the backends say they served (their own counters): measurement error.
        "error_rate_abs_error_vs_served": _summary(served_err, digits=4),
        "requests_per_endpoint_window": round(statistics.fmean(e.rps for e in usable) * window_s, 1)
        if usable
        else None,
        "latency_source_overhead": overhead,
        "targets": TARGETS,
    }


def _served(telemetry: Telemetry, window_s: float) -> tuple[dict[str, float], dict[str, float]]:
    """What the backends say they served over the window, from their own /metrics via
    Prometheus: 5xx fraction, and p95 in ms (which includes the backend's own event-loop
    delays when the machine is busy, unlike the injected base latency)."""
    w = f"{window_s:g}s"
    errors = (
        f'sum by (backend) (rate(backend_requests_total{{code=~"5.."}}[{w}])) / '
        f"sum by (backend) (rate(backend_requests_total[{w}]))"
    )
    p95 = f"histogram_quantile(0.95, sum by (backend, le) (rate(backend_request_duration_seconds_bucket[{w}]))) * 1000"
    return _by_backend(telemetry, errors), _by_backend(telemetry, p95)


def _by_backend(telemetry: Telemetry, q: str) -> dict[str, float]:
    try:
        result = telemetry.prometheus._prom.custom_query(q)
    except Exception as exc:  # a cross-check that cannot run must say so, not pass
        raise BenchError(f"could not read the backends' own numbers: {exc}") from exc
    out = {}
    for item in result:
        try:
            out[item["metric"]["backend"]] = float(item["value"][1])
        except (KeyError, ValueError, IndexError):
            continue
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _summary(values: list[float], digits: int = 2) -> dict[str, float | None]:
    # p90 by nearest rank (the value at index int(0.9 n) of the sorted sample).
    return latency_summary(values, digits, keys=("mean", "p90", "max", "n"), method="higher")


def _overhead(work: Path, console: Console, rounds: int = 2, seconds: float = 4.0) -> dict[str, Any]:
    """Two Envoys on one xDS server and the same 3 zero-latency backends, ALS on vs off:
    a stack without Prometheus (its Envoy streams access logs) and a second Envoy that
    does not."""
    settings = telemetry_settings(3, window_s=10, latency_ms=[0.0, 0.0, 0.0], error_rates=[0.0] * 3)
    spare = iter(free_ports(2))
    off_settings = settings.model_copy(
        update={"telemetry": settings.telemetry.model_copy(update={"als_enabled": False})}
    )

    def node_on(bootstrap: dict[str, Any]) -> None:
        bootstrap["node"]["id"] = "als-on"

    stack = Stack(settings, work, prometheus=False, health_check_interval_s=300, envoy_bootstrap=node_on)
    on = stack.testbed.envoy
    off = EnvoyProcess(
        lab_bootstrap(
            off_settings,
            node_id="als-off",
            admin_port=next(spare),
            listen_port=next(spare),
            health_check_interval_s=300,
        ),
        workdir=work / "off",
    )
    stats: dict[str, dict[str, float]] = {
        "on": {"requests": 0, "seconds": 0, "cpu_s": 0},
        "off": {"requests": 0, "seconds": 0, "cpu_s": 0},
    }
    try:
        with console.status("latency-source overhead: ALS on vs off, alternating"):
            stack.start()
            stack.defer(off.stop)
            off.start()
            for _ in range(rounds):
                for name, envoy in (("on", on), ("off", off)):
                    proc = psutil.Process(envoy.pid)
                    cpu0 = sum(proc.cpu_times()[:2])
                    res = run_load_sync(envoy.listen_url, total=10**6, concurrency=32, max_seconds=seconds)
                    stats[name]["cpu_s"] += sum(proc.cpu_times()[:2]) - cpu0
                    stats[name]["requests"] += res.ok
                    stats[name]["seconds"] += res.elapsed_s
    finally:
        stack.stop()
    rps = {k: v["requests"] / v["seconds"] for k, v in stats.items()}
    cpu_per_k = {k: 1000 * v["cpu_s"] / max(1, v["requests"]) for k, v in stats.items()}
    return {
        "throughput_rps": {k: round(v, 1) for k, v in rps.items()},
        "throughput_ratio_on_over_off": round(rps["on"] / rps["off"], 3),
        "envoy_cpu_s_per_1k_requests": {k: round(v, 4) for k, v in cpu_per_k.items()},
        "envoy_cpu_ratio_on_over_off": round(cpu_per_k["on"] / cpu_per_k["off"], 3),
        "method": f"closed loop, 32 connections, {rounds} alternating rounds of {seconds:g}s per Envoy",
    }
