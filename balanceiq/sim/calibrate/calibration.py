"""The whole fit: every endpoint of a recording, the scenario, the fit report, and writing them."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from balanceiq.sim.calibrate.fit import (
    LOW_LOAD_RHO,
    SIGNALS,
    EndpointFit,
    concat,
    cross_validate,
    errors,
    fit_endpoint,
    fit_latency_curve,
    jackknife,
    summarise,
)
from balanceiq.sim.calibrate.recording import (
    CalibrationError,
    Recording,
    Samples,
    endpoint_samples,
    finite,
    read_recording,
    rounded,
)
from balanceiq.sim.fleet import BASE_ERROR
from balanceiq.sim.scenario import Scenario, scenario_from_dict

WELL_LOADED_RHO = 0.5  # below this peak utilisation the fit extrapolates from light load: the report warns


@dataclass
class Calibration:
    """A fitted scenario and the report of how well it fits."""

    scenario: Scenario
    report: dict[str, Any]
    fits: dict[str, EndpointFit]


@dataclass
class _Fits:
    """What fitting every endpoint gathers for the report."""

    fits: dict[str, EndpointFit] = field(default_factory=dict)
    per_ep: dict[str, dict[str, Any]] = field(default_factory=dict)
    held_out: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in SIGNALS})
    in_sample: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in SIGNALS})
    warnings: list[str] = field(default_factory=list)


def calibrate(
    recording: Path | str,
    *,
    name: str = "calibrated",
    folds: int = 5,
    settle_margin_s: float | None = None,
    min_samples: int = 6,
    method: str = "auto",
    endpoints: Mapping[str, tuple[str, str]] | None = None,
) -> Calibration:
    """Fit a simulator scenario to a recording (see :mod:`balanceiq.sim.calibrate`). ``endpoints``: address -> ``(cloud,
    region)`` (default ``live``/``recorded``); ``method`` forces the capacity estimator (``auto``: saturation when
    recorded); ``settle_margin_s`` defaults to a quarter window (one scrape plus one rule evaluation). An endpoint with
    fewer than ``min_samples`` settled records is fitted on all of them, with a warning."""
    if method not in ("auto", "saturation", "latency"):
        raise CalibrationError(f"unknown capacity method {method!r}; use auto, saturation or latency")
    rec = read_recording(recording)
    windows = [finite(r["observation"].get("window_s")) for r in rec.records]
    window_s = float(np.nanmedian(windows)) if any(math.isfinite(w) for w in windows) else 10.0
    if settle_margin_s is None:
        settle_margin_s = window_s / 4.0
    addresses, samples, settled = endpoint_samples(rec, settle_margin_s=settle_margin_s, default_window_s=window_s)
    n_records = len(rec.records)
    folds = max(2, min(int(folds), n_records))
    block = np.minimum((np.arange(n_records) * folds) // n_records, folds - 1)
    acc = _Fits()
    for a in addresses:
        _fit_one(acc, a, samples[a], block, folds, min_samples, method)
    if not acc.fits:
        raise CalibrationError(
            f"recording {rec.path}: no endpoint could be fitted ({n_records} usable record(s)); "
            + "; ".join(acc.warnings)
        )
    demand, demand_info = _demand(rec.records)
    report = {
        "recording": rec.path,
        "lines": rec.lines,
        "records": n_records,
        "bad_lines": rec.bad_reasons.total(),
        "bad_reasons": dict(rec.bad_reasons),
        "skipped_records": dict(rec.skipped),
        "cluster": rec.records[0]["observation"].get("cluster"),
        "settled_records": int(settled.sum()),
        "window_s": rounded(window_s, 3),
        "settle_margin_s": settle_margin_s,
        "folds": folds,
        "model": _model_description(acc.fits),
        "endpoints": acc.per_ep,
        "overall": _overall(acc.held_out, acc.in_sample, acc.per_ep),
        "demand": demand_info,
        "warnings": acc.warnings,
        "created": time.time(),
    }
    scenario = _scenario(rec, samples, acc.fits, endpoints, demand, name)
    return Calibration(scenario=scenario, report=report, fits=acc.fits)


def _fit_one(acc: _Fits, a: str, s: Samples, block: np.ndarray, folds: int, min_samples: int, method: str) -> None:
    """Fit endpoint ``a``, cross-validate it, and add its report entry and warnings to ``acc``."""
    used = "settled"
    n_settled = int(s.settled.sum())
    if n_settled < min_samples:
        if len(s) < min_samples:
            acc.warnings.append(f"{a}: {len(s)} usable record(s), fewer than {min_samples}: not fitted")
            acc.per_ep[a] = {"fitted": False, "samples": len(s)}
            return
        acc.warnings.append(
            f"{a}: only {n_settled} settled record(s); fitted on all {len(s)}, including records whose window spans a weight change"
        )
        s = replace(s, settled=np.ones(len(s), dtype=bool))
        used = "all"
    fit = fit_endpoint(s, method=method)
    if fit is None:
        acc.warnings.append(f"{a}: no fit (no saturation and no latency curve it could fit)")
        acc.per_ep[a] = {"fitted": False, "samples": len(s)}
        return
    acc.fits[a] = fit
    held, caps, bases = cross_validate(s, block[s.record], folds, fit.method, min_samples)
    s_settled = s.take(s.settled)
    in_errs = errors(fit, s_settled)
    for sig in SIGNALS:
        acc.held_out[sig].append(held[sig])
        acc.in_sample[sig].append(in_errs[sig])
    rho = s.rps / fit.capacity_rps
    entry = acc.per_ep[a] = {
        "fitted": True,
        "samples": len(s),
        "settled_samples": int(s.settled.sum()),
        "records_used": used,
        "load_rps": [rounded(s.rps.min(), 2), rounded(s.rps.max(), 2)],
        "utilization": [rounded(rho.min(), 3), rounded(rho.max(), 3)],
        "capacity_rps": {
            "value": rounded(fit.capacity_rps, 3),
            "method": fit.method,
            **jackknife(caps, fit.capacity_rps),
        },
        "base_latency_ms": {"value": rounded(fit.base_latency_ms, 3), **jackknife(bases, fit.base_latency_ms)},
        "unloaded_p50_ms": rounded(fit.unloaded_p50_ms, 3),
        "errors": {
            "baseline": rounded(fit.error_baseline, 5),
            "overload_shed_slope": rounded(fit.overload_shed_slope, 3),
            "overloaded_samples": fit.overloaded_samples,
        },
        "held_out": summarise(held, held_out=True),
        "in_sample": summarise(in_errs, held_out=False),
    }
    _check_identified(acc.warnings, a, s_settled, fit, entry, float(rho.max()))


def _check_identified(
    warnings: list[str], a: str, s_settled: Samples, fit: EndpointFit, entry: dict[str, Any], top: float
) -> None:
    """Warn when capacity is extrapolated from light load, or when the live latency curve is
    not the simulator's M/M/1 shape (queueing flatter or steeper than the capacity implies)."""
    if top < WELL_LOADED_RHO:
        warnings.append(
            f"{a}: the recording loads it to only {top:.0%} of the fitted capacity, which is poorly "
            f"identified (+-{pct(entry['capacity_rps']['rel_stderr'])}): record with more load on it "
            "(balanceiq record --rate, or fewer endpoints)"
        )
    if fit.method != "saturation":
        return
    cross = fit_latency_curve(s_settled)
    if cross is None:
        return
    entry["capacity_rps"]["latency_curve_estimate"] = rounded(cross[0], 3)
    ratio = cross[0] / fit.capacity_rps
    if top >= WELL_LOADED_RHO and not 2 / 3 <= ratio <= 1.5:
        bias = entry["in_sample"].get("p95") or {}
        warnings.append(
            f"{a}: latency follows an M/M/1 curve of capacity {cross[0]:.0f} rps, not the "
            f"{fit.capacity_rps:.0f} rps saturation shows: the live queueing is "
            + ("flatter (several servers, steady service times)" if ratio > 1 else "steeper")
            + f" than the simulator's; its p95 is off by {pct(bias.get('bias'))} (median) in sample"
        )


