"""`balanceiq demo` / `make demo`: the whole loop on one machine, driven by the policy.

Starts, from nothing: a local Ray (2 CPUs), six sample backends in three "clouds", Envoy,
Prometheus and the ALS collector (the testbed), then the Serve application (Policy and
Controller deployments, the API and dashboard) with the shipped checkpoint. A bounded,
open-loop load runs through Envoy while a live scenario is replayed (by default one cloud
degrades while another gets dearer). Each control interval prints one line: the traffic
share and p95 per cloud, the blended price and what the controller did. At the end (or on
Ctrl-C) everything is stopped, and a JSON report and a PNG go to ``--out-dir``.

The controller is the product's, reached the way a user reaches it: over HTTP. Price
changes in the scenario are sent with ``PUT /api/policy`` (what a billing feed would do).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from balanceiq.config import Settings
from balanceiq.exceptions import TestbedError
from balanceiq.testbed.ports import check_ports_free, free_ports
from balanceiq_lab.stability import reversal_events
from balanceiq_lab.stack import BackgroundLoad, Stack
from balanceiq_lab.testbed.load import LoadResult
from balanceiq_lab.testbed.scenario import LiveScenario, ScenarioDriver

APP_NAME = "balanceiq"
SECOND_CLUSTER = "checkout"


def with_second_cluster(settings: Settings, name: str = SECOND_CLUSTER) -> Settings:
    """``settings`` plus a cluster ``name`` of three backends on free ports, one in each
    of the first cluster's first three clouds (same behaviour and prices), so the demo
    shows two clusters steered through one Envoy."""
    template = settings.clusters[0].endpoints
    if any(c.name == name for c in settings.clusters):
        return settings
    picked = list({ep.cloud: ep for ep in template}.values())[:3] or template[:1]
    eps = [
        ep.model_copy(update={"address": f"127.0.0.1:{port}", "capacity_rps": ep.capacity_rps})
        for ep, port in zip(picked, free_ports(len(picked)))
    ]
    second = settings.clusters[0].model_copy(update={"name": name, "endpoints": eps})
    return settings.model_copy(update={"clusters": [*settings.clusters, second]})


def _other_clusters(http: httpx.Client, api_url: str, names: list[str]) -> dict[str, Any]:
    """Each further cluster's weights and last decision, as the API shows them."""
    out = {}
    for name in names:
        w = http.get(api_url + "/api/weights", params={"cluster": name}).json()
        ds = http.get(api_url + "/api/decisions", params={"cluster": name, "limit": 1}).json()["decisions"]
        out[name] = {
            "shares": {e["address"]: e["share"] for e in w["endpoints"]},
            "version": w.get("version"),
            "decision": ds[0] if ds else None,
        }
    return out


def _price_feed(http: httpx.Client, api_url: str, token: str) -> Callable[[dict[str, float]], None]:
    """Tell the controller new prices the way a billing feed would: ``PUT /api/policy``."""

    def send(prices: dict[str, float]) -> None:
        r = http.put(api_url + "/api/policy", json={"costs": prices}, headers={"Authorization": f"Bearer {token}"})
        if r.status_code != 200:
            raise TestbedError(f"PUT /api/policy costs refused ({r.status_code}): {r.text[:300]}")

    return send


