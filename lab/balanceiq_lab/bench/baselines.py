"""The benchmark's baselines beyond the controller's guardrail ones: the paper's Top-K, the
hot/cold heuristic and the oracle (the physical limit, simulator only), each the LP with
the served objective (the knobs' weights) on its own critical set."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from balanceiq.policy import baselines
from balanceiq.policy.baselines import (
    BASELINES,
    Decision,
    Policy,
    PolicyContext,
    _check,
    _decision,
    available_mask,
    estimate_capacity,
    hot_cold_critical,
    obs_field,
    utilisation,
)
from balanceiq.policy.knobs import Knobs
from balanceiq.policy.lp import LpResult, solve_critical
from balanceiq.telemetry.observation import Observation


def oracle(
    capacity: np.ndarray | Sequence[float],
    cost: np.ndarray | Sequence[float],
    demand: float,
    *,
    available: np.ndarray | Sequence[bool] | None = None,
    cost_weight: float = 0.1,
    util_target: float = 0.0,
) -> LpResult:
    """The LP with every endpoint critical: with true capacities, the physical limit."""
    n = np.asarray(capacity, dtype=np.float64).reshape(-1).shape[0]
    return solve_critical(
        np.ones(n) / n,
        np.ones(n, dtype=bool),
        capacity,
        cost,
        demand,
        available=available,
        cost_weight=cost_weight,
        util_target=util_target,
    )


def _lp_decision(res: LpResult, avail: np.ndarray, critical: tuple[int, ...], **info: Any) -> Decision:
    info = {"lp_status": res.status, "fallback": res.fallback, "max_utilization": res.max_utilization, **info}
    return _decision(res.shares, avail, critical, **info)


class _LpPolicy:
    """A baseline that solves the served LP objective (the knobs' weights) on its own critical set."""

    def __init__(self, knobs: Knobs | None = None) -> None:
        self.knobs = knobs or Knobs()

    def reset(self) -> None:
        pass

    def _lp(self, obs: Observation, ctx: PolicyContext, critical: tuple[int, ...], cap: np.ndarray) -> Decision:
        """Re-optimise ``critical`` (costs, availability and, with a latency weight, p95 in
        SLO units read from ``obs``)."""
        k = self.knobs
        res = solve_critical(
            np.asarray(ctx.shares, dtype=np.float64).reshape(-1),
            critical,
            cap,
            obs_field(obs, "cost_per_million"),
            float(ctx.demand_rps),
            available=available_mask(obs),
            cost_weight=k.cost_weight,
            util_target=k.util_target,
            latency=obs_field(obs, "p95_ms") / k.slo_ms if k.latency_weight > 0 else None,
            latency_weight=k.latency_weight,
        )
        return _lp_decision(res, available_mask(obs), tuple(critical), capacity_estimate=cap.tolist())


class TopKHeuristic(_LpPolicy):
    """The paper's "Top-K critical": the K most utilised endpoints (:func:`utilisation`),
    then the LP, which balances the hottest K against each other."""

    name = "topk"

    def decide(self, obs: Observation, ctx: PolicyContext) -> Decision:
        n = _check(obs, ctx)
        util, cap = utilisation(obs, ctx)
        util = np.where(np.isfinite(util), util, -np.inf)
        k = min(max(int(ctx.k), 1), n)
        critical = tuple(sorted(int(i) for i in np.argsort(-util, kind="stable")[:k]))
        return self._lp(obs, ctx, critical, cap)


class HotColdHeuristic(_LpPolicy):
    """:func:`~balanceiq.policy.baselines.hot_cold_critical`, then the LP: load can only move
    to where there is headroom, so repeated decisions work like pairwise averaging."""

    name = "hot_cold"

    def decide(self, obs: Observation, ctx: PolicyContext) -> Decision:
        cap = estimate_capacity(obs, ctx)
        return self._lp(obs, ctx, tuple(sorted(hot_cold_critical(obs, ctx))), cap)


class Oracle(_LpPolicy):
    """The LP over every endpoint with the simulator's true capacities: the physical limit."""

    name = "oracle"

    def decide(self, obs: Observation, ctx: PolicyContext) -> Decision:
        n = _check(obs, ctx)
        if ctx.true_capacity is None:
            raise ValueError(
                "the oracle needs PolicyContext.true_capacity, which only the simulator knows; "
                "use another policy on live traffic"
            )
        avail = available_mask(obs)
        k = self.knobs
        cost = obs_field(obs, "cost_per_million")
        res = oracle(
            ctx.true_capacity,
            cost,
            ctx.demand_rps,
            available=avail,
            cost_weight=k.cost_weight,
            util_target=k.util_target,
        )
        return _lp_decision(res, avail, tuple(range(n)))


BENCH_BASELINES: dict[str, Callable[[], Policy]] = {
    **BASELINES,
    TopKHeuristic.name: TopKHeuristic,
    HotColdHeuristic.name: HotColdHeuristic,
    Oracle.name: Oracle,
}


def make_policy(name: str) -> Policy:
    """A fresh baseline by name, the benchmark's included."""
    return baselines.make_policy(name, BENCH_BASELINES)
