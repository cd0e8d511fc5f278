"""`balanceiq demo --scripted`: the actuator alone, with a scripted weight schedule.

Starts a local Ray, the xDS actor, six sample backends in three "clouds" and Envoy; then
walks through a schedule of weight assignments, pushing each through the actor, waiting
for Envoy's ACK, sending a bounded burst of real requests through Envoy and showing the
split it produced next to the split the weights ask for. A later issue puts the learned
policy where the schedule is.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from rich.table import Table

from balanceiq.config import EndpointConfig, Settings
from balanceiq.exceptions import TestbedError
from balanceiq.testbed.ports import check_ports_free
from balanceiq_lab.progress import progress_bar
from balanceiq_lab.stack import Stack
from balanceiq_lab.testbed.envoy import EnvoyProcess, endpoint_health, endpoint_weights
from balanceiq_lab.testbed.load import LoadResult, run_load_sync


@dataclass(frozen=True)
class Phase:
    name: str
    why: str
    weights: dict[str, int]
    health: dict[str, str]


def schedule(endpoints: list[EndpointConfig]) -> list[Phase]:
    """The scripted decisions: what an operator (and later the policy) might choose."""
    addrs = [ep.address for ep in endpoints]
    cap = {ep.address: ep.capacity_rps or 100.0 for ep in endpoints}
    cost = {ep.address: max(ep.cost_per_million_requests, 0.01) for ep in endpoints}
    by_cap = {a: max(1, round(100 * cap[a] / max(cap.values()))) for a in addrs}
    cheap = {a: max(1, round(100 * (cap[a] / cost[a]) / max(cap[b] / cost[b] for b in addrs))) for a in addrs}
    drained = addrs[-1]
    first_cloud = endpoints[0].cloud
    prefer = {ep.address: (80 if ep.cloud == first_cloud else 10) for ep in endpoints}
    return [
        Phase("round robin", "every weight 1: what Envoy does with static equal weights", dict.fromkeys(addrs, 1), {}),
        Phase("capacity", "weights proportional to each backend's capacity hint", by_cap, {}),
        Phase("cost-aware", "capacity per dollar: cheap backends take more", cheap, {}),
        Phase("drain", f"{drained} set DRAINING: it must receive nothing", cheap, {drained: "DRAINING"}),
        Phase(
            f"prefer {first_cloud}",
            f"80/10 in favour of {first_cloud}, drained backend back",
            prefer,
            {drained: "HEALTHY"},
        ),
    ]


def expected_shares(weights: dict[str, int], not_routable: dict[str, list[str]]) -> dict[str, float]:
    """Each endpoint's share of requests if Envoy follows the weights among the hosts it
    routes to (hosts drained by us, or ejected/failed by Envoy's checks, get nothing)."""
    live = {a: w for a, w in weights.items() if not not_routable.get(a)}
    total = sum(live.values())
    return {a: (live.get(a, 0) / total if total else 0.0) for a in weights}


def run_demo(settings: Settings, *, requests_per_phase: int, out_dir: Path, console: Console) -> dict[str, Any]:
    import ray

    from balanceiq.xds.actor import start_actor

    check_ports_free(settings)
    cluster = settings.clusters[0]
    phases = schedule(list(cluster.endpoints))
    report: dict[str, Any] = {"cluster": cluster.name, "phases": []}
    cost = {ep.address: ep.cost_per_million_requests for ep in cluster.endpoints}
    cloud = {ep.address: f"{ep.cloud}/{ep.region}" for ep in cluster.endpoints}

    with tempfile.TemporaryDirectory(prefix="balanceiq-demo-") as work:
        with console.status("starting Ray (local, 2 CPUs)"):
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="balanceiq")
        try:
            with console.status("starting the xDS actor"):
                actor = start_actor(settings, state_dir=Path(work) / "state")
            # The actor serves xDS: the stack has no xDS server of its own. ROUND_ROBIN: this
            # demo shows weights becoming shares one to one (under LEAST_REQUEST, Envoy's
            # default here, active requests bend them).
            stack = Stack(settings, Path(work), xds=False, lb_policy="ROUND_ROBIN")
            with console.status("starting 6 backends in 3 clouds and Envoy"):
                stack.start()
            try:
                envoy = stack.testbed.envoy
                console.print(
                    f"[green]up[/]: proxy {envoy.listen_url}  admin {envoy.admin_url}  xDS {settings.xds.host}:{settings.xds.port}"
                )
                health: dict[str, str] = {}
                with progress_bar(console) as progress:
                    task = progress.add_task("phases", total=len(phases))
                    for phase in phases:
                        progress.update(task, description=f"phase: {phase.name}")
                        t0 = time.monotonic()
                        # Ray types an actor handle's undecorated methods as Never: say what they return.
                        version = cast(
                            str, ray.get(actor.set_assignment.remote(cluster.name, phase.weights, phase.health or None))
                        )
                        if not ray.get(actor.wait_for_ack.remote(version, None, 10.0)):
                            raise TestbedError(f"Envoy did not ACK version {version} within 10 s")
                        acked_ms = (time.monotonic() - t0) * 1000
                        health.update(phase.health)
                        _wait_applied(envoy, cluster.name, phase.weights, health)
                        result = run_load_sync(
                            envoy.listen_url, total=requests_per_phase, concurrency=16, max_seconds=60
                        )
                        envoy_view = endpoint_health(envoy.clusters_json(), cluster.name)
                        expected = expected_shares(phase.weights, envoy_view)
                        entry = _phase_entry(phase, version, acked_ms, result, expected, cost, envoy_view)
                        report["phases"].append(entry)
                        console.print(_phase_table(entry, cloud))
                        progress.advance(task)
                status = cast("dict[str, Any]", ray.get(actor.status.remote()))
            finally:
                stack.stop()
        finally:
            ray.shutdown()

    report["xds"] = {k: status[k] for k in ("version", "epoch", "nodes", "rejections")}
    report["total_requests"] = sum(p["load"]["sent"] for p in report["phases"])
    report["failed_requests"] = sum(p["load"]["failed"] for p in report["phases"])
    report["max_share_error"] = max(p["max_share_error"] for p in report["phases"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo-report.json").write_text(json.dumps(report, indent=1))
    plot_report(report, out_dir / "demo-shares.png")
    _summary(report, console, out_dir)
    return report


def _wait_applied(
    envoy: EnvoyProcess, cluster: str, weights: dict[str, int], health: dict[str, str], timeout: float = 5.0
) -> None:
    """Until Envoy's admin shows the pushed weights, and DRAINING exactly where we put it."""
    draining = {a for a, h in health.items() if h == "DRAINING"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = envoy.clusters_json()
        shown = {a for a, r in endpoint_health(state, cluster).items() if "eds_draining" in r}
        if endpoint_weights(state, cluster) == weights and shown == draining:
            return
        time.sleep(0.02)
    raise TestbedError("Envoy ACKed but its admin /clusters never showed the pushed weights")


def _phase_entry(
    phase: Phase,
    version: str,
    acked_ms: float,
    result: LoadResult,
    expected: dict[str, float],
    cost: dict[str, float],
    envoy_view: dict[str, list[str]],
) -> dict[str, Any]:
    observed = result.shares()
    rows: list[dict[str, Any]] = [
        {
            "address": a,
            "weight": phase.weights[a],
            "envoy": ", ".join(envoy_view.get(a, [])) or "routable",
            "expected_share": expected[a],
            "observed_share": observed.get(a, 0.0),
        }
        for a in phase.weights
    ]
    return {
        "phase": phase.name,
        "why": phase.why,
        "version": version,
        "push_to_ack_ms": acked_ms,
        "rows": rows,
        "max_share_error": max(abs(r["expected_share"] - r["observed_share"]) for r in rows),
        "cost_per_million": sum(observed.get(a, 0.0) * c for a, c in cost.items()),
        "load": result.to_json(),
    }


def _phase_table(entry: dict[str, Any], cloud: dict[str, str]) -> Table:
    load = entry["load"]
    t = Table(
        title=f"{entry['phase']} — {entry['why']}",
        caption=(
            f"version {entry['version']} ACKed in {entry['push_to_ack_ms']:.1f} ms · {load['sent']} requests, "
            f"{load['failed']} failed, {load['backend_5xx']} backend 5xx · p50 {load['p50_ms']:.1f} ms, p95 {load['p95_ms']:.1f} ms · "
            f"${entry['cost_per_million']:.3f} per million requests"
        ),
    )
    for col in ("endpoint", "cloud/region", "weight", "envoy", "expected", "observed"):
        t.add_column(col, justify="right" if col in ("weight", "expected", "observed") else "left")
    for r in entry["rows"]:
        t.add_row(
            r["address"],
            cloud[r["address"]],
            str(r["weight"]),
            r["envoy"],
            f"{r['expected_share']:.1%}",
            f"{r['observed_share']:.1%}",
        )
    return t


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """One panel per phase: the share each endpoint should get (outline) and got (bar)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display here, and none needed
    import matplotlib.pyplot as plt

    phases = report["phases"]
    fig, axes = plt.subplots(1, len(phases), figsize=(3.2 * len(phases), 3.6), sharey=True)
    for ax, phase in zip(axes if len(phases) > 1 else [axes], phases):
        rows = phase["rows"]
        x = range(len(rows))
        ax.bar(x, [r["observed_share"] * 100 for r in rows], color="#4c78a8", label="observed")
        ax.bar(
            x,
            [r["expected_share"] * 100 for r in rows],
            fill=False,
            edgecolor="#e45756",
            linewidth=1.5,
            label="weights say",
        )
        ax.set_xticks(list(x), [r["address"].rsplit(":", 1)[-1] for r in rows], rotation=45, fontsize=8)
        ax.set_title(
            f"{phase['phase']}\n${phase['cost_per_million']:.3f}/M req, p95 {phase['load']['p95_ms']:.0f} ms",
            fontsize=9,
        )
    axes_list = axes if len(phases) > 1 else [axes]
    axes_list[0].set_ylabel("share of requests (%)")
    axes_list[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"BalanceIQ demo: {report['total_requests']} requests through Envoy, split per pushed weights", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _summary(report: dict[str, Any], console: Console, out_dir: Path) -> None:
    ok = report["failed_requests"] == 0 and report["max_share_error"] <= 0.03
    console.print(
        f"[{'green' if ok else 'red'}]demo {'passed' if ok else 'FAILED'}[/]: {report['total_requests']} requests, "
        f"{report['failed_requests']} failed, worst share error {report['max_share_error']:.1%} "
        f"(report: {out_dir / 'demo-report.json'}, plot: {out_dir / 'demo-shares.png'})"
    )
    if not ok:
        raise TestbedError("demo: traffic did not follow the pushed weights (see the report)")
