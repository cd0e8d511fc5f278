"""Which endpoints are in trouble and the critical set: names kept for callers of the
decision core (:mod:`balanceiq.policy.decide`), where the logic lives."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from balanceiq.policy.baselines import available_mask
from balanceiq.policy.decide import BREACH_ERROR_RATE, window_breaching, with_forced
from balanceiq.telemetry.observation import Observation

__all__ = ["BREACH_ERROR_RATE", "available_breaching", "breaching", "with_breaching"]


def breaching(obs: Observation, slo_ms: float) -> list[int]:
    """Endpoints in visible trouble in this window: p95 over the SLO or >= 5% errors."""
    return window_breaching(obs, slo_ms)


def with_breaching(ranked: Iterable[int], forced: Sequence[int], k: int) -> list[int]:
    """Every ``forced`` endpoint, then the first ``k`` of ``ranked`` not forced."""
    return with_forced(list(ranked), forced, k)


def available_breaching(obs: Observation, slo_ms: float) -> list[int]:
    """:func:`breaching` endpoints that are still routable."""
    avail = available_mask(obs)
    return [i for i in breaching(obs, slo_ms) if avail[i]]