def _wait_ready(http: httpx.Client, url: str, timeout: float = 90.0) -> dict[str, Any]:
    """Until the controller has pushed weights and Envoy has ACKed them."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            s = http.get(url + "/api/status").json()
            last = s
            if s["components"]["xds"]["state"] == "up" and s["components"]["controller"]["state"] in ("up", "degraded"):
                return s
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TestbedError(f"the Serve app did not come up within {timeout:.0f}s; last status: {str(last)[:500]}")


def _by_cloud(weights: dict[str, Any], clouds: dict[str, str]) -> dict[str, dict[str, float | None]]:
    """Share, rps-weighted p95, error rate and price ($ per million requests, weighted by
    share; the plain mean when the cloud has no share) per cloud from one GET /api/weights."""
    agg: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in weights["endpoints"]:
        c = agg[clouds[e["address"]]]
        c["share"] += e["share"]
        if e.get("cost_per_million") is not None:
            c["price_w"] += e["cost_per_million"] * e["share"]
            c["price_sum"] += e["cost_per_million"]
            c["price_n"] += 1
        rps = e["rps"] or 0.0
        if e["p95_ms"] is not None and rps > 0:
            c["p95_w"] += e["p95_ms"] * rps
            c["rps"] += rps
        if e["error_rate"] is not None and rps > 0:
            c["err_w"] += e["error_rate"] * rps
    out: dict[str, dict[str, float | None]] = {}
    for cloud, c in agg.items():
        out[cloud] = {
            "share": c["share"],
            "p95_ms": c["p95_w"] / c["rps"] if c["rps"] else None,
            "error_rate": c["err_w"] / c["rps"] if c["rps"] else None,
            "cost_per_million": (c["price_w"] / c["share"] if c["share"] > 0 else c["price_sum"] / c["price_n"])
            if c["price_n"]
            else None,
        }
    return out


def _blended_cost(weights: dict[str, Any]) -> float | None:
    rows = [(e["rps"] or 0.0, e["cost_per_million"]) for e in weights["endpoints"] if e["cost_per_million"] is not None]
    total = sum(r for r, _ in rows)
    return sum(r * c for r, c in rows) / total if total else None


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _line(
    t: float,
    phase: str,
    w: dict[str, Any],
    d: dict[str, Any] | None,
    clouds: list[str],
    cost: float | None,
    per_cloud: dict[str, dict[str, float | None]],
) -> str:
    shares = " ".join(f"{c} {_fmt((per_cloud.get(c) or {}).get('share', 0) * 100):>3}%" for c in clouds)  # type: ignore[operator]
    p95 = " ".join(f"{c} {_fmt((per_cloud.get(c) or {}).get('p95_ms')):>4}" for c in clouds)
    what = ""
    if d:
        crit = ",".join(a.rsplit(":", 1)[-1] for a in d["critical"]) or "-"
        moved = _fmt(d["moved"] * 100 if d["moved"] is not None else None)
        what = f"{d['mode']:<8} crit {crit:<11} moved {moved:>2}%" + (f"  {d['notes'][0][:60]}" if d["notes"] else "")
    return f"t={t:5.0f}s  {phase[:18]:<18} share {shares}  p95ms {p95}  ${_fmt(cost, '.3f')}/M  {what}"


def _deploy(settings: Settings, out_dir: Path) -> None:
    from ray import serve

    from balanceiq.serve.app import build_app

    # The API on api.port is the Controller replica's own server (as with
    # `serve run serve_app.py`); Serve's proxy takes a port of its own.
    proxy_port = free_ports(1)[0]
    serve.start(http_options={"host": settings.api.host, "port": proxy_port})
    # Every decision with the observation it saw: what `balanceiq calibrate`
    # fits, and what a decision can be replayed from offline.
    recording = out_dir.resolve() / "demo-decisions.jsonl"
    recording.unlink(missing_ok=True)
    serve.run(build_app({"settings": settings, "recording": str(recording)}), name=APP_NAME, route_prefix="/")


def _announce(settings: Settings, api_url: str, proxy_url: str, console: Console) -> str:
    """Print where the dashboard, API and proxy are; the API token."""
    token_file = Path(settings.state_dir) / "api-token"
    token = settings.api.token or token_file.read_text().strip()
    console.print(f"[bold green]dashboard[/]: {api_url}/   API docs: {api_url}/docs   proxy: {proxy_url}")
    console.print(
        f"API token: in {token_file if not settings.api.token else 'the config (api.token)'}"
        f'  e.g. curl -H "Authorization: Bearer $(cat {token_file})" ...'
    )
    return token


def _start_loads(
    stack: Stack, others: list[str], rate_rps: float, duration: float, console: Console
) -> tuple[BackgroundLoad, list[BackgroundLoad]]:
    """Load on the first cluster at ``rate_rps``; on each further one (behind "/<name>/") at half."""
    max_s = duration + 10
    loader = stack.bounded_load(rate_rps=rate_rps, max_s=max_s, concurrency=32)
    loaders = [stack.bounded_load(name, rate_rps=rate_rps / 2, max_s=max_s, concurrency=16) for name in others]
    if others:
        console.print(
            f"also steering {', '.join(others)} (steady load at {rate_rps / 2:.0f} req/s each, "
            f"behind {stack.listen_url}/<cluster>/)"
        )
    return loader, loaders


def _replay(
    scenario: LiveScenario,
    driver: ScenarioDriver,
    http: httpx.Client,
    api_url: str,
    interval: float,
    clouds: dict[str, str],
    others: list[str],
    report: dict[str, Any],
    out: Console,
) -> None:
    """Play the scenario's events on time; one line (and one report interval) per control interval."""
    cloud_names = list(dict.fromkeys(clouds.values()))
    duration = scenario.duration_s
    t0 = time.monotonic()
    pending = list(scenario.events)
    next_line = interval
    last_seq = 0
    while (t := time.monotonic() - t0) < duration:
        while pending and pending[0].at_s <= t:
            ev = pending.pop(0)
            hit = driver.apply(ev)
            report["events"].append({"t": round(t, 1), "name": ev.name, "endpoints": hit})
            out.print(f"[bold yellow]t={t:5.0f}s  event: {ev.name}[/] ({', '.join(hit)})")
        if t >= next_line:
            next_line += interval
            w = http.get(api_url + "/api/weights").json()
            ds = http.get(api_url + "/api/decisions", params={"limit": 1}).json()["decisions"]
            d = ds[0] if ds and ds[0]["seq"] != last_seq else None
            last_seq = ds[0]["seq"] if ds else last_seq
            per_cloud = _by_cloud(w, clouds)
            cost = _blended_cost(w)
            phase = scenario.phase_at(t)
            out.print(_line(t, phase, w, d, cloud_names, cost, per_cloud), highlight=False, soft_wrap=True)
            report["intervals"].append(
                {
                    "t": round(t, 1),
                    "phase": phase,
                    "clouds": per_cloud,
                    "cost_per_million": cost,
                    "weights": {e["address"]: e["weight"] for e in w["endpoints"]},
                    "shares": {e["address"]: e["share"] for e in w["endpoints"]},
                    "decision": d,
                    **({"others": _other_clusters(http, api_url, others)} if others else {}),
                }
            )
        time.sleep(0.1)


