"""The control loop, its guardrails and the API that serves it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from balanceiq.config.base import ConfigPath, Port, PosFloat, _Model


def critical_count(n_endpoints: int) -> int:
    """Default K: about 20% of N, at least 2 (one critical endpoint alone cannot move), at most N."""
    if n_endpoints <= 0:
        return 0
    return min(n_endpoints, max(2, round(n_endpoints / 5)))


class ControlConfig(_Model):
    """The control loop: how often it acts and how many endpoints it re-weights."""

    mode: Literal["active", "shadow"] = "active"
    """active: steer; shadow: decide, push nothing."""

    interval_s: PosFloat = Field(default=5.0, le=3600)
    """Seconds between control steps (0-3600]."""

    k_critical: int | None = Field(default=None, ge=1, strict=True)
    """Critical endpoints per step (None: about 20% of N)."""

    util_target: float = Field(default=0.7, ge=0.0, le=1.0)
    """Utilisation that costs nothing in the LP."""

    cost_weight: float = Field(default=0.3, ge=0.0, le=100.0)
    """Weight of the LP's cost term: a share's price in units of the median endpoint's price."""

    latency_weight: float = Field(default=0.2, ge=0.0, le=100.0)
    """Weight of the LP's latency term."""

    def critical_count(self, n_endpoints: int) -> int:
        """K for a cluster of ``n_endpoints`` endpoints, clamped to ``0..n_endpoints``."""
        if self.k_critical is not None:
            return max(0, min(self.k_critical, n_endpoints))
        return critical_count(n_endpoints)


class GuardrailConfig(_Model):
    """Limits between the LP and the weight store; every decision passes through them."""

    min_share: float = Field(default=0.01, ge=0.0, lt=0.5)
    """Floor share of each healthy endpoint."""

    # Moves off a down, drained or SLO-breaching endpoint are exempt: safety beats smoothness.
    max_shift: float = Field(default=0.25, gt=0.0, le=1.0)
    """Max traffic moved per decision."""

    breach_min_share: float = Field(default=0.001, ge=0.0, lt=0.5)
    """Floor share of an SLO breacher."""

    breach_error_rate: float = Field(default=0.01, gt=0.0, le=1.0)
    """Sustained error rate that breaches."""

    # The hold starts at 5 s and doubles per breach within a minute, up to this; 0: off.
    breach_hold_s: float = Field(default=30.0, ge=0.0, le=86400.0)
    """Seconds a quiet breacher stays one."""

    # Policy and baseline are scored on the same observation (negated LP objective) each interval.
    rollback_after: int = Field(default=3, ge=1, le=1000, strict=True)
    """Worse intervals before rollback."""

    rollback_margin: float = Field(default=0.05, ge=0.0, le=10.0)
    """Tolerance before counting as worse."""

    probation_after: int = Field(default=3, ge=1, le=10000, strict=True)
    """Good intervals to return."""

    baseline: Literal["equal", "static", "cost_aware", "inverse_latency", "least_request"] = "cost_aware"
    """Policy used on rollback."""


class ApiConfig(_Model):
    """The HTTP API and dashboard served by Ray Serve."""

    host: str = "127.0.0.1"
    """Address the HTTP API binds."""

    port: Port = 8000
    """HTTP port of the API."""

    serve_directly: bool = True
    """Controller replica serves host:port itself."""

    # Unset: generated on first start into state_dir/api-token (mode 0600). Never logged.
    token: str | None = Field(default=None, min_length=16, max_length=4096, repr=False)
    """Bearer token for mutating calls."""

    checkpoint: ConfigPath | None = None
    """RLModule checkpoint to serve."""

    policy_niceness: int = Field(default=10, ge=0, le=19, strict=True)
    """CPU niceness of the Policy deployment's replica."""

    decision_log_size: int = Field(default=500, ge=10, le=100000, strict=True)
    """Decisions kept."""

    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30, strict=True)
    """Largest request body."""
