"""How well a fit predicts: blocked cross-validation, jackknife standard errors, residuals.

Records are cut into ``folds`` contiguous blocks in time and each block is predicted by a
fit on the others (neighbouring records are correlated, so interleaved hold-outs would
flatter the fit). Errors are relative for p50, p95 and in-flight, absolute for saturation
and error rate (fractions already).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from balanceiq.sim.calibrate.fit import EndpointFit, fit_endpoint
from balanceiq.sim.calibrate.model import (
    model_error_rate,
    model_inflight,
    model_quantile_ms,
    model_saturation,
    rounded,
)
from balanceiq.sim.calibrate.recording import Samples
from balanceiq.sim.fleet import BASE_ERROR

RELATIVE = ("p50", "p95", "inflight")
ABSOLUTE = ("saturation", "error_rate")
SIGNALS = RELATIVE + ABSOLUTE
_OBSERVED = {"p50": "p50", "p95": "p95", "inflight": "inflight", "saturation": "sat", "error_rate": "err"}


def _predict(fit: EndpointFit, s: Samples) -> dict[str, np.ndarray]:
    mu, b, lam = fit.capacity_rps, fit.base_latency_ms, s.rps
    e0 = fit.error_baseline if math.isfinite(fit.error_baseline) else BASE_ERROR
    return {
        "p50": model_quantile_ms(mu, b, lam, 0.5),
        "p95": model_quantile_ms(mu, b, lam, 0.95),
        "saturation": np.minimum(model_saturation(mu, lam), 1.0),
        "inflight": model_inflight(mu, b, lam),
        "error_rate": model_error_rate(mu, lam, e0),
    }


def errors(fit: EndpointFit, s: Samples) -> dict[str, np.ndarray]:
    """Per signal, the per-sample error of ``fit`` on ``s``."""
    pred = _predict(fit, s)
    out = {}
    for name in SIGNALS:
        obs = getattr(s, _OBSERVED[name])
        if name == "saturation":
            obs = np.minimum(obs, 1.0)
        p = pred[name]
        if name in RELATIVE:
            ok = np.isfinite(obs) & np.isfinite(p) & (obs > (0.05 if name == "inflight" else 0.0))
            out[name] = (p[ok] - obs[ok]) / obs[ok]
        else:
            ok = np.isfinite(obs) & np.isfinite(p)
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
            out[name] = {
                "median_abs": rounded(np.median(a)),
                "p90_abs": rounded(np.percentile(a, 90)),
                "n": int(e.size),
            }
        else:
            rms = rounded(np.sqrt(np.mean(e * e)))
            out[name] = {
                "rms": rms,
                "median_abs": rounded(np.median(a)),
                "bias": rounded(np.median(e)),
                "n": int(e.size),
            }
        out[name]["kind"] = "relative" if name in RELATIVE else "absolute"
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
    """Held-out errors per signal, and each fold's capacity and base latency."""
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
    return _concat(held), caps, bases


def _concat(parts: Mapping[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def overall(
    held_out: Mapping[str, list[np.ndarray]], in_sample: Mapping[str, list[np.ndarray]], per_ep: Mapping[str, Any]
) -> dict[str, Any]:
    """The fit error pooled over endpoints, and the worst relative standard errors."""
    held, ins = _concat(held_out), _concat(in_sample)
    lat = np.abs(np.concatenate([held["p50"], held["p95"]]))
    lat_in = np.concatenate([ins["p50"], ins["p95"]])
    fitted = [e for e in per_ep.values() if e.get("fitted")]
    caps = [e["capacity_rps"]["rel_stderr"] for e in fitted if e["capacity_rps"]["rel_stderr"] is not None]
    bases = [e["base_latency_ms"]["rel_stderr"] for e in fitted if e["base_latency_ms"]["rel_stderr"] is not None]
    return {
        "held_out_latency_rel_err": rounded(np.median(lat)) if lat.size else None,
        "held_out": summarise(held, held_out=True),
        "in_sample_latency_rel_rms": rounded(np.sqrt(np.mean(lat_in * lat_in))) if lat_in.size else None,
        "in_sample": summarise(ins, held_out=False),
        "capacity_rel_stderr_max": rounded(max(caps)) if caps else None,
        "base_latency_rel_stderr_max": rounded(max(bases)) if bases else None,
    }