def _stop_ray(console: Console) -> None:
    import ray
    from ray import serve

    from balanceiq.xds.actor import get_actor

    with console.status("stopping Serve, the xDS actor and Ray"):
        try:
            serve.shutdown()
        except Exception as exc:  # shutting down: report, keep cleaning up
            console.print(f"[yellow]serve shutdown: {exc}[/]")
        try:
            ray.kill(get_actor(), no_restart=True)
        except (ValueError, ray.exceptions.RayError):
            pass
        ray.shutdown()


def run_demo(
    settings: Settings,
    scenario: LiveScenario,
    *,
    rate_rps: float,
    out_dir: Path,
    console: Console,
    out: Console | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the report (also written to ``out_dir/demo-report.json``).
    The scenario plays on the first cluster; any other is steered under steady load."""
    import ray

    out = out or Console()
    cluster = settings.clusters[0]
    scenario.check_targets(list(cluster.endpoints))
    check_ports_free(settings, api=True)
    clouds = {ep.address: ep.cloud for ep in cluster.endpoints}
    cloud_names = list(dict.fromkeys(clouds.values()))
    api_url = f"http://{settings.api.host}:{settings.api.port}"
    others = [c.name for c in settings.clusters[1:]]
    report: dict[str, Any] = {
        "scenario": scenario.model_dump(),
        "intervals": [],
        "events": [],
        "clusters": [c.name for c in settings.clusters],
    }
    interrupted = False

    with tempfile.TemporaryDirectory(prefix="balanceiq-demo-") as tmp:
        work = Path(tmp)
        # A fresh state dir: the demo must not inherit weights from an earlier run.
        settings = settings.model_copy(update={"state_dir": work / "state"})
        # The Serve app serves xDS (the Ray actor): the stack has no xDS server of its own.
        stack = Stack(settings, work, xds=False)
        loader: BackgroundLoad | None = None
        loaders: list[BackgroundLoad] = []
        driver: ScenarioDriver | None = None
        ray_started = False
        try:
            with console.status("starting Ray (local, 2 CPUs)"):
                ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=APP_NAME)
                ray_started = True
            n_eps = sum(len(c.endpoints) for c in settings.clusters)
            where = f"{len(settings.clusters)} clusters" if others else "3 clouds"
            with console.status(f"starting {n_eps} backends in {where}, Envoy, Prometheus and the ALS collector"):
                stack.start()
            with console.status("deploying the Serve app (Policy + Controller) with the shipped checkpoint"):
                _deploy(settings, out_dir)
            http = httpx.Client(timeout=10.0, trust_env=False)
            token = _announce(settings, api_url, stack.listen_url, console)
            driver = ScenarioDriver(
                list(cluster.endpoints), stack.backend_urls, on_prices=_price_feed(http, api_url, token)
            )
            with console.status("waiting for the first decision and Envoy's ACK"):
                _wait_ready(http, api_url)

            duration = scenario.duration_s
            loader, loaders = _start_loads(stack, others, rate_rps, duration, console)
            console.print(
                f"replaying [bold]{scenario.name}[/] for {duration:.0f}s at {rate_rps:.0f} req/s "
                f"(Ctrl-C stops everything)"
            )
            _replay(scenario, driver, http, api_url, settings.control.interval_s, clouds, others, report, out)
            report["status"] = http.get(api_url + "/api/status").json()
            http.close()
        except KeyboardInterrupt:
            interrupted = True
            console.print("[yellow]Ctrl-C: stopping everything[/]")
        finally:
            stack.stop_loads(30)
            if driver is not None:
                driver.close()
            if ray_started:
                _stop_ray(console)
            with console.status("stopping the testbed"):
                stack.stop()

    report["interrupted"] = interrupted
    report["load"] = loader.result.to_json() if loader is not None and loader.result is not None else None
    if others:
        other_load = [x.result for x in loaders if x.result is not None]
        report["others"] = _summarise_others(report["intervals"], others, other_load)
    report["phases"] = summarise(report["intervals"], cloud_names)
    report["reversals"] = sum(p["reversals"] for p in report["phases"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo-report.json").write_text(json.dumps(report, indent=1, default=str))
    if report["intervals"]:
        plot(report, cloud_names, out_dir / "demo.png")
    _print_summary(report, cloud_names, console, out_dir)
    return report


def _summarise_others(intervals: list[dict[str, Any]], names: list[str], loads: list[LoadResult]) -> dict[str, Any]:
    """Per further cluster: decisions seen, how many were pushed and ACKed, reversals."""
    out: dict[str, Any] = {}
    for name in names:
        rows = [r["others"][name] for r in intervals if name in r.get("others", {})]
        ds = {d["seq"]: d for d in (r["decision"] for r in rows) if d}
        out[name] = {
            "decisions": len(ds),
            "pushed": sum(1 for d in ds.values() if d.get("pushed")),
            "acked": sum(1 for d in ds.values() if d.get("acked")),
            "last_version": rows[-1]["version"] if rows else None,
            "reversals": len(reversal_events([r["shares"] for r in rows])),
        }
    out["load"] = [x.to_json() for x in loads]
    return out


def _mean(rows: list[dict[str, Any]], cloud: str, key: str) -> float | None:
    vals = [r["clouds"].get(cloud, {}).get(key) for r in rows]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarise(intervals: list[dict[str, Any]], clouds: list[str]) -> list[dict[str, Any]]:
    """Mean share, p95 and price ($/M) per cloud, the blended price, and the weight
    reversals (:func:`~balanceiq_lab.stability.reversal_events` over every interval's
    weights, each counted in the phase of the interval that moved back) for each phase."""
    phases: dict[str, list[dict[str, Any]]] = {}
    for row in intervals:
        phases.setdefault(row["phase"], []).append(row)
    back = Counter(
        intervals[i]["phase"]
        for i, _ in reversal_events([r.get("shares") or r.get("weights") or {} for r in intervals])
    )
    out = []
    for name, rows in phases.items():
        entry: dict[str, Any] = {"phase": name, "intervals": len(rows), "clouds": {}, "reversals": back.get(name, 0)}
        for c in clouds:
            entry["clouds"][c] = {k: _mean(rows, c, k) for k in ("share", "p95_ms", "cost_per_million")}
        costs = [r["cost_per_million"] for r in rows if r["cost_per_million"] is not None]
        entry["cost_per_million"] = sum(costs) / len(costs) if costs else None
        out.append(entry)
    return out


def _print_summary(report: dict[str, Any], clouds: list[str], console: Console, out_dir: Path) -> None:
    t = Table(
        title="demo summary: mean per phase (share of traffic, p95 latency, price per cloud; blended $/M; weight reversals)"
    )
    t.add_column("phase")
    for c in clouds:
        t.add_column(f"{c} share", justify="right")
        t.add_column(f"{c} p95 ms", justify="right")
        t.add_column(f"{c} $/M", justify="right")
    t.add_column("$ / M req", justify="right")
    t.add_column("reversals", justify="right")
    for p in report["phases"]:
        cells = []
        for c in clouds:
            v = p["clouds"][c]
            cells += [
                _fmt(v["share"] * 100 if v["share"] is not None else None, ".0f") + "%",
                _fmt(v["p95_ms"]),
                _fmt(v.get("cost_per_million"), ".3f"),
            ]
        t.add_row(p["phase"], *cells, _fmt(p["cost_per_million"], ".3f"), str(p.get("reversals", 0)))
    console.print(t)
    console.print(
        f"weight reversals (an endpoint's share moving > 5 points and back within 3 intervals): "
        f"{report.get('reversals', 0)} in total",
        highlight=False,
    )
    for name, o in (report.get("others") or {}).items():
        if name != "load":
            console.print(
                f"cluster {name}: {o['decisions']} decisions seen, {o['pushed']} pushed, {o['acked']} ACKed, "
                f"{o['reversals']} reversals, version {o['last_version']}",
                highlight=False,
            )
    load = report.get("load")
    if load:
        console.print(
            f"client side: {load['sent']} requests, {load['failed']} failed, "
            f"p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms"
        )
    console.print(f"report: {out_dir / 'demo-report.json'}  plot: {out_dir / 'demo.png'}")


def plot(report: dict[str, Any], clouds: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["intervals"]
    ts = [r["t"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for c in clouds:
        ax1.plot(ts, [100 * (r["clouds"].get(c, {}).get("share") or 0) for r in rows], label=c)
        ax2.plot(ts, [r["clouds"].get(c, {}).get("p95_ms") or float("nan") for r in rows], label=c)
    for ax in (ax1, ax2):
        for ev in report["events"]:
            ax.axvline(ev["t"], color="grey", linestyle="--", linewidth=0.8)
    for ev in report["events"]:
        ax1.text(ev["t"], 101, ev["name"], fontsize=8, rotation=0, va="bottom")
    ax1.set_ylabel("traffic share %")
    ax1.set_ylim(0, 100)
    ax1.legend(loc="upper right")
    ax2.set_ylabel("p95 ms")
    ax2.set_xlabel("seconds")
    fig.suptitle(f"BalanceIQ demo: {report['scenario']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
