"""Results summaries every benchmark reports: latency percentiles, error rate, SLO attainment.

Percentiles interpolate linearly (``numpy.percentile``); an empty sample gives ``None``,
never NaN, because JSON has no NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LATENCY_KEYS", "error_rate", "finite", "latency_summary", "percentile", "slo_attainment"]

LATENCY_KEYS = ("p50", "p90", "p99", "p999", "max", "mean", "n")
_QUANTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}


def finite(values: np.ndarray | Sequence[float]) -> np.ndarray:
    """``values`` as a float array without NaN/inf (a request with no latency yet)."""
    arr = np.asarray(values, dtype=np.float64)
    return arr[np.isfinite(arr)]


def percentile(values: np.ndarray | Sequence[float], q: float, method: str = "linear") -> float | None:
    """The ``q``-th percentile (0..100) of the finite values; ``None`` when there are none."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    arr = finite(values)
    return float(np.percentile(arr, q, method=method)) if arr.size else None  # type: ignore[call-overload]


def latency_summary(
    values: np.ndarray | Sequence[float],
    digits: int = 3,
    keys: Sequence[str] = LATENCY_KEYS,
    method: str = "linear",
) -> dict[str, Any]:
    """The statistics named in ``keys`` (percentiles ``p50``..``p999``, ``max``, ``mean``,
    ``n``) of the finite values, rounded to ``digits``, in the order of ``keys``;
    ``method`` as ``numpy.percentile``'s."""
    arr = finite(values)

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    out: dict[str, Any] = {}
    for k in keys:
        if k == "n":
            out[k] = int(arr.size)
        elif k == "max":
            out[k] = r(float(arr.max())) if arr.size else None
        elif k == "mean":
            out[k] = r(float(arr.mean())) if arr.size else None
        else:
            out[k] = r(percentile(arr, _QUANTILES[k], method))
    return out


def error_rate(requests: int, ok: int) -> float | None:
    """Share of ``requests`` that were not answered 2xx; ``None`` for no requests."""
    return (requests - ok) / requests if requests else None


def slo_attainment(ok: np.ndarray, latency_ms: np.ndarray, slo_ms: float) -> float | None:
    """Share of requests answered 2xx within ``slo_ms``; ``None`` for no requests."""
    n = int(ok.size)
    return float((ok & (latency_ms <= slo_ms)).sum()) / n if n else None
