"""The reward: latency against an SLO, errors and cost, in one number per decision.

    reward = -( latency * p95/slo
              + tail    * max(0, p99/slo - 1)
              + errors  * error_rate
              + cost    * cost_per_million / ref_cost )

Inputs are traffic-weighted over the decision interval. ``p95/slo`` keeps pressure on
typical latency inside the SLO; the tail term counts once p99 breaks it; ``cost`` compares
the blended price with a reference. Each ratio is clipped at 20 so an overloaded step
cannot swamp the return; linear, so improvements count the same everywhere on the scale.
"""

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


def _ratio(x: float, scale: float) -> float:
    if not math.isfinite(x):
        return CLIP
    return min(CLIP, max(0.0, x / scale))


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
    """:func:`reward` of the interval an observation covers, traffic-weighted over the
    endpoints that carried traffic (``None``: none did); live telemetry has no p99, so the
    tail term sees p95."""
    rows = [
        e
        for e in obs.endpoints
        if math.isfinite(e.rps) and e.rps > 0 and math.isfinite(e.p95_ms) and math.isfinite(e.error_rate)
    ]
    if not rows:
        return None
    rps = np.array([e.rps for e in rows])
    w = rps / rps.sum()
    p95 = float(np.dot(w, [e.p95_ms for e in rows]))
    err = float(np.dot(w, [e.error_rate for e in rows]))
    costs = np.array([e.cost_per_million for e in rows])
    cost = float(np.dot(w, np.where(np.isfinite(costs), costs, 0.0)))
    return reward(p95, p95, err, cost, weights)