def _overall(
    held_out: Mapping[str, list[np.ndarray]], in_sample: Mapping[str, list[np.ndarray]], per_ep: Mapping[str, Any]
) -> dict[str, Any]:
    """The fit error pooled over endpoints, and the worst relative standard errors."""
    held, ins = concat(held_out), concat(in_sample)
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


def _model_description(fits: Mapping[str, EndpointFit]) -> dict[str, Any]:
    return {
        "simulator": "FleetSim M/M/1 (balanceiq.sim.fleet)",
        "capacity": "saturation = min(rps / capacity, 1), robust least squares"
        if all(f.method == "saturation" for f in fits.values())
        else "saturation where recorded, else the M/M/1 latency curve (robust least squares of log p50, log p95)",
        "base_latency": f"median of p50 - M/M/1 median wait over records at utilisation <= {LOW_LOAD_RHO}",
        "simulator_error_model": {"base_error": BASE_ERROR, "overload_shed_slope": 1.0},
    }


def _scenario(
    rec: Recording,
    samples: Mapping[str, Samples],
    fits: Mapping[str, EndpointFit],
    endpoints: Mapping[str, tuple[str, str]] | None,
    demand: dict[str, Any],
    name: str,
) -> Scenario:
    """The fitted fleet; endpoints without a fit still belong in it, with typical values."""
    addresses = list(samples)
    typical_cap = float(np.median([f.capacity_rps for f in fits.values()]))
    typical_base = float(np.median([f.base_latency_ms for f in fits.values()]))
    first_weights = _first_weights(rec.records, addresses)
    specs = []
    for a in addresses:
        f = fits.get(a)
        cloud, region = (endpoints or {}).get(a, ("live", "recorded"))
        cost = samples[a].cost[np.isfinite(samples[a].cost)]
        specs.append(
            {
                "name": a,
                "cloud": cloud,
                "region": region,
                "capacity_rps": round(f.capacity_rps if f else typical_cap, 2),
                "base_latency_ms": round(f.base_latency_ms if f else typical_base, 2),
                "cost_per_million": round(float(np.median(cost)), 6) if cost.size else 0.0,
                "weight": first_weights.get(a, 1),
            }
        )
    methods = ", ".join(sorted({f.method for f in fits.values()}))
    description = (
        f"Calibrated from {Path(rec.path).name}: {len(rec.records)} records, {len(fits)}/{len(addresses)} "
        f"endpoints fitted (FleetSim M/M/1; capacity from {methods})."
    )
    data = {"name": name, "description": description, "step_s": 1.0, "duration_s": 600.0, "seed": 0, "events": []}
    return scenario_from_dict({**data, "demand": demand, "endpoints": specs}, source=f"calibration of {rec.path}")


