"""The control loop, its guardrails and the API that serves it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from balanceiq.config.base import (
    Port,
    PosFloat,
    _check_path,
    _Model,
)


def critical_count(n_endpoints: int) -> int:
    """Default K: about 20% of N, but at least 2 (a single critical endpoint cannot move:
    its share is whatever the others leave), and never more than N."""
    if n_endpoints <= 0:
        return 0
    return min(n_endpoints, max(2, round(n_endpoints / 5)))


class ControlConfig(_Model):
    """The control loop: how often it acts and how many endpoints it re-weights."""

    mode: Literal["active", "shadow"] = Field(
        default="active", description="active: steer; shadow: decide, push nothing."
    )
    """``shadow`` observes, decides and records every decision with its estimated effect,
    but pushes nothing and takes no lease: run it beside an Envoy you already trust and
    see what it would do. Switch with ``PUT /api/policy {"control_mode": "active"}``; the
    first active step starts from the weights Envoy serves, moving at most ``max_shift``."""

    interval_s: PosFloat = Field(default=5.0, le=3600, description="Seconds between control steps (0-3600].")
    """Seconds between control steps (the original's OPTIMIZATION_INTERVAL_SECONDS).
    Shorter reacts faster but sees noisier p95 latencies."""

    k_critical: int | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="Critical endpoints per step (None: about 20% of N).",
    )
    """How many critical endpoints the policy picks each step for the LP to re-weight;
    the rest keep their share. ``None`` means about 20% of the cluster's endpoints, at
    least 2 (one critical endpoint alone cannot move). Values above N mean every
    endpoint is critical."""

    util_target: float = Field(default=0.5, ge=0.0, le=1.0, description="Utilisation that costs nothing in the LP.")
    """Headroom knee of the live LP: utilisation (load over estimated capacity) up to this
    level is free, so below it the LP sends the critical endpoints' traffic to the
    cheapest, fastest ones; above it, spreading load wins. 0 is the pure
    min-max-utilisation LP, which ignores even a 5x price gap between equal endpoints
    (moving load to the cheap one raises the maximum utilisation by more than the cost
    term saves); 0.5 (default) lets price and latency decide below half load."""

    cost_weight: float = Field(default=0.3, ge=0.0, le=100.0, description="Weight of the LP's cost term.")
    """Weight of the normalised price term (price over the fleet's highest) against
    utilisation in the live LP. Both terms are linear in the shares, and one share of
    traffic adds demand/capacity of utilisation, so the higher this weight, the more load
    a price difference can move. 0.3 (default) is commensurate with ``latency_weight`` 0.2:
    the whole price range is worth a little more than 1.5 SLOs of p95. The simulator
    trains with 0.1 (``rllib_configs/ppo.yaml``)."""

    latency_weight: float = Field(default=0.2, ge=0.0, le=100.0, description="Weight of the LP's latency term.")
    """Weight of the observed p95 latency (in units of the SLO) against utilisation in the
    live LP. Min-max utilisation is blind to an endpoint that is idle but slow (a far
    region, a slow dependency); with a knee (``util_target`` > 0) this term and the cost
    term decide where traffic goes below it, so fast, cheap endpoints fill first.
    0 is the pure CFR-RL LP; 0.2 (default) reads "moving all traffic from an endpoint
    at the SLO to an instant one is worth 0.2 of utilisation"."""

    def critical_count(self, n_endpoints: int) -> int:
        """K for a cluster of ``n_endpoints`` endpoints, clamped to ``0..n_endpoints``."""
        if self.k_critical is not None:
            return max(0, min(self.k_critical, n_endpoints))
        return critical_count(n_endpoints)


class GuardrailConfig(_Model):
    """Limits between the LP and the weight store; every decision passes through them."""

    min_share: float = Field(default=0.01, ge=0.0, lt=0.5, description="Floor share of each healthy endpoint.")
    """Floor on the traffic share of every healthy, not drained endpoint (0.01 = 1%,
    a weight of 100 out of 10,000), so the controller keeps seeing fresh latency from
    each of them. Lowered automatically when N floors would not fit."""

    max_shift: float = Field(default=0.25, gt=0.0, le=1.0, description="Max traffic moved per decision.")
    """Largest fraction of traffic one decision may move (``0.5 * sum |new - old|``).
    Moves off an endpoint that is down or drained are exempt: safety beats smoothness;
    so are moves off an endpoint breaching the SLO (see ``breach_min_share``)."""

    breach_min_share: float = Field(default=0.001, ge=0.0, lt=0.5, description="Floor share of an SLO breacher.")
    """Floor for an endpoint breaching the SLO (p95 over it, or >= 5% errors), instead of
    ``min_share``: 0.001 still sends it a trickle to see it recover, without a whole
    percent of requests paying its latency. Traffic the proposal moves off a breacher
    leaves at once, exempt from ``max_shift``, for the same reason a drain is; traffic
    moving *onto* endpoints is still ramped."""

    breach_error_rate: float = Field(default=0.01, gt=0.0, le=1.0, description="Sustained error rate that breaches.")
    """An endpoint whose error rate over the last minute or so (requests and errors
    summed over decisions, decaying with a 60 s time constant, at least 30 requests) is at
    or above this is treated as breaching the SLO, like one whose p95 is over it. One
    window rarely shows a steady 2% error rate on an endpoint that gets 1% of the traffic
    (a handful of requests); the sum does. A single window at >= 5% errors breaches at
    once."""

    breach_hold_s: float = Field(default=30.0, ge=0.0, le=86400.0, description="Seconds a quiet breacher stays one.")
    """An endpoint that breached the SLO and now carries too little traffic to measure (the
    trickle of ``breach_min_share``) is still treated as breaching for up to this long: held
    at its floor and out of the critical set, instead of looking unknown, bouncing back to
    ``min_share`` and failing requests again. The first hold lasts 5 s, each breach within
    a minute of the last one doubles it up to this cap (as Envoy's outlier ejection grows
    with the ejection count), so a transient breach does not idle a good endpoint. A
    measurement within the SLO clears it at once; 0 turns the hold off."""

    rollback_after: int = Field(default=3, ge=1, le=1000, strict=True, description="Worse intervals before rollback.")
    """M: every interval the policy's proposal and the baseline's are scored on the same
    observation (negated LP objective: worst estimated load/capacity plus the cost term);
    after M consecutive intervals in which the policy scores worse, the controller rolls
    back to the baseline."""

    rollback_margin: float = Field(default=0.05, ge=0.0, le=10.0, description="Tolerance before counting as worse.")
    """How much lower (in LP objective units, where 0.05 is five points of utilisation)
    the policy's score may be before an interval counts against it; estimates are noisy."""

    probation_after: int = Field(default=3, ge=1, le=10000, strict=True, description="Good intervals to return.")
    """After a rollback, the policy keeps being scored in shadow; this many consecutive
    intervals in which it is no longer worse bring it back."""

    baseline: Literal["equal", "static", "cost_aware", "inverse_latency", "least_request"] = Field(
        default="cost_aware", description="Policy used on rollback."
    )
    """The heuristic the controller falls back to when the learned policy underperforms."""


class ApiConfig(_Model):
    """The HTTP API and dashboard served by Ray Serve."""

    host: str = Field(default="127.0.0.1", description="Address the HTTP API binds.")
    """Bind address of the API. Loopback by default: the API can change routing."""

    port: Port = Field(default=8000, description="HTTP port of the API.")
    """Where the API and dashboard are, whichever way the app was started: the Controller
    replica serves them here itself (``serve_directly``), unless Serve's HTTP proxy
    already listens here, in which case the proxy serves them."""

    serve_directly: bool = Field(default=True, description="Controller replica serves host:port itself.")
    """The Controller replica runs its own HTTP server on ``host:port`` (no proxy hop and
    no Ray task per request: a fraction of the proxy's CPU per request). Serve's HTTP
    proxy serves the same API on its own port (``http_options`` in ``serve_app.yaml``).
    False: only the proxy."""

    token: str | None = Field(
        default=None, min_length=16, max_length=4096, repr=False, description="Bearer token for mutating calls."
    )
    """Bearer token required by PUT/POST endpoints. Unset: one is generated on first
    start, written to ``state_dir/api-token`` (mode 0600) and printed once. Never logged."""

    checkpoint: Path | None = Field(default=None, description="RLModule checkpoint to serve.")
    """Checkpoint the Policy deployment loads; unset means the shipped one."""

    @field_validator("checkpoint")
    @classmethod
    def _check_checkpoint(cls, value: Path | None) -> Path | None:
        return _check_path(value)

    policy_niceness: int = Field(
        default=10, ge=0, le=19, strict=True, description="CPU niceness of the Policy deployment's replica."
    )
    """The Policy deployment (API and batch score calls) runs at this lower CPU priority
    than the Controller replica, so a flood of score calls cannot delay the control
    loop's own scoring; 0 leaves it at the default priority."""

    decision_log_size: int = Field(default=500, ge=10, le=100000, strict=True, description="Decisions kept.")
    """Decisions kept in memory for ``/api/decisions`` and the dashboard."""

    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30, strict=True, description="Largest request body.")
    """A request body larger than this is refused with 413 before it is read whole (the
    largest valid body, a 1,000-endpoint score request, is about 300 KB)."""
