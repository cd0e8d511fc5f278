"""The reward of a decision interval (traffic-weighted inputs, each ratio clipped at ``CLIP``)::

reward = -(latency * p95/slo + tail * max(0, p99/slo - 1) + errors * error_rate + cost * cost_per_million/ref_cost)

less, in training, ``churn`` x the share of traffic moved (CFR-RL moves few flows; 0 leaves it out)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from balanceiq.telemetry.observation import Observation

CLIP = 20.0


@dataclass(frozen=True)
class RewardWeights:
    slo_ms: float = 150.0
    latency: float = 1.0
    tail: float = 1.0
    errors: float = 10.0
    cost: float = 0.5
    ref_cost: float = 0.4
    churn: float = 0.0


def _ratio(x: float, scale: float) -> float:
    return min(CLIP, max(0.0, x / scale)) if math.isfinite(x) else CLIP


def reward(
    p95_ms: float, p99_ms: float, error_rate: float, cost_per_million: float, w: RewardWeights = RewardWeights()
) -> float:
    return -(
        w.latency * _ratio(p95_ms, w.slo_ms)
        + w.tail * max(0.0, _ratio(p99_ms, w.slo_ms) - 1.0)
        + w.errors * (error_rate if math.isfinite(error_rate) else 1.0)
        + w.cost * _ratio(cost_per_million, w.ref_cost)
    )


def observed_reward(obs: Observation, weights: RewardWeights) -> float | None:
    """:func:`reward` of an observation's interval, traffic-weighted over the endpoints that
    carried traffic (``None``: none did); live telemetry has no p99, so the tail sees p95."""
    rows = [e for e in obs.endpoints if e.rps > 0 and all(map(math.isfinite, (e.rps, e.p95_ms, e.error_rate)))]
    if not rows:
        return None
    rps = np.array([e.rps for e in rows])
    w = rps / rps.sum()
    p95 = float(np.dot(w, [e.p95_ms for e in rows]))
    err = float(np.dot(w, [e.error_rate for e in rows]))
    costs = np.array([e.cost_per_million for e in rows])
    cost = float(np.dot(w, np.where(np.isfinite(costs), costs, 0.0)))
    return reward(p95, p95, err, cost, weights)