def _first_weights(records: Sequence[Mapping[str, Any]], addresses: Sequence[str]) -> dict[str, int]:
    """Static weights for the scenario: those in force at the first record, reduced."""
    for r in records:
        w = {e["address"]: finite(e.get("weight")) for e in r["observation"]["endpoints"]}
        if all(math.isfinite(w.get(a, math.nan)) and w[a] >= 1 for a in addresses):
            ints = [max(1, round(w[a])) for a in addresses]
            g = math.gcd(*ints)
            return {a: i // g for a, i in zip(addresses, ints)}
    return dict.fromkeys(addresses, 1)


def _demand(records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scenario's demand (the recording's median total rps, no daily cycle) and its report."""
    totals = []
    for r in records:
        t = sum(x for x in (finite(e.get("rps")) for e in r["observation"]["endpoints"]) if x > 0)
        if t > 0:
            totals.append(t)
    tot = np.asarray(totals)
    noise = float(np.std(np.log(tot))) if tot.size > 1 else 0.0
    spec = {
        "base_rps": round(float(np.median(tot)), 2),
        "diurnal_amplitude": 0.0,
        "noise": round(min(max(noise, 0.0), 1.0), 4),
    }
    info = {
        **spec,
        "min_rps": rounded(tot.min(), 2),
        "max_rps": rounded(tot.max(), 2),
        "note": "total rps of the recording; no daily cycle is fitted (add one by editing demand)",
    }
    return spec, info


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def scenario_yaml(cal: Calibration) -> str:
    """The scenario as YAML (loadable by :func:`~balanceiq.sim.scenario.load_scenario`),
    with a header comment summarising the fit."""
    rep = cal.report
    head = [
        f"# {cal.scenario.name}: written by balanceiq calibrate from {rep['recording']}",
        f"# {rep['records']} records ({rep['bad_lines']} bad lines skipped), {rep['settled_records']} settled; "
        f"held-out median latency error {pct(rep['overall']['held_out_latency_rel_err'])}.",
        "# Per endpoint: capacity_rps is the M/M/1 service rate, base_latency_ms its fixed part;",
        "# errors (not in the scenario format) are in the fit report:",
    ]
    for a, e in rep["endpoints"].items():
        if not e.get("fitted"):
            head.append(f"#   {a}: NOT FITTED ({e.get('samples', 0)} records): typical values used")
            continue
        cap, base = e["capacity_rps"], e["base_latency_ms"]
        head.append(
            f"#   {a}: capacity {cap['value']:.1f} rps (+-{pct(cap['rel_stderr'])}, {cap['method']}), "
            f"base {base['value']:.1f} ms (+-{pct(base['rel_stderr'])}), error baseline {e['errors']['baseline']}"
        )
    data = cal.scenario.model_dump(mode="json")
    return "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=200)


def fit_summary(report: Mapping[str, Any]) -> str:
    """A few lines of fit error for a terminal: per endpoint and overall."""
    held = report["overall"].get("held_out") or {}

    def med(sig: str) -> str:
        v = held.get(sig)
        return "n/a" if not v else (pct(v["median_abs"]) if v["kind"] == "relative" else f"{v['median_abs']:.3f}")

    lines = [
        f"calibrated from {report['recording']}: {report['records']} records "
        f"({report['bad_lines']} bad lines skipped, {report['settled_records']} settled)",
        f"  held-out error (median, {report['folds']} time blocks): p50 {med('p50')}, p95 {med('p95')}, "
        f"in-flight {med('inflight')}, saturation {med('saturation')} abs, error rate {med('error_rate')} abs",
    ]
    for a, e in report["endpoints"].items():
        if not e.get("fitted"):
            lines.append(f"  {a}: not fitted ({e.get('samples', 0)} usable records)")
            continue
        cap, base, util = e["capacity_rps"], e["base_latency_ms"], e["utilization"]
        lines.append(
            f"  {a}: capacity {cap['value']:.1f} rps +-{pct(cap['rel_stderr'])} ({cap['method']}), "
            f"base latency {base['value']:.1f} ms +-{pct(base['rel_stderr'])}, "
            f"unloaded p50 {e['unloaded_p50_ms']:.1f} ms, utilisation {util[0]:.2f}-{util[1]:.2f}"
        )
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def write_calibration(cal: Calibration, scenario_path: Path | str, report_path: Path | str | None = None) -> None:
    """Write the scenario YAML (and the report JSON)."""
    for path, text in ((scenario_path, scenario_yaml(cal)), (report_path, json.dumps(cal.report, indent=1))):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
