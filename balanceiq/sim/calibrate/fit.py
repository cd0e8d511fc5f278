"""One endpoint's fitted simulator parameters and their error; ``model_*`` are FleetSim's closed
forms for an M/M/1 endpoint (:func:`~balanceiq.sim.queue.mm1` above a base latency, load above capacity shed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from balanceiq.sim.calibrate.recording import Samples, rounded
from balanceiq.sim.fleet import BASE_ERROR, SATURATION_MAX
from balanceiq.sim.queue import TIMEOUT_MS, mm1

LN2 = math.log(2.0)

LOW_LOAD_RHO = 0.5  # Records at or below this utilisation pin the base latency.

RELATIVE = ("p50", "p95", "inflight")
SIGNALS = (*RELATIVE, "saturation", "error_rate")

Arr = np.ndarray | float


def _mm1(mu: Arr, lam: Arr) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    return mm1(mu, np.asarray(lam, dtype=np.float64) / mu, TIMEOUT_MS)


def model_quantile_ms(mu: Arr, b: Arr, lam: Arr, q: float) -> np.ndarray:
    """FleetSim's latency quantile ``q`` (ms) of an endpoint (capacity ``mu``, base ``b``) at load ``lam``."""
    r, shift, _ = _mm1(mu, lam)
    return np.asarray(b, dtype=np.float64) + np.minimum(-math.log1p(-q) / r + shift, TIMEOUT_MS)


def model_inflight(mu: Arr, b: Arr, lam: Arr) -> np.ndarray:
    """FleetSim's in-flight requests (Little's law on accepted load and mean latency)."""
    return np.minimum(lam, mu) * (np.asarray(b, dtype=np.float64) + _mm1(mu, lam)[2]) * 1e-3


def model_saturation(mu: Arr, lam: Arr) -> np.ndarray:
    """FleetSim's observed saturation (utilisation, clipped like its observations)."""
    return np.minimum(np.asarray(lam, dtype=np.float64) / np.asarray(mu, dtype=np.float64), SATURATION_MAX)


def model_error_rate(mu: Arr, lam: Arr, base_error: float = BASE_ERROR) -> np.ndarray:
    """FleetSim's error rate: base errors plus everything above capacity shed."""
    lam = np.asarray(lam, dtype=np.float64)
    return 1.0 - (1.0 - base_error) * np.minimum(lam, mu) / np.maximum(lam, 1e-300)


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
    """Robust least squares of ``saturation = min(lam / mu, 1)``: the ``min`` keeps overloaded records (a live busy
    fraction stops at 1) as the constraint ``mu < lam`` instead of a bias. Saturation is proportional to load whatever
    the queueing discipline, so this holds even where the M/M/1 latency curve is the wrong shape."""
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
    """The median of ``p50`` minus the M/M/1 median wait over nearly idle records, where
    queueing is a small correction."""
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

    bounds = ([0.05, 0.0], [1e4, max(1.0, float(p50.max()))])
    best = None
    for start in (lam_max * 1.5, lam_max * 1.05, lam_max * 4.0):
        try:
            res = least_squares(resid, x0=[start / lam_max, b0], bounds=bounds, loss="soft_l1", f_scale=0.1)
        except ValueError:
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None:
        return None
    return float(best.x[0] * lam_max), float(best.x[1])


def _fit_errors(s: Samples, mu: float) -> tuple[float, float | None, int]:
    """Baseline: traffic-weighted error rate below 90% utilisation. Overload: the slope of excess errors against the
    simulator's shed fraction ``1 - 1/rho`` above capacity (1 where the fleet sheds like the simulator, 0 where it
    queues instead). Reported only: the scenario format has no error fields."""
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
    """Capacity, base latency and error behaviour of one endpoint (None: not enough data). Saturation and rps average
    over the same window, so capacity uses every sample but the draining ones (``sat = rps / capacity`` holds across a
    weight change); what is nonlinear in load (latency, errors) uses the settled samples."""
    settled = s.take(s.settled)
    mu = None
    used = "saturation"
    if method in ("auto", "saturation"):
        mu = _fit_capacity_saturation(s.take(~s.draining))
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


def errors(fit: EndpointFit, s: Samples) -> dict[str, np.ndarray]:
    """Per signal, the per-sample error of ``fit`` on ``s``: relative for p50, p95 and
    in-flight, absolute for saturation and error rate (fractions already)."""
    mu, b, lam = fit.capacity_rps, fit.base_latency_ms, s.rps
    e0 = fit.error_baseline if math.isfinite(fit.error_baseline) else BASE_ERROR
    pairs = {  # (predicted, observed), in the order of SIGNALS
        "p50": (model_quantile_ms(mu, b, lam, 0.5), s.p50),
        "p95": (model_quantile_ms(mu, b, lam, 0.95), s.p95),
        "inflight": (model_inflight(mu, b, lam), s.inflight),
        "saturation": (np.minimum(model_saturation(mu, lam), 1.0), np.minimum(s.sat, 1.0)),
        "error_rate": (model_error_rate(mu, lam, e0), s.err),
    }
    out = {}
    for name, (p, obs) in pairs.items():
        ok = np.isfinite(obs) & np.isfinite(p)
        if name in RELATIVE:
            ok &= obs > (0.05 if name == "inflight" else 0.0)
            out[name] = (p[ok] - obs[ok]) / obs[ok]
        else:
            out[name] = p[ok] - obs[ok]
    return out


def summarise(errs: Mapping[str, np.ndarray], *, held_out: bool) -> dict[str, Any]:
    """Median and p90 absolute error (held out), or RMS, median and bias (in sample)."""
    out: dict[str, Any] = {}
    for name, e in errs.items():
        if e.size == 0:
            out[name] = None
            continue
        a = np.abs(e)
        if held_out:
            stats = {"median_abs": rounded(np.median(a)), "p90_abs": rounded(np.percentile(a, 90))}
        else:
            stats = {
                "rms": rounded(np.sqrt(np.mean(e * e))),
                "median_abs": rounded(np.median(a)),
                "bias": rounded(np.median(e)),
            }
        out[name] = {**stats, "n": int(e.size), "kind": "relative" if name in RELATIVE else "absolute"}
    return out


def jackknife(values: Sequence[float], full: float) -> dict[str, Any]:
    """Delete-a-block jackknife standard error over the fold fits."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return {"stderr": None, "rel_stderr": None, "folds": int(v.size)}
    k = v.size
    se = math.sqrt((k - 1) / k * float(((v - v.mean()) ** 2).sum()))
    return {"stderr": rounded(se, 4), "rel_stderr": rounded(se / abs(full), 4) if full else None, "folds": int(k)}


def cross_validate(
    s: Samples, blocks: np.ndarray, folds: int, method: str, min_samples: int
) -> tuple[dict[str, np.ndarray], list[float], list[float]]:
    """Held-out errors per signal, and each fold's capacity and base latency: each contiguous
    block of records is predicted by a fit on the others (neighbouring records are correlated:
    interleaved hold-outs would flatter the fit)."""
    caps, bases = [], []
    held: dict[str, list[np.ndarray]] = {k: [] for k in SIGNALS}
    for k in range(folds):
        test = blocks == k
        if not (test & s.settled).any() or (~test & s.settled).sum() < max(3, min_samples // 2):
            continue
        f_k = fit_endpoint(s.take(~test), method=method)
        if f_k is None:
            continue
        caps.append(f_k.capacity_rps)
        bases.append(f_k.base_latency_ms)
        for signal, e in errors(f_k, s.take(test & s.settled)).items():
            held[signal].append(e)
    return concat(held), caps, bases


def concat(parts: Mapping[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
