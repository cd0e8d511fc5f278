"""Fitting one endpoint's simulator parameters to its samples.

``capacity_rps`` (mu) comes from **saturation** when the fleet exports it: robust least
squares of ``saturation = min(lam / mu, 1)``; the ``min`` keeps overloaded records (a live
busy fraction stops at 1) as the constraint ``mu < lam`` instead of a bias. Saturation is
proportional to load whatever the queueing discipline, so this recovers the service rate
even where the M/M/1 latency curve is the wrong shape. Otherwise from the **latency
curve**: ``mu`` and ``b`` jointly by robust least squares of log p50 and log p95.
``base_latency_ms`` (b), given ``mu``: the median of ``p50`` minus the M/M/1 median wait
over nearly idle records, where queueing is a small correction. Error behaviour (baseline
and overload shedding) is reported only: the scenario format has no error fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from balanceiq.sim.calibrate.model import LN2, model_quantile_ms
from balanceiq.sim.calibrate.recording import Samples

LOW_LOAD_RHO = 0.5
"""Records at or below this utilisation pin the base latency."""


@dataclass
class EndpointFit:
    """Fitted simulator parameters of one endpoint."""

    capacity_rps: float
    base_latency_ms: float
    method: str  # "saturation" | "latency"
    error_baseline: float = math.nan
    overload_shed_slope: float | None = None
    overloaded_samples: int = 0

    @property
    def unloaded_p50_ms(self) -> float:
        """The simulator's median latency with no load: base plus the M/M/1 median sojourn."""
        return self.base_latency_ms + 1000.0 * LN2 / self.capacity_rps


def _fit_capacity_saturation(s: Samples) -> float | None:
    ok = np.isfinite(s.sat) & (s.rps > 0)
    lam, sat = s.rps[ok], np.clip(s.sat[ok], 0.0, None)
    if lam.size < 3 or not (sat > 0.02).any():
        return None
    below = sat < 0.9
    if below.sum() >= 2 and sat[below].sum() > 0:
        inv0 = float(sat[below].sum() / lam[below].sum())
    else:
        inv0 = float(np.median(sat / lam))
    scale = max(inv0, 1e-9)  # fit k = 1/mu scaled so the parameter is of order one

    def resid(x: np.ndarray) -> np.ndarray:
        return np.minimum(lam * x[0] * scale, 1.0) - np.minimum(sat, 1.0)

    res = least_squares(resid, x0=[1.0], bounds=([1e-6], [1e6]), loss="soft_l1", f_scale=0.05)
    inv = float(res.x[0] * scale)
    return 1.0 / inv if inv > 0 else None


def _base_given_capacity(s: Samples, mu: float) -> float:
    ok = np.isfinite(s.p50) & (s.rps > 0)
    lam, p50 = s.rps[ok], s.p50[ok]
    if lam.size == 0:
        return math.nan
    rho = lam / mu
    low = rho <= LOW_LOAD_RHO
    if low.sum() < 3:  # too few nearly idle records: the lowest-load third (at least three)
        low = np.zeros(lam.size, dtype=bool)
        low[np.argsort(rho)[: max(3, math.ceil(lam.size / 3))]] = True
    wait = model_quantile_ms(mu, 0.0, lam[low], 0.5)
    return max(0.0, float(np.median(p50[low] - wait)))


def fit_latency_curve(s: Samples) -> tuple[float, float] | None:
    """(mu, b) by robust least squares of log p50 and log p95 against the model."""
    ok = np.isfinite(s.p50) & (s.p50 > 0) & (s.rps > 0)
    lam = s.rps[ok]
    if lam.size < 4:
        return None
    p50 = s.p50[ok]
    p95 = np.where(np.isfinite(s.p95[ok]) & (s.p95[ok] > 0), s.p95[ok], np.nan)
    has95 = np.isfinite(p95)
    b0 = float(max(0.0, np.percentile(p50, 10) * 0.8))
    lam_max = float(lam.max())

    def resid(x: np.ndarray) -> np.ndarray:
        mu, b = x[0] * lam_max, x[1]
        r50 = np.log(model_quantile_ms(mu, b, lam, 0.5)) - np.log(p50)
        r95 = np.log(model_quantile_ms(mu, b, lam[has95], 0.95)) - np.log(p95[has95])
        return np.concatenate([r50, r95])

    best = None
    for start in (lam_max * 1.5, lam_max * 1.05, lam_max * 4.0):
        try:
            res = least_squares(
                resid,
                x0=[start / lam_max, b0],
                bounds=([0.05, 0.0], [1e4, max(1.0, float(p50.max()))]),
                loss="soft_l1",
                f_scale=0.1,
            )
        except ValueError:
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None:
        return None
    return float(best.x[0] * lam_max), float(best.x[1])


def _fit_errors(s: Samples, mu: float) -> tuple[float, float | None, int]:
    """Baseline: traffic-weighted error rate below 90% utilisation. Overload: the slope of
    excess errors against the simulator's shed fraction ``1 - 1/rho`` above capacity (1
    where the fleet sheds like the simulator, 0 where it queues instead)."""
    ok = np.isfinite(s.err) & (s.rps > 0)
    lam, err = s.rps[ok], np.clip(s.err[ok], 0.0, 1.0)
    if lam.size == 0:
        return math.nan, None, 0
    rho = lam / mu
    under = rho < 0.9
    base = float((err[under] * lam[under]).sum() / lam[under].sum()) if under.any() else float(np.median(err))
    over = rho > 1.0
    if not over.any():
        return base, None, 0
    shed = 1.0 - 1.0 / rho[over]
    excess = err[over] - base
    slope = float(np.clip((shed * excess).sum() / max((shed * shed).sum(), 1e-12), 0.0, 1.0))
    return base, slope, int(over.sum())


def fit_endpoint(s: Samples, *, method: str = "auto") -> EndpointFit | None:
    """Capacity, base latency and error behaviour of one endpoint (None: not enough data).

    Capacity from saturation uses every sample but the draining ones: saturation and rps
    average over the same window, so one spanning a weight change still has ``sat = rps /
    capacity``. Everything nonlinear in load (latency, errors) uses the settled samples.
    """
    settled = s.take(s.settled)
    mu = None
    used = method
    if method in ("auto", "saturation"):
        mu = _fit_capacity_saturation(s.take(~s.draining))
        used = "saturation"
    if mu is None and method in ("auto", "latency"):
        fit = fit_latency_curve(settled)
        if fit is None:
            return None
        mu, used = fit[0], "latency"
    if mu is None or not math.isfinite(mu) or mu <= 0:
        return None
    b = _base_given_capacity(settled, mu)
    if not math.isfinite(b):
        return None
    e0, slope, n_over = _fit_errors(settled, mu)
    return EndpointFit(mu, b, used, error_baseline=e0, overload_shed_slope=slope, overloaded_samples=n_over)
