"""Feature encoding: bounded whatever the observation says."""

from __future__ import annotations

import numpy as np
import pytest

from balanceiq.policy.features import N_FEATURES, encode
from balanceiq.telemetry.observation import EndpointObservation, Observation


def test_encode_is_bounded_for_extreme_finite_inputs() -> None:
    """Found by schemathesis through POST /api/policy/score: 1e-300 capacities overflowed."""
    import warnings

    eps = tuple(
        EndpointObservation(
            address=f"10.0.0.{i}:1", p95_ms=1e7, rps=r, saturation=1e6, cost_per_million=1e9, weight=2**32
        )
        for i, r in enumerate((1e300, 5e-324, 0.0))
    )
    obs = Observation(cluster="x", endpoints=eps, source="api")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = encode(obs, np.array([5e-324, 1e308, np.nan]), 3)
    assert np.all(np.isfinite(rows)) and np.abs(rows).max() <= 1e6


def test_utilisation_columns_use_requests_per_second_not_traffic_shares() -> None:
    # Regression: the rps column was normalised to shares in place before utilisation
    # was computed from it, so every utilisation came out ~1/capacity (0.001 at 400 rps
    # capacity) and the policy could not see load at all.
    eps = tuple(
        EndpointObservation(
            address=f"10.0.0.{i}:80",
            rps=r,
            p95_ms=50.0,
            error_rate=0.0,
            saturation=0.5,
            cost_per_million=0.4,
            healthy=True,
        )
        for i, r in enumerate((100.0, 300.0))
    )
    rows = encode(Observation(cluster="c", endpoints=eps, source="simulator"), np.array([200.0, 200.0]), 4)
    util, dev = rows[:2, N_FEATURES - 4], rows[:2, N_FEATURES - 3]
    assert util == pytest.approx([0.5, 1.5])
    assert dev == pytest.approx([-0.5, 0.5])  # fleet utilisation 400 / 400 = 1.0
