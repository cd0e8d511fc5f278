"""Feature encoding: bounded whatever the observation says."""

from __future__ import annotations

import numpy as np



def test_encode_is_bounded_for_extreme_finite_inputs() -> None:
    """Found by schemathesis through POST /api/policy/score: 1e-300 capacities overflowed."""
    import warnings

    from balanceiq.policy.features import encode
    from balanceiq.telemetry.observation import EndpointObservation, Observation

    eps = tuple(
        EndpointObservation(address=f"10.0.0.{i}:1", p95_ms=1e7, rps=r, saturation=1e6, cost_per_million=1e9, weight=2**32)
        for i, r in enumerate((1e300, 5e-324, 0.0))
    )
    obs = Observation(cluster="x", endpoints=eps, source="api")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = encode(obs, np.array([5e-324, 1e308, np.nan]), 3)
    assert np.all(np.isfinite(rows)) and np.abs(rows).max() <= 1e6

