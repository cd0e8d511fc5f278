"""FleetSim's per-endpoint signals in closed form: what the calibration fits against.

They reproduce :meth:`~balanceiq.sim.fleet.FleetSim.step` exactly (a unit test holds
them to it): M/M/1 sojourn above a base latency, frozen at ``RHO_SAT`` and rising to the
timeout by ``RHO_FULL``; load above capacity is shed.
"""

from __future__ import annotations

import math

import numpy as np

from balanceiq.sim.fleet import BASE_ERROR, RHO_FULL, RHO_SAT, SATURATION_MAX, TIMEOUT_MS

LN2 = math.log(2.0)

Arr = np.ndarray | float


def _rate_and_shift(mu: Arr, lam: Arr) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    rho = np.asarray(lam, dtype=np.float64) / mu
    r = mu * (1.0 - np.minimum(rho, RHO_SAT)) * 1e-3  # sojourn rate per ms
    shift = np.clip((rho - RHO_SAT) * (TIMEOUT_MS / (RHO_FULL - RHO_SAT)), 0.0, TIMEOUT_MS)
    return r, shift


def model_quantile_ms(mu: Arr, b: Arr, lam: Arr, q: float) -> np.ndarray:
    """FleetSim's latency quantile ``q`` (ms) of an endpoint (capacity ``mu``, base ``b``) at load ``lam``."""
    r, shift = _rate_and_shift(mu, lam)
    return np.asarray(b, dtype=np.float64) + np.minimum(-math.log1p(-q) / r + shift, TIMEOUT_MS)


def model_inflight(mu: Arr, b: Arr, lam: Arr) -> np.ndarray:
    """FleetSim's in-flight requests (Little's law on accepted load and mean latency)."""
    r, shift = _rate_and_shift(mu, lam)
    gap = np.maximum(TIMEOUT_MS - shift, 0.0)
    mean_wait = TIMEOUT_MS - gap - np.expm1(-r * gap) / r
    return np.minimum(lam, mu) * (np.asarray(b, dtype=np.float64) + mean_wait) * 1e-3


def model_saturation(mu: Arr, lam: Arr) -> np.ndarray:
    """FleetSim's observed saturation (utilisation, clipped like its observations)."""
    return np.minimum(np.asarray(lam, dtype=np.float64) / np.asarray(mu, dtype=np.float64), SATURATION_MAX)


def model_error_rate(mu: Arr, lam: Arr, base_error: float = BASE_ERROR) -> np.ndarray:
    """FleetSim's error rate: base errors plus everything above capacity shed."""
    lam = np.asarray(lam, dtype=np.float64)
    return 1.0 - (1.0 - base_error) * np.minimum(lam, mu) / np.maximum(lam, 1e-300)


def rounded(x: float, nd: int = 4) -> float | None:
    """``x`` rounded for a report; None when not finite (JSON has no nan)."""
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None
