"""The benchmark harness on the simulator: an arm (a policy over one of Envoy's balancers)
through a whole scenario, with the oracle alongside."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from balanceiq.config import critical_count
from balanceiq.policy.baselines import Decision, PolicyContext
from balanceiq.policy.checkpoint import SHIPPED, RLPolicy
from balanceiq.policy.decide import decide, optimum_gap
from balanceiq.policy.knobs import Knobs
from balanceiq.policy.lp import traffic_moved
from balanceiq.policy.memory import CoreState
from balanceiq.sim.env import FleetEnv
from balanceiq.sim.fleet import QUANTILES, FleetSim, StepResult
from balanceiq.sim.scenario import Scenario, load_scenario
from balanceiq_lab.bench.baselines import make_policy, oracle


class FullLp:
    """Full re-optimisation every decision: the decision core with every endpoint critical."""

    name = "full_lp"

    def __init__(self, knobs: Knobs | None = None) -> None:
        self.knobs_base = knobs or Knobs()  # the LP's weights; k comes from each context
        self.state = CoreState()

    def reset(self) -> None:
        self.state = CoreState()

    def scores(self, obs: Any, ctx: PolicyContext, knobs: Knobs) -> np.ndarray | None:
        return None  # every endpoint critical

    def decide(self, obs: Any, ctx: PolicyContext) -> Decision:
        knobs = replace(self.knobs_base, k=int(ctx.k))
        core = decide(obs, ctx, self.scores(obs, ctx, knobs), knobs, self.state)
        self.state = core.state
        return Decision(core.shares, core.weights, core.critical, core.info())


class Teacher(FullLp):
    """The imitation teacher through the same core: the K endpoints furthest from the
    fleet-wide optimum (:func:`~balanceiq.policy.decide.optimum_gap`) are critical."""

    name = "teacher"

    def scores(self, obs: Any, ctx: PolicyContext, knobs: Knobs) -> np.ndarray | None:
        return optimum_gap(obs, ctx, knobs, self.state)


class RunSim(FleetSim):
    """FleetSim that also counts every request since :meth:`clear_run` (or the reset), for
    :meth:`run_summary`: what a load test over the whole run measures; and tells the truth
    about the step about to run (what the oracle knows)."""

    def demand_rps(self) -> float:
        """Total demand of the step about to run (diurnal x events x this step's noise)."""
        return self._demand

    def capacity(self) -> np.ndarray:
        """True effective capacity now, in rps (0 where failed)."""
        return self._seg.capacity.copy()

    def cost(self) -> np.ndarray:
        """$ per million requests now."""
        return self._seg.cost.copy()

    def available(self) -> np.ndarray:
        """True where the endpoint is up."""
        return self._seg.up.copy()

    def reset(self, seed: int | None = None) -> None:
        self.clear_run()
        super().reset(seed)

    def clear_run(self) -> None:
        """Start :meth:`run_summary` afresh from the next step (after a warm-up, say)."""
        self._run_mix = np.zeros_like(self.latency_grid_ms)
        self._run = np.zeros(3)  # requests, served, dollars (x 1e6)

    def step(self, shares: np.ndarray, balancer: str = "round_robin") -> StepResult:
        res = super().step(shares, balancer)
        served = res.served_rps
        self._run_mix += res.demand_rps * res.mix
        self._run += np.array([res.demand_rps, float(served.sum()), float(served @ res.endpoint_cost_per_million)])
        return res

    def run_summary(self) -> dict[str, float]:
        """Latency quantiles (ms), error rate and $ per million served over every request counted."""
        requests, served, dollars = (float(x) for x in self._run)
        if requests <= 0:
            return dict.fromkeys(("p50_ms", "p95_ms", "p99_ms", "error_rate", "cost_per_million"), math.nan)
        q = np.exp(np.interp(QUANTILES, self._run_mix / requests, np.log(self.latency_grid_ms)))
        return {
            "p50_ms": float(q[0]),
            "p95_ms": float(q[1]),
            "p99_ms": float(q[2]),
            "error_rate": 1.0 - served / requests,
            "cost_per_million": dollars / served if served > 0 else math.nan,
        }


class _RunEnv(FleetEnv):
    sim_class = RunSim


# Envoy on its own: the config's static weights under each of its balancers.
ENVOY_ARMS = {"round_robin": "round_robin", "least_request": "least_request", "cswrr": "cswrr"}


def arm(name: str, checkpoint: Path | None = None, balancer: str = "round_robin") -> tuple[Any, str, bool]:
    """``(policy, balancer, controller_weights)`` for a benchmark arm: one of
    :data:`ENVOY_ARMS`, or a policy behind the controller over Envoy's ``balancer``."""
    if name in ENVOY_ARMS:
        return make_policy("static"), ENVOY_ARMS[name], False
    return _policy(name, checkpoint), balancer, True


def _policy(name: str, checkpoint: Path | None) -> Any:
    if name == "cfr_rl":
        return RLPolicy.from_checkpoint(checkpoint or SHIPPED)
    if name == "full_lp":
        return FullLp()
    if name == "teacher":
        return Teacher()
    return make_policy(name)


_ROW_KEYS = ("p50_ms", "p95_ms", "p99_ms", "error_rate", "cost_per_million", "traffic_moved")


def _pair_env(scenario: str | Scenario, seed: int, cfg: dict[str, Any]) -> FleetEnv:
    """One scenario's env for a whole run, reset (n_max = N: baselines never read padding)."""
    n_max = len(load_scenario(scenario).endpoints)
    env = _RunEnv(
        {**cfg, "scenarios": [scenario], "n_max": n_max, "episode_steps": 10**9, "seed": seed, "obs_noise": 0.05}
    )
    env.reset(seed=seed)
    return env


def run_pair(
    scenario: str | Scenario,
    policy: Any,
    *,
    seed: int = 0,
    decision_steps: int = 5,
    trace: bool = False,
    same_state: bool = False,
    balancer: str = "round_robin",
    controller_weights: bool = True,
    saturation: bool = True,
    warmup_s: float = 0.0,
    capacity_hints: bool = True,
) -> dict[str, Any]:
    """One whole scenario under ``policy`` over Envoy's ``balancer``; with ``same_state``
    also what full re-optimisation would move from the policy's state each decision (one
    more LP over every endpoint per decision)."""
    cfg = {
        "decision_steps": decision_steps,
        "balancer": balancer,
        "controller_weights": controller_weights,
        "saturation": saturation,
        "capacity_hints": capacity_hints,
    }
    env = _pair_env(scenario, seed, cfg)
    sim = env.sim
    assert isinstance(sim, RunSim)
    n = sim.n
    k = critical_count(n)
    static = np.asarray(sim.static_weights, dtype=np.float64)
    policy.reset()
    full = FullLp()  # its own memory, on the policy's trajectory
    rows: list[dict[str, float]] = []
    timeline: list[dict[str, Any]] = []
    done = False
    measuring = warmup_s <= 0
    while not done:
        if not measuring and sim.t >= warmup_s - 1e-9:
            sim.clear_run()
            measuring = True
        obs = env.last_obs
        cap_true = sim.capacity()
        ctx = PolicyContext(
            shares=env.shares,
            capacity_hint=env.capacity_estimate(),
            static_weights=static,
            demand_rps=float(np.nansum([e.rps for e in obs.endpoints])),
            k=k,
            true_capacity=cap_true,
        )
        decision = policy.decide(obs, ctx)
        if same_state:
            # The CFR-RL paper's comparison, beside what full re-optimisation moves on its
            # own trajectory (policy full_lp).
            full_moved = traffic_moved(env.shares, np.asarray(full.decide(obs, ctx).shares, dtype=np.float64))
        demand = sim.demand_rps()
        best = oracle(cap_true, sim.cost(), demand, available=sim.available()).max_utilization
        _, r, _, truncated, info = env.step_shares(np.asarray(decision.shares, dtype=np.float64))
        done = truncated
        achieved = info["max_utilization"]
        row = {key: info[key] for key in _ROW_KEYS}
        row.update(reward=r, performance_ratio=min(1.0, best / achieved) if achieved > 0 else 1.0)
        rows.append(row)
        if same_state:
            rows[-1]["full_moved_same_state"] = full_moved
        if trace:
            timeline.append({"t": sim.t, "shares": env.shares.tolist(), "p99_ms": info["p99_ms"]})
    out: dict[str, Any] = {key: float(statistics.fmean(r[key] for r in rows)) for key in rows[0]}
    out["decisions"] = len(rows)
    # Over every request after the warm-up, as a load test measures (the rest: means over decisions).
    out["run"] = sim.run_summary()
    # The first decision's move (off the config's static split) is most of what any
    # policy moves in a run: reported so traffic_moved can be read with and without it.
    out["traffic_moved_first"] = float(rows[0]["traffic_moved"])
    if trace:
        out["timeline"] = timeline
        out["names"] = list(sim.names)
    return out


def least_move_off_static(scenario: str, utilization: float = 0.9, *, seed: int = 0) -> float:
    """The least fraction of traffic any policy must move off the scenario's static split
    to bring every endpoint to ``utilization`` or below (true capacities, demand at t=0).

    A floor for ``traffic_moved`` over a run: what lies above the overloaded endpoints'
    limits has to go somewhere, whoever decides where.
    """
    sim = RunSim(scenario, seed=seed)
    static = np.asarray(sim.static_weights, dtype=np.float64)
    shares = static / static.sum()
    return float(np.maximum(0.0, shares - utilization * sim.capacity() / sim.demand_rps()).sum())
