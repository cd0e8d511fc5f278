"""What shapes a decision of the core besides the observation."""

from __future__ import annotations

from dataclasses import dataclass

from balanceiq.config import ControlConfig

# The LP's weights default to the served config's: simulator, training, gate and controller solve one objective.
_CONTROL = ControlConfig()


@dataclass(frozen=True)
class Knobs:
    """The controller's run-time policy, as the decision core reads it."""

    k: int = 2  # critical endpoints the policy adds on top of the forced ones
    slo_ms: float = 150.0  # p95 above this breaches the SLO
    cost_weight: float = _CONTROL.cost_weight  # weight of the LP's cost term
    util_target: float = _CONTROL.util_target  # utilisation below which cost and latency alone decide
    latency_weight: float = _CONTROL.latency_weight  # weight of the LP's latency term (p95 in SLO units)
    growth: float = 1.5  # an uncongested endpoint's load may grow by at most this factor per decision
    probe_share: float = 0.05  # every endpoint may grow to at least this share of demand
    max_step: float = 0.05  # an endpoint gains at most this share of demand per decision
    max_shrink: float = 0.04  # most share a steady endpoint may lose per decision (under the 5-point reversal step)
    cooldown: int = 3  # decisions a congested or breaching endpoint waits before it may grow again
    gap_k: int = 1  # endpoints furthest from the fleet-wide optimum added to the critical set
    breach_error_rate: float = 0.01  # a decayed error rate at or above this (about a minute) breaches
    breach_hold_s: float = 30.0  # a breacher too quiet to measure stays one this long
    # Breaching, congested, repriced and gap_k endpoints are always critical; off: plain CFR-RL.
    force_breaching: bool = True
    safe_moves: bool = True  # bound growth by the headroom estimate (off: the plain CFR-RL LP)
