"""`balanceiq bench sim`: every policy on every scenario, against the oracle.

Each (scenario, policy) pair runs one whole scenario (same seed for every policy, so all
face the same demand noise) with a decision every ``decision_steps`` simulator seconds.
Every policy sees the same information: the observation and the capacity estimated from
it (observed rps / saturation, else the config hint); only the oracle is also given the
true capacities. Per pair:

* ``p50_ms``/``p95_ms``/``p99_ms``/``error_rate``/``cost_per_million``: means over
  decisions of the fleet-wide, traffic-weighted values;
* ``reward``: mean reward per decision (:mod:`balanceiq.policy.reward`);
* ``performance_ratio``: mean over decisions of (the oracle's worst utilisation) / (the
  policy's worst utilisation), at the same demand and true capacities — 1 is optimal;
* ``traffic_moved``: mean fraction of traffic whose endpoint changed per decision, and
  ``traffic_moved_vs_full``: that over what full re-optimisation (the LP over all
  endpoints with estimated capacity, policy ``full_lp``) moves on its own run of the
  same scenario;
* ``full_moved_same_state`` and ``traffic_moved_vs_full_same_state``: what full
  re-optimisation would have moved *from the policy's own state* at each decision, and
  the policy's total over that total (the CFR-RL paper's comparison). Read it beside
  ``performance_ratio``: a policy that never moves scores 0 here (``topk`` nearly does);
* ``traffic_moved_first``: what the first decision moved, off the config's static split
  (in the shipped scenarios most of what any good policy moves in a whole run).

Per scenario, ``traffic_moved_floor`` gives the least traffic *any* policy must move off
the static split to bring every endpoint to 90% utilisation or below, beside what full
re-optimisation moves in its whole run: where that ratio is over 0.3, moving <= 0.3x
full re-optimisation means leaving endpoints above 90% (see BENCHMARKS.md).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from balanceiq.sim.balancer import BALANCERS
from balanceiq.sim.fleet import FleetSim
from balanceiq.sim.scenario import SCENARIOS
from balanceiq_lab.bench.arms import ENVOY_ARMS, arm, least_move_off_static, run_pair
from balanceiq_lab.bench.baselines import BENCH_BASELINES
from balanceiq_lab.errors import BenchError
from balanceiq_lab.progress import progress_bar

DEFAULT_POLICIES = (
    "equal",
    "static",
    "cost_aware",
    "inverse_latency",
    "least_request",
    "cswrr",
    "topk",
    "hot_cold",
    "full_lp",
    "teacher",
    "cfr_rl",
    "oracle",
)


def run_sim_bench(
    *,
    scenarios: list[str] | None = None,
    policies: list[str] | None = None,
    checkpoint: Path | None = None,
    seed: int = 0,
    plot: Path | None = None,
    plot_scenario: str = "degrade",
    balancer: str = "least_request",
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console(stderr=True)
    scenarios = scenarios or list(SCENARIOS)
    policies = policies or list(DEFAULT_POLICIES)
    unknown = [p for p in policies if p not in (*BENCH_BASELINES, *ENVOY_ARMS, "full_lp", "teacher", "cfr_rl")]
    if unknown:
        raise BenchError(f"unknown policies {', '.join(unknown)}; known: {', '.join(DEFAULT_POLICIES)}")
    if balancer not in BALANCERS:
        raise BenchError(f"unknown balancer {balancer!r}; known: {', '.join(BALANCERS)}")
    if "full_lp" not in policies:
        policies = [*policies, "full_lp"]  # the reference for traffic_moved_vs_full
    loaded = {p: arm(p, checkpoint, balancer) for p in policies}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    floors: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    with progress_bar(console) as progress:
        task = progress.add_task("scenario x policy", total=len(scenarios) * len(policies))
        for sc in scenarios:
            results[sc] = {}
            for name in policies:
                progress.update(task, description=f"{sc} / {name}")
                policy, bal, weights = loaded[name]
                results[sc][name] = run_pair(
                    sc, policy, seed=seed, same_state=True, balancer=bal, controller_weights=weights
                )
                progress.advance(task)
            full = results[sc]["full_lp"]["traffic_moved"]
            for name in policies:
                row = results[sc][name]
                moved = row["traffic_moved"]
                row["traffic_moved_vs_full"] = moved / full if full > 0 else None
                same = row["full_moved_same_state"]
                row["traffic_moved_vs_full_same_state"] = moved / same if same > 0 else None
            full_total = full * results[sc]["full_lp"]["decisions"]
            floors[sc] = {
                "least_move_to_90pct": least_move_off_static(sc, 0.9, seed=seed),
                "full_lp_total_moved": full_total,
            }
            floors[sc]["least_move_vs_full"] = (
                floors[sc]["least_move_to_90pct"] / full_total if full_total > 0 else None
            )
    summary = _summarise(results, policies)
    out: dict[str, Any] = {
        "bench": "sim",
        "seed": seed,
        "scenarios": scenarios,
        "policies": policies,
        # Envoy's balancer under the controller's weights (the Envoy arms name their own).
        "balancer": balancer,
        "results": results,
        "summary": summary,
        # No policy that keeps every endpoint at or under 90% can move less than this
        # over a run, against what full re-optimisation moves in the whole run.
        "traffic_moved_floor": floors,
        "sim_steps_per_s": {
            "n8": round(steps_per_second("steady", 20000)),
            "n120": round(steps_per_second("many_endpoints", 2000)),
        },
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    if plot is not None:
        if plot_scenario not in scenarios:
            plot_scenario = scenarios[0]
        traces: dict[str, dict[str, Any]] = {
            p: run_pair(
                plot_scenario,
                loaded[p][0],
                seed=seed,
                trace=True,
                balancer=loaded[p][1],
                controller_weights=loaded[p][2],
            )
            for p in ("equal", "topk", "cfr_rl", "oracle")
            if p in loaded
        }
        out["plot"] = str(plot_traces(plot_scenario, traces, plot))
    return out


def steps_per_second(scenario_name: str, n_steps: int) -> float:
    """Steps per second of :meth:`FleetSim.step` on ``scenario_name`` under its static split
    (past the scenario's duration if ``n_steps`` asks for it); a short warm-up is not timed."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    sim = FleetSim(scenario_name)
    shares = sim.static_weights / sim.static_weights.sum()
    for _ in range(min(200, n_steps)):
        sim.step(shares)
    sim.reset()
    step = sim.step
    start = time.perf_counter()
    for _ in range(n_steps):
        step(shares)
    elapsed = time.perf_counter() - start
    return n_steps / elapsed if elapsed > 0 else float("inf")


def _summarise(results: dict[str, dict[str, dict[str, Any]]], policies: list[str]) -> dict[str, Any]:
    # The heuristic baselines; the imitation teacher is reported apart.
    heuristics = [p for p in policies if p not in ("cfr_rl", "oracle", "full_lp", "teacher")]
    summary: dict[str, Any] = {}
    if "cfr_rl" in policies:
        beats = {sc: all(r["cfr_rl"]["reward"] >= r[h]["reward"] for h in heuristics) for sc, r in results.items()}
        summary["cfr_rl_reward_ge_every_heuristic"] = beats
        if "teacher" in policies:
            summary["cfr_rl_reward_ge_teacher"] = {
                sc: r["cfr_rl"]["reward"] >= r["teacher"]["reward"] for sc, r in results.items()
            }
        if "hot_cold" in policies:
            summary["cfr_rl_reward_ge_hot_cold_teacher"] = {
                sc: r["cfr_rl"]["reward"] >= r["hot_cold"]["reward"] for sc, r in results.items()
            }
        if "oracle" in policies:
            summary["cfr_rl_p99_over_oracle"] = statistics.fmean(
                r["cfr_rl"]["p99_ms"] / r["oracle"]["p99_ms"] for r in results.values()
            )
            summary["cfr_rl_cost_over_oracle"] = statistics.fmean(
                r["cfr_rl"]["cost_per_million"] / r["oracle"]["cost_per_million"] for r in results.values()
            )
        for key in ("traffic_moved_vs_full", "traffic_moved_vs_full_same_state"):
            vals = [r["cfr_rl"][key] for r in results.values() if r["cfr_rl"][key] is not None]
            summary[f"cfr_rl_{key}"] = statistics.fmean(vals) if vals else None
        summary["cfr_rl_performance_ratio"] = statistics.fmean(
            r["cfr_rl"]["performance_ratio"] for r in results.values()
        )
    summary["mean_reward"] = {p: statistics.fmean(r[p]["reward"] for r in results.values()) for p in policies}
    return summary


def plot_traces(scenario: str, traces: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = next(iter(traces.values()))["names"]
    fig, axes = plt.subplots(2, len(traces), figsize=(4.2 * len(traces), 6), sharex=True, sharey="row", squeeze=False)
    for col, (policy, tr) in enumerate(traces.items()):
        t = [p["t"] for p in tr["timeline"]]
        shares = np.array([p["shares"] for p in tr["timeline"]])
        axes[0][col].stackplot(t, shares.T * 100, labels=names)
        axes[0][col].set_title(f"{policy}: reward {tr['reward']:.2f}", fontsize=9)
        axes[0][col].set_ylim(0, 100)
        axes[1][col].plot(t, [p["p99_ms"] for p in tr["timeline"]], color="#e45756")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("simulated seconds")
    axes[0][0].set_ylabel("traffic share (%)")
    axes[1][0].set_ylabel("fleet p99 (ms)")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.suptitle(f"scenario {scenario}: traffic split and p99 over time", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
