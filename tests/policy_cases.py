"""Observations and contexts the baseline tests of the product and of the lab share."""

from __future__ import annotations

import math

import numpy as np

from balanceiq.config import UINT32_MAX
from balanceiq.policy.baselines import Decision, PolicyContext
from balanceiq.telemetry.observation import NO_TRAFFIC, EndpointObservation, Observation

NAN = math.nan


def fleet(
    *, healthy: tuple[bool | None, ...] = (True, True, True, None), p95: tuple[float, ...] = (20, 40, 80, NAN)
) -> Observation:
    flags = [frozenset() if math.isfinite(p) else frozenset({NO_TRAFFIC}) for p in p95]
    rps = (300.0, 200.0, 100.0, 0.0)
    eps = tuple(
        EndpointObservation(
            address=f"10.0.0.{i}:80",
            p50_ms=p / 2,
            p95_ms=p,
            error_rate=0.0,
            saturation=[0.3, 0.5, 0.9, NAN][i],
            inflight=[3.0, 5.0, 9.0, NAN][i],
            rps=rps[i],
            cost_per_million=[0.2, 0.5, 1.0, NAN][i],
            weight=1.0,
            healthy=healthy[i],
            flags=flags[i],
        )
        for i, p in enumerate(p95)
    )
    return Observation(cluster="web", endpoints=eps, source="simulator")


def context(**over: object) -> PolicyContext:
    base: dict[str, object] = {
        "shares": np.array([0.4, 0.3, 0.2, 0.1]),
        "capacity_hint": np.array([1000.0, NAN, 200.0, NAN]),
        "static_weights": np.array([3.0, 2.0, 1.0, 1.0]),
        "demand_rps": 600.0,
        "k": 2,
        "true_capacity": np.array([1000.0, 400.0, 200.0, 300.0]),
    }
    base.update(over)
    return PolicyContext(**base)  # type: ignore[arg-type]


def assert_valid(d: Decision, n: int, available: np.ndarray | None = None) -> None:
    assert isinstance(d, Decision)
    assert d.shares.shape == (n,) and np.all(np.isfinite(d.shares)) and np.all(d.shares >= 0)
    assert abs(float(d.shares.sum()) - 1.0) <= 1e-9
    assert d.weights.shape == (n,) and np.issubdtype(d.weights.dtype, np.integer)
    assert np.all(d.weights >= 1) and int(d.weights.sum()) <= UINT32_MAX
    assert all(0 <= i < n for i in d.critical)
    if available is not None:
        assert np.all(d.shares[~available] == 0)


def window_breaching(obs: Observation, slo_ms: float) -> list[int]:
    """Endpoints in visible trouble in this window: p95 over the SLO or >= 5% errors."""
    return [
        i
        for i, e in enumerate(obs.endpoints)
        if (math.isfinite(e.p95_ms) and e.p95_ms > slo_ms) or (math.isfinite(e.error_rate) and e.error_rate >= 0.05)
    ]


def nothing_measured() -> tuple[Observation, PolicyContext]:
    """Three endpoints with no traffic, and a context of NaNs, zeros and a K over N."""
    eps = tuple(EndpointObservation(address=f"h{i}:1", flags=frozenset({NO_TRAFFIC})) for i in range(3))
    obs = Observation(cluster="c", endpoints=eps, source="none")
    ctx = PolicyContext(
        shares=np.array([NAN, NAN, NAN]),
        capacity_hint=np.full(3, NAN),
        static_weights=np.array([1.0, NAN, 0.0]),
        demand_rps=NAN,
        k=5,
        true_capacity=np.array([NAN, 0.0, 10.0]),
    )
    return obs, ctx
