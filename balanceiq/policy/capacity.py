"""The live capacity estimate: what the controller's LP (and the live env's) balances against.

Pure functions of an :class:`~balanceiq.telemetry.observation.Observation`, shared by
:class:`~balanceiq.control.controller.Controller` and
:class:`~balanceiq.testbed.live_env.LiveEnv` (which may not import the control layer), so
a policy trained on live traffic sees exactly the LP it is deployed with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from balanceiq.policy.baselines import available_mask
from balanceiq.policy.features import estimate_capacity
from balanceiq.telemetry.observation import Observation

# An endpoint at or above this error rate is in visible trouble (as is one over the SLO).
BREACH_ERROR_RATE = 0.05


def breaching(obs: Observation, slo_ms: float) -> list[int]:
    """Endpoints in visible trouble: p95 over the SLO or >= 5% errors."""
    return [
        i for i, e in enumerate(obs.endpoints)
        if (math.isfinite(e.p95_ms) and e.p95_ms > slo_ms)
        or (math.isfinite(e.error_rate) and e.error_rate >= BREACH_ERROR_RATE)
    ]  # fmt: skip


def with_breaching(ranked: Iterable[int], forced: Sequence[int], k: int) -> list[int]:
    """The critical set: every ``forced`` (breaching) endpoint, then the first ``k`` of
    ``ranked`` (the policy's order) that are not forced.

    Forcing breachers in keeps a draw from skipping the one endpoint that is on fire.
    The policy still adds its own K on top, rather than filling up to K: the breachers'
    traffic needs somewhere to go, and with one spare the LP pours all of it into that
    one (measured in the simulator: 42 breachers at N=120 with one spare left the fleet
    p99 at 1.40x the oracle's; with K spares 1.01x). The controller, the simulator's env
    and the live env all decide this way.
    """
    chosen = list(dict.fromkeys(int(i) for i in forced))
    extra = [i for i in dict.fromkeys(int(i) for i in ranked) if i not in chosen]
    return chosen + extra[: max(0, int(k))]


def available_breaching(obs: Observation, slo_ms: float) -> list[int]:
    """:func:`breaching` endpoints that are still routable: a down endpoint is no use
    as critical (the LP gives it nothing whatever the set)."""
    avail = available_mask(obs)
    return [i for i in breaching(obs, slo_ms) if avail[i]]


def live_capacity(obs: Observation, hint: np.ndarray, slo_ms: float) -> np.ndarray:
    """Measured capacity (rps / saturation) where the endpoint is loaded enough to
    tell, else the config hint (what the simulator's env feeds the policy and LP),
    with unknown ones assumed typical (the median of the known), derated for
    endpoints breaching the SLO.

    Saturation only shows overload that queues at the backend; a slow dependency or
    a network problem breaks the SLO with the backend half idle, and the LP, which
    balances load against capacity, would leave its share alone. So a breaching
    endpoint's capacity is capped at its current load times ``slo / p95`` (and times
    ``1 - 2 * error_rate`` for errors): the LP then moves traffic off it in proportion
    to how far it is out of bounds.
    """
    cap = estimate_capacity(obs, np.asarray(hint, dtype=np.float64)).astype(np.float64)
    # An endpoint with no hint and too little load to measure would look capacity-less
    # to the LP, which could then never send it traffic again: assume it is typical.
    known = np.isfinite(cap) & (cap > 0)
    unknown = ~np.isfinite(cap)
    if known.any() and unknown.any():
        cap[unknown] = float(np.median(cap[known]))
    for i in breaching(obs, slo_ms):
        e = obs.endpoints[i]
        if not (math.isfinite(e.rps) and e.rps > 0):
            continue
        factor = 1.0
        if math.isfinite(e.p95_ms) and e.p95_ms > slo_ms:
            factor = min(factor, slo_ms / e.p95_ms)
        if math.isfinite(e.error_rate):
            factor = min(factor, max(0.1, 1.0 - 2.0 * e.error_rate))
        cap[i] = min(cap[i], e.rps * factor) if math.isfinite(cap[i]) else e.rps * factor
    return cap
