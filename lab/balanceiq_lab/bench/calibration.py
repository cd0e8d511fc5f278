"""How far a calibration (:mod:`balanceiq.sim.calibrate`) is from a known truth: the sample
backends' configured settings, or the scenario a simulator ran."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from balanceiq.sim.calibrate import Calibration
from balanceiq.sim.calibrate.fit import LN2, rounded
from balanceiq.sim.scenario import Scenario

_DEFINITIONS = {
    "capacity": "max sustainable rps: testbed concurrency / mean slot hold (base+extra+jitter/2+tail_prob*tail) s",
    "latency": "unloaded median latency: simulator base + 1000 ln2 / capacity; testbed base + extra + jitter/2",
}


def backend_truth(backend: Mapping[str, Any]) -> dict[str, float]:
    """Capacity and unloaded latency of a testbed backend from its configured settings.

    A sample backend holds one of ``concurrency`` slots for ``base_latency_ms +
    extra_latency_ms + U(0, jitter_ms)`` (plus ``tail_ms`` with probability ``tail_prob``),
    and never sheds: its capacity is ``concurrency / E[slot hold]``.
    """
    base = float(backend["base_latency_ms"])
    extra = float(backend.get("extra_latency_ms") or 0.0)
    jitter = float(backend["jitter_ms"] if backend.get("jitter_ms") is not None else 1.0)
    tail_p = float(backend.get("tail_prob") or 0.0)
    tail = float(backend.get("tail_ms") or 0.0)
    hold_ms = base + extra + jitter / 2.0 + tail_p * tail
    return {
        "capacity_rps": float(backend["concurrency"]) / (hold_ms / 1000.0) if hold_ms > 0 else math.inf,
        "unloaded_p50_ms": base + extra + jitter / 2.0 + (tail if tail_p > 0.5 else 0.0),
        "base_latency_ms": base,
    }


def _params(fitted: Scenario | Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    if isinstance(fitted, Scenario):
        return {
            e.name: {"capacity_rps": e.capacity_rps, "base_latency_ms": e.base_latency_ms} for e in fitted.endpoints
        }
    return {a: {k: float(v[k]) for k in ("capacity_rps", "base_latency_ms")} for a, v in fitted.items()}


def _compare(fitted: float, truth: float) -> dict[str, Any]:
    ok = math.isfinite(fitted) and math.isfinite(truth) and truth != 0
    return {
        "fitted": rounded(fitted, 3),
        "truth": rounded(truth, 3),
        "rel_error": rounded((fitted - truth) / truth) if ok else None,
    }


def _row(f: Mapping[str, float], t: Mapping[str, Any]) -> dict[str, Any]:
    if "concurrency" in t:
        tt, kind = backend_truth(t), "testbed"
    else:
        cap, base = float(t["capacity_rps"]), float(t["base_latency_ms"])
        tt, kind = (
            {"capacity_rps": cap, "base_latency_ms": base, "unloaded_p50_ms": base + 1000 * LN2 / cap},
            "simulator",
        )
    return {
        "truth": kind,
        "capacity_rps": _compare(f["capacity_rps"], tt["capacity_rps"]),
        "latency_ms": _compare(f["base_latency_ms"] + 1000 * LN2 / f["capacity_rps"], tt["unloaded_p50_ms"]),
        "base_latency_ms": _compare(f["base_latency_ms"], tt["base_latency_ms"]),
    }


def calibration_error(
    fitted: Calibration | Scenario | Mapping[str, Mapping[str, float]],
    truth: Scenario | Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Relative error ``(fitted - truth) / truth`` of fitted capacity and latency per
    endpoint, and worst / mean over endpoints; endpoints on one side only are ``missing``.

    ``fitted``: a :class:`Calibration`, a :class:`Scenario`, or ``{address: {capacity_rps,
    base_latency_ms}}``. ``truth``: the :class:`Scenario` a simulator ran, or per address
    either a testbed backend's settings (see :func:`backend_truth`) or simulator parameters.
    ``latency`` compares the unloaded median (the simulator puts service time in its
    exponential sojourn); ``base_latency`` is for reference only against a testbed.
    """
    fit_params = _params(fitted.scenario if isinstance(fitted, Calibration) else fitted)
    if isinstance(truth, Scenario):
        truth = _params(truth)
    rows = {a: _row(fit_params[a], t) for a, t in truth.items() if a in fit_params}

    def agg(key: str) -> dict[str, Any]:
        errs = [abs(r[key]["rel_error"]) for r in rows.values() if r[key]["rel_error"] is not None]
        return {
            "max_abs": rounded(max(errs)) if errs else None,
            "mean_abs": rounded(float(np.mean(errs))) if errs else None,
        }

    return {
        "endpoints": rows,
        "capacity_rel_error": agg("capacity_rps"),
        "latency_rel_error": agg("latency_ms"),
        "base_latency_rel_error": agg("base_latency_ms"),
        "missing": sorted((set(truth) - set(fit_params)) | (set(fit_params) - set(truth))),
        "definitions": dict(_DEFINITIONS),
    }
