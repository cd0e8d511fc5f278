"""Calibrate the simulator from recorded live telemetry.

Input: a recording, one JSON line per control step as
:class:`~balanceiq.control.records.DecisionLog` writes it (``Controller(recording=...)``,
``balanceiq record``), each with its full observation: per endpoint ``rps``, ``p50_ms``,
``p95_ms``, ``error_rate``, ``saturation``, ``inflight``, ``weight``, ``healthy``, flags.
Output: a :class:`~balanceiq.sim.scenario.Scenario` whose endpoints carry the fitted
parameters, and a fit report.

The model is FleetSim's own (:mod:`balanceiq.sim.fleet`), parameter by parameter
===============================================================================

For an endpoint with capacity ``mu`` (rps) and base latency ``b`` (ms) under load
``lam`` (rps), ``rho = lam / mu``, the simulator observes

* saturation ``= rho`` (clipped at 10), in-flight ``= min(lam, mu) x mean latency``;
* latency quantile ``q`` ``= b + 1000 (-ln(1-q)) / (mu - lam)`` (M/M/1 sojourn), frozen at
  ``RHO_SAT`` and then rising to the 2 s timeout by ``RHO_FULL``;
* error rate ``= 1 - (1 - BASE_ERROR) min(1, 1/rho)``: load above ``mu`` is shed.

Each parameter is fitted from the signal that defines it there, with the formulas above
(:func:`model_quantile_ms` and friends reproduce ``FleetSim.step`` exactly; a unit test
holds them to it):

``capacity_rps`` (mu)
    **Saturation** when the fleet exports it (the testbed's backends do: slots busy over
    slots): robust nonlinear least squares (scipy ``least_squares``, soft-L1 loss) of
    ``saturation = min(lam / mu, 1)`` over the records; the ``min`` keeps overloaded
    records (a live server's busy fraction stops at 1) as the constraint ``mu < lam``
    instead of a bias. Saturation is proportional to load whatever the queueing
    discipline, so this recovers the true service rate even where the M/M/1 latency
    curve is the wrong shape. **Latency curve** otherwise: ``mu`` and ``b`` jointly by
    robust least squares of log p50 and log p95 against the simulator's quantiles.
``base_latency_ms`` (b)
    Given ``mu``: the median of ``p50 - 1000 ln2 / (mu - lam)`` over records at
    utilisation <= 0.5 (the lowest-load third when there are too few). Queueing is a
    small correction there, so the base is pinned by where the endpoint is nearly idle;
    how latency then grows with load is the model's (fixed by ``mu``), and where the
    live fleet grows differently that shows in the residuals instead of biasing ``b``.
``error behaviour``
    Baseline: traffic-weighted error rate of records below 90% utilisation. Overload:
    the slope of excess errors against the simulator's shed fraction ``1 - 1/rho`` over
    records above capacity (1 where the fleet sheds like the simulator, 0 where it
    queues instead). The scenario format has no per-endpoint error fields (FleetSim uses
    ``BASE_ERROR`` and sheds everything above ``mu``), so these are reported, not
    written into the scenario.

Which records are used
----------------------
Latency and rates are window aggregates (``observation.window_s``). A record is
*settled* when its whole window, plus ``settle_margin_s`` for scrape and rule-evaluation
lag, lies after the last weight change that moved >= 2% of traffic: it measured one
split. The margin defaults to a quarter window, which covers one scrape plus one rule
evaluation both for the production 10 s window (1-2 s scrapes) and for exploration's
2 s window (0.25 s scrapes). Latency, errors and the held-out scores use settled
records; the saturation fit of capacity uses every record, since saturation and rps
average over the same window and a window spanning a change still obeys
``sat = rps / capacity`` -- except records right after the endpoint's share was cut
while it was saturated, when a live queue is still draining (see
:func:`endpoint_samples`). An endpoint with fewer than ``min_samples`` settled records is
fitted on all of its records, with a warning. An endpoint counts in a record when it
carried traffic, was not unhealthy, and none of ``no_traffic/stale/missing/invalid/
warming`` is set.

What the fitted scenario cannot reproduce (and the report shows)
----------------------------------------------------------------
* The shape of queueing. M/M/1 puts the whole service time in an exponential sojourn;
  a backend with several slots and steady service times (the testbed's) stays flat far
  longer and then turns sharply. With capacity pinned by saturation, the simulator's
  p95 then overstates the live one below saturation (the report's p95 bias, and a
  warning when the M/M/1 capacity that would fit the latency curve differs by > 1.5x).
* Per-endpoint error rates and queueing instead of shedding (see above).
* Memory: a live queue built during overload drains afterwards; each simulator step is
  stationary. Robust losses and medians keep such records from steering the fit.

Fit error
---------
* **Held out**: records are cut into ``folds`` contiguous blocks in time; each block is
  predicted by a fit on the others (blocked cross-validation: neighbouring records are
  correlated, so interleaved hold-outs would flatter the fit). Per signal: median
  absolute relative error for p50, p95 and in-flight, mean absolute error for saturation
  and error rate (fractions already).
* **Per parameter**: the delete-a-block jackknife standard error of capacity and base
  latency over those folds, absolute and relative.
* **In sample**: residuals of the full fit (RMS and median relative error per signal).
* **Overall**: the same, pooled over endpoints.

Against a known truth (the testbed, or a simulator), :func:`calibration_error`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.optimize import least_squares

from balanceiq.exceptions import BalanceIQError
from balanceiq.sim.fleet import BASE_ERROR, RHO_FULL, RHO_SAT, SATURATION_MAX, TIMEOUT_MS
from balanceiq.sim.scenario import Scenario, scenario_from_dict

__all__ = [
    "Calibration",
    "CalibrationError",
    "EndpointFit",
    "Recording",
    "backend_truth",
    "calibrate",
    "calibration_error",
    "fit_endpoint",
    "fit_summary",
    "model_error_rate",
    "model_inflight",
    "model_quantile_ms",
    "model_saturation",
    "read_recording",
    "scenario_yaml",
    "write_calibration",
]

LN2 = math.log(2.0)

UNUSABLE_FLAGS = frozenset({"no_traffic", "stale", "missing", "invalid", "warming"})
"""Observation flags that make an endpoint's row of a record unusable for fitting."""

MIN_MOVED = 0.02
"""A weight change moving less traffic than this does not unsettle the records after it."""

LOW_LOAD_RHO = 0.5
"""Records at or below this utilisation pin the base latency."""

WELL_LOADED_RHO = 0.5
"""Below this peak utilisation in a recording, capacity (and the latency curve) are
extrapolated from light load: the report warns."""


class CalibrationError(BalanceIQError):
    """The recording cannot be read, or holds nothing a fit can use."""


# --------------------------------------------------------------------------- the model


def _rate_and_shift(mu: np.ndarray | float, lam: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    lam = np.asarray(lam, dtype=np.float64)
    rho = lam / mu
    r = mu * (1.0 - np.minimum(rho, RHO_SAT)) * 1e-3  # sojourn rate per ms
    shift = np.clip((rho - RHO_SAT) * (TIMEOUT_MS / (RHO_FULL - RHO_SAT)), 0.0, TIMEOUT_MS)
    return rho, r, shift


def model_quantile_ms(mu: np.ndarray | float, b: np.ndarray | float, lam: np.ndarray | float, q: float) -> np.ndarray:
    """FleetSim's latency quantile ``q`` (ms) of an endpoint (capacity ``mu``, base ``b``) at load ``lam``."""
    _, r, shift = _rate_and_shift(mu, lam)
    k = -math.log1p(-q)
    return np.asarray(b, dtype=np.float64) + np.minimum(k / r + shift, TIMEOUT_MS)


def model_inflight(mu: np.ndarray | float, b: np.ndarray | float, lam: np.ndarray | float) -> np.ndarray:
    """FleetSim's in-flight requests (Little's law on accepted load and mean latency)."""
    _, r, shift = _rate_and_shift(mu, lam)
    gap = np.maximum(TIMEOUT_MS - shift, 0.0)
    mean_wait = TIMEOUT_MS - gap - np.expm1(-r * gap) / r
    return np.minimum(lam, mu) * (np.asarray(b, dtype=np.float64) + mean_wait) * 1e-3


def model_saturation(mu: np.ndarray | float, lam: np.ndarray | float) -> np.ndarray:
    """FleetSim's observed saturation (utilisation, clipped like its observations)."""
    return np.minimum(np.asarray(lam, dtype=np.float64) / np.asarray(mu, dtype=np.float64), SATURATION_MAX)


def model_error_rate(mu: np.ndarray | float, lam: np.ndarray | float, base_error: float = BASE_ERROR) -> np.ndarray:
    """FleetSim's error rate: base errors plus everything above capacity shed."""
    lam = np.asarray(lam, dtype=np.float64)
    served = np.minimum(lam, mu)
    return 1.0 - (1.0 - base_error) * served / np.maximum(lam, 1e-300)


# --------------------------------------------------------------------------- reading


@dataclass
class Recording:
    """The usable records of a recording file, and what was skipped and why."""

    path: str
    records: list[dict[str, Any]]
    lines: int = 0
    bad_lines: int = 0
    bad_reasons: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    """Well-formed records with nothing to fit (no observation data)."""

    def summary(self) -> dict[str, Any]:
        return {
            "recording": self.path,
            "lines": self.lines,
            "records": len(self.records),
            "bad_lines": self.bad_lines,
            "bad_reasons": dict(self.bad_reasons),
            "skipped_records": dict(self.skipped),
        }


def _finite(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    x = float(x)
    return x if math.isfinite(x) else math.nan


def _check_record(data: Any) -> str | None:
    """Why a parsed line is not a record with an observation (None if it is one)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    obs = data.get("observation")
    if obs is None:
        return "no observation"
    if not isinstance(obs, dict):
        return "observation is not an object"
    eps = obs.get("endpoints")
    if not isinstance(eps, list) or not all(isinstance(e, dict) and isinstance(e.get("address"), str) for e in eps):
        return "observation.endpoints is not a list of endpoints with addresses"
    if _num_or_none(obs.get("timestamp")) is None and _num_or_none(data.get("timestamp")) is None:
        return "no numeric timestamp"
    return None


def _num_or_none(x: Any) -> float | None:
    v = _finite(x)
    return None if math.isnan(v) else v


def read_recording(path: Path | str, *, cluster: str | None = None) -> Recording:
    """Every line of ``path`` that is a record with an observation; bad lines are counted
    (by reason) and skipped. Raises :class:`CalibrationError` when the file cannot be read
    or none of it is usable. With several clusters in one file, ``cluster`` picks one
    (default: the one with the most records)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise CalibrationError(f"recording {p}: file not found") from None
    except OSError as exc:
        raise CalibrationError(f"recording {p}: cannot read: {exc.strerror or exc}") from exc
    rec = Recording(path=str(p), records=[])
    parsed: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        rec.lines += 1
        try:
            data = json.loads(line)
        except ValueError:
            rec.bad_lines += 1
            rec.bad_reasons["not JSON"] += 1
            continue
        why = _check_record(data)
        if why is not None:
            rec.bad_lines += 1
            rec.bad_reasons[why] += 1
            continue
        obs = data["observation"]
        if obs.get("source") == "none" or not any(_usable_row(e) for e in obs["endpoints"]):
            rec.skipped["no usable endpoint in the observation"] += 1
            continue
        parsed.append(data)
    clusters = Counter(str(d["observation"].get("cluster", "")) for d in parsed)
    if cluster is not None:
        chosen = cluster
        if cluster not in clusters and parsed:
            raise CalibrationError(
                f"recording {p}: no records of cluster {cluster!r}; found {', '.join(sorted(clusters))}"
            )
    else:
        chosen = clusters.most_common(1)[0][0] if clusters else ""
    for d in parsed:
        if str(d["observation"].get("cluster", "")) == chosen:
            rec.records.append(d)
        else:
            rec.skipped[f"other cluster ({d['observation'].get('cluster')})"] += 1
    if not rec.records:
        detail = f"{rec.lines} non-empty line(s), {rec.bad_lines} bad"
        if rec.bad_reasons:
            detail += " (" + ", ".join(f"{k}: {v}" for k, v in rec.bad_reasons.most_common()) + ")"
        if rec.skipped:
            detail += ", " + ", ".join(f"{v} skipped: {k}" for k, v in rec.skipped.items())
        raise CalibrationError(f"recording {p} has no usable records: {detail}")
    rec.records.sort(key=_obs_time)
    return rec


def _obs_time(record: Mapping[str, Any]) -> float:
    t = _finite(record["observation"].get("timestamp"))
    return t if not math.isnan(t) else _finite(record.get("timestamp"))


def _usable_row(e: Mapping[str, Any]) -> bool:
    flags = e.get("flags") or []
    if not isinstance(flags, list) or UNUSABLE_FLAGS & {str(f) for f in flags}:
        return False
    if e.get("healthy") is False:
        return False
    rps = _finite(e.get("rps"))
    return rps > 0 and not math.isnan(_finite(e.get("p50_ms")))


# --------------------------------------------------------------------------- samples


@dataclass
class Samples:
    """One endpoint's usable rows, as arrays in time order."""

    record: np.ndarray  # index of the record in the recording
    rps: np.ndarray
    p50: np.ndarray
    p95: np.ndarray
    err: np.ndarray
    sat: np.ndarray
    inflight: np.ndarray
    settled: np.ndarray  # bool
    cost: np.ndarray
    draining: np.ndarray  # bool: unsettled, and the last push cut this endpoint's share while it was saturated

    def take(self, mask: np.ndarray) -> Samples:
        return Samples(**{k: getattr(self, k)[mask] for k in self.__dataclass_fields__})

    def __len__(self) -> int:
        return int(self.rps.shape[0])


def _settled(records: Sequence[Mapping[str, Any]], settle_margin_s: float, default_window_s: float) -> np.ndarray:
    """True where a record's window (plus margin) started after the last real weight change.

    Changes are the recorded pushes (at ``timestamp + step_ms``) that moved at least
    :data:`MIN_MOVED` of traffic, and any change of the weights an observation reports
    that no recorded push explains (another writer, a restart), dated conservatively at
    that observation.
    """
    out = np.zeros(len(records), dtype=bool)
    last_change = -math.inf
    expected: dict[str, float] | None = None  # shares in force according to what we saw
    for i, r in enumerate(records):
        obs = r["observation"]
        t = _obs_time(r)
        w = _finite(obs.get("window_s"))
        window = w if w > 0 else default_window_s
        seen = _shares({e["address"]: _finite(e.get("weight")) for e in obs["endpoints"]})
        if seen is not None:
            if expected is not None and _moved(expected, seen) >= MIN_MOVED:
                last_change = max(last_change, t)
            expected = seen
        out[i] = t - last_change >= window + settle_margin_s
        if r.get("pushed") and isinstance(r.get("weights"), dict):
            after = _shares({k: _finite(v) for k, v in r["weights"].items()})
            before = expected
            if before is None and isinstance(r.get("previous"), dict):
                before = _shares({k: _finite(v) for k, v in r["previous"].items()})
            if after is not None:
                if before is None or _moved(before, after) >= MIN_MOVED:
                    step_ms = _finite(r.get("step_ms"))
                    start = _finite(r.get("timestamp"))
                    pushed_at = (start if not math.isnan(start) else t) + (step_ms / 1000 if step_ms > 0 else 0.0)
                    last_change = max(last_change, pushed_at)
                expected = after
    return out


def _shares(weights: Mapping[str, float]) -> dict[str, float] | None:
    vals = {k: v for k, v in weights.items() if not math.isnan(v) and v >= 0}
    total = sum(vals.values())
    if not vals or total <= 0:
        return None
    return {k: v / total for k, v in vals.items()}


def _moved(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys)


def endpoint_samples(
    recording: Recording, *, settle_margin_s: float = 1.0, default_window_s: float = 10.0
) -> tuple[list[str], dict[str, Samples], np.ndarray]:
    """``(addresses in first-seen order, samples per address, settled per record)``.

    A sample is *draining* when its record is not settled and the last push cut the
    endpoint's share (by more than 10%) while it was saturated (>= 0.95 at the record
    before the push): a live queue built up in overload is still being worked off, so
    the endpoint reads busy under a load it could carry (the simulator has no such
    memory). The capacity fit leaves these out.
    """
    records = recording.records
    settled = _settled(records, settle_margin_s, default_window_s)
    rows: dict[str, list[tuple[float, ...]]] = {}
    order: list[str] = []
    last_sat: dict[str, float] = {}
    cut: set[str] = set()
    for i, r in enumerate(records):
        for e in r["observation"]["endpoints"]:
            a = e["address"]
            if a not in rows:
                rows[a] = []
                order.append(a)
            sat = _finite(e.get("saturation"))
            if not math.isnan(sat):
                last_sat[a] = sat
            if not _usable_row(e):
                continue
            rows[a].append(
                (
                    i,
                    _finite(e.get("rps")),
                    _finite(e.get("p50_ms")),
                    _finite(e.get("p95_ms")),
                    _finite(e.get("error_rate")),
                    sat,
                    _finite(e.get("inflight")),
                    float(settled[i]),
                    _finite(e.get("cost_per_million")),
                    float(a in cut and not settled[i]),
                )
            )
        if settled[i]:
            cut.clear()
        if r.get("pushed") and isinstance(r.get("weights"), dict) and isinstance(r.get("previous"), dict):
            before = _shares({k: _finite(v) for k, v in r["previous"].items()}) or {}
            after = _shares({k: _finite(v) for k, v in r["weights"].items()}) or {}
            cut = {a for a, share in before.items() if after.get(a, 0.0) < 0.9 * share and last_sat.get(a, 0.0) >= 0.95}
    out = {}
    for a in order:
        arr = np.array(rows[a], dtype=np.float64).reshape(-1, 10)
        out[a] = Samples(
            record=arr[:, 0].astype(np.int64),
            rps=arr[:, 1],
            p50=arr[:, 2],
            p95=arr[:, 3],
            err=arr[:, 4],
            sat=arr[:, 5],
            inflight=arr[:, 6],
            settled=arr[:, 7] > 0.5,
            cost=arr[:, 8],
            draining=arr[:, 9] > 0.5,
        )
    return order, out, settled


# --------------------------------------------------------------------------- fitting


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
        """The simulator's median latency of this endpoint with no load: base plus the
        median M/M/1 sojourn at ``lam = 0`` (comparable with a live unloaded median)."""
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
    inv0 = max(inv0, 1e-9)
    # Work in k = 1/mu (rps^-1), scaled so the parameter is of order one.
    scale = inv0

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
    if low.sum() < 3:
        # Too few nearly-idle records: the lowest-load third (at least three) instead.
        n = max(3, math.ceil(lam.size / 3))
        low = np.zeros(lam.size, dtype=bool)
        low[np.argsort(rho)[:n]] = True
    wait = model_quantile_ms(mu, 0.0, lam[low], 0.5)
    return max(0.0, float(np.median(p50[low] - wait)))


def _fit_latency_curve(s: Samples) -> tuple[float, float] | None:
    """(mu, b) by robust least squares of log p50 and log p95 against the model."""
    ok = np.isfinite(s.p50) & (s.p50 > 0) & (s.rps > 0)
    lam = s.rps[ok]
    if lam.size < 4:
        return None
    p50 = s.p50[ok]
    p95 = np.where(np.isfinite(s.p95[ok]) & (s.p95[ok] > 0), s.p95[ok], np.nan)
    has95 = np.isfinite(p95)
    b0 = float(max(0.0, np.percentile(p50, 10) * 0.8))
    # The queueing part at the lightest load bounds mu from below: wait50 = 693 / (mu - lam).
    lam_max = float(lam.max())
    mu0 = lam_max * 1.5

    def resid(x: np.ndarray) -> np.ndarray:
        mu, b = x[0] * lam_max, x[1]
        r50 = np.log(model_quantile_ms(mu, b, lam, 0.5)) - np.log(p50)
        r95 = np.log(model_quantile_ms(mu, b, lam[has95], 0.95)) - np.log(p95[has95])
        return np.concatenate([r50, r95])

    best = None
    for start in (mu0, lam_max * 1.05, lam_max * 4.0):
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
    ok = np.isfinite(s.err) & (s.rps > 0)
    lam, err = s.rps[ok], np.clip(s.err[ok], 0.0, 1.0)
    if lam.size == 0:
        return math.nan, None, 0
    rho = lam / mu
    under = rho < 0.9
    base = float((err[under] * lam[under]).sum() / lam[under].sum()) if under.any() else float(np.median(err))
    over = rho > 1.0
    n_over = int(over.sum())
    if n_over == 0:
        return base, None, 0
    shed = 1.0 - 1.0 / rho[over]
    excess = err[over] - base
    slope = float(np.clip((shed * excess).sum() / max((shed * shed).sum(), 1e-12), 0.0, 1.0))
    return base, slope, n_over


def fit_endpoint(s: Samples, *, method: str = "auto") -> EndpointFit | None:
    """Capacity, base latency and error behaviour of one endpoint (None: not enough data).

    Capacity from saturation uses every sample but the draining ones: saturation and
    rps describe the same window (a window spanning a weight change still has
    ``sat = rps / capacity``; with instantaneous gauges the mismatch averages out over
    moves up and down). Everything nonlinear in load (latency quantiles, errors) uses
    the settled samples only.
    """
    settled = s.take(s.settled)
    mu = None
    used = method
    if method in ("auto", "saturation"):
        mu = _fit_capacity_saturation(s.take(~s.draining))
        used = "saturation"
    if mu is None and method in ("auto", "latency"):
        fit = _fit_latency_curve(settled)
        if fit is None:
            return None
        mu, _ = fit
        used = "latency"
    if mu is None or not math.isfinite(mu) or mu <= 0:
        return None
    b = _base_given_capacity(settled, mu)
    if not math.isfinite(b):
        return None
    e0, slope, n_over = _fit_errors(settled, mu)
    return EndpointFit(
        capacity_rps=mu,
        base_latency_ms=b,
        method=used,
        error_baseline=e0,
        overload_shed_slope=slope,
        overloaded_samples=n_over,
    )


# --------------------------------------------------------------------------- errors


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


_RELATIVE = ("p50", "p95", "inflight")
_ABSOLUTE = ("saturation", "error_rate")
_OBSERVED = {"p50": "p50", "p95": "p95", "inflight": "inflight", "saturation": "sat", "error_rate": "err"}


def _errors(pred: Mapping[str, np.ndarray], s: Samples) -> dict[str, np.ndarray]:
    """Per signal, the per-sample error: relative for latency and in-flight, absolute for fractions."""
    out = {}
    for name in _RELATIVE + _ABSOLUTE:
        obs = getattr(s, _OBSERVED[name])
        if name == "saturation":
            obs = np.minimum(obs, 1.0)
        p = pred[name]
        if name in _RELATIVE:
            ok = np.isfinite(obs) & np.isfinite(p) & (obs > (0.05 if name == "inflight" else 0.0))
            out[name] = (p[ok] - obs[ok]) / obs[ok]
        else:
            ok = np.isfinite(obs) & np.isfinite(p)
            out[name] = p[ok] - obs[ok]
    return out


def _summarise(errs: Mapping[str, np.ndarray], *, held_out: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, e in errs.items():
        if e.size == 0:
            out[name] = None
            continue
        a = np.abs(e)
        if held_out:
            out[name] = {"median_abs": _r(np.median(a)), "p90_abs": _r(np.percentile(a, 90)), "n": int(e.size)}
        else:
            out[name] = {
                "rms": _r(np.sqrt(np.mean(e * e))),
                "median_abs": _r(np.median(a)),
                "bias": _r(np.median(e)),
                "n": int(e.size),
            }
        out[name]["kind"] = "relative" if name in _RELATIVE else "absolute"
    return out


def _r(x: float, nd: int = 4) -> float | None:
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


# --------------------------------------------------------------------------- the whole fit


@dataclass
class Calibration:
    """A fitted scenario and the report of how well it fits."""

    scenario: Scenario
    report: dict[str, Any]
    fits: dict[str, EndpointFit]


def calibrate(
    recording: Path | str | Recording,
    *,
    name: str = "calibrated",
    folds: int = 5,
    settle_margin_s: float | None = None,
    min_samples: int = 6,
    method: str = "auto",
    endpoints: Mapping[str, tuple[str, str]] | None = None,
    cluster: str | None = None,
    duration_s: float = 600.0,
    seed: int = 0,
) -> Calibration:
    """Fit a simulator scenario to a recording; see the module docstring.

    ``endpoints`` maps address -> ``(cloud, region)`` (e.g. from the config); unknown
    endpoints get cloud ``live`` and region ``recorded``. ``method`` forces the capacity
    estimator (``saturation`` / ``latency``; ``auto``: saturation when recorded).
    """
    if method not in ("auto", "saturation", "latency"):
        raise CalibrationError(f"unknown capacity method {method!r}; use auto, saturation or latency")
    rec = recording if isinstance(recording, Recording) else read_recording(recording, cluster=cluster)
    windows = [_finite(r["observation"].get("window_s")) for r in rec.records]
    window_s = float(np.nanmedian(windows)) if any(math.isfinite(w) for w in windows) else 10.0
    if settle_margin_s is None:
        settle_margin_s = window_s / 4.0
    addresses, samples, settled = endpoint_samples(rec, settle_margin_s=settle_margin_s, default_window_s=window_s)
    n_records = len(rec.records)
    folds = max(2, min(int(folds), n_records))
    block = np.minimum((np.arange(n_records) * folds) // n_records, folds - 1)

    warnings: list[str] = []
    fits: dict[str, EndpointFit] = {}
    per_ep: dict[str, dict[str, Any]] = {}
    pooled_out: dict[str, list[np.ndarray]] = {k: [] for k in _RELATIVE + _ABSOLUTE}
    pooled_in: dict[str, list[np.ndarray]] = {k: [] for k in _RELATIVE + _ABSOLUTE}
    for a in addresses:
        s = samples[a]
        used = "settled"
        n_settled = int(s.settled.sum())
        if n_settled < min_samples:
            if len(s) >= min_samples:
                warnings.append(
                    f"{a}: only {n_settled} settled record(s); fitted on all {len(s)}, including records whose window spans a weight change"
                )
                s = s.take(np.ones(len(s), dtype=bool))
                s.settled = np.ones(len(s), dtype=bool)
                used = "all"
            else:
                warnings.append(f"{a}: {len(s)} usable record(s), fewer than {min_samples}: not fitted")
                per_ep[a] = {"fitted": False, "samples": len(s)}
                continue
        fit = fit_endpoint(s, method=method)
        if fit is None:
            warnings.append(f"{a}: no fit (no saturation and no latency curve it could fit)")
            per_ep[a] = {"fitted": False, "samples": len(s)}
            continue
        fits[a] = fit
        # Blocked cross-validation: each time block predicted by a fit on the others.
        fold_caps, fold_bases = [], []
        held: dict[str, list[np.ndarray]] = {k: [] for k in _RELATIVE + _ABSOLUTE}
        blocks = block[s.record]
        for k in range(folds):
            test = blocks == k
            train = ~test
            if not (test & s.settled).any() or (train & s.settled).sum() < max(3, min_samples // 2):
                continue
            f_k = fit_endpoint(s.take(train), method=fit.method)
            if f_k is None:
                continue
            fold_caps.append(f_k.capacity_rps)
            fold_bases.append(f_k.base_latency_ms)
            s_test = s.take(test & s.settled)
            for signal, e in _errors(_predict(f_k, s_test), s_test).items():
                held[signal].append(e)
        held_cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in held.items()}
        s_settled = s.take(s.settled)
        in_errs = _errors(_predict(fit, s_settled), s_settled)
        for sig in pooled_out:
            pooled_out[sig].append(held_cat[sig])
            pooled_in[sig].append(in_errs[sig])
        rho = s.rps / fit.capacity_rps
        per_ep[a] = {
            "fitted": True,
            "samples": len(s),
            "settled_samples": int(s.settled.sum()),
            "records_used": used,
            "load_rps": [_r(s.rps.min(), 2), _r(s.rps.max(), 2)],
            "utilization": [_r(rho.min(), 3), _r(rho.max(), 3)],
            "capacity_rps": {
                "value": _r(fit.capacity_rps, 3),
                "method": fit.method,
                **_jackknife(fold_caps, fit.capacity_rps),
            },
            "base_latency_ms": {"value": _r(fit.base_latency_ms, 3), **_jackknife(fold_bases, fit.base_latency_ms)},
            "unloaded_p50_ms": _r(fit.unloaded_p50_ms, 3),
            "errors": {
                "baseline": _r(fit.error_baseline, 5),
                "overload_shed_slope": None if fit.overload_shed_slope is None else _r(fit.overload_shed_slope, 3),
                "overloaded_samples": fit.overloaded_samples,
            },
            "held_out": _summarise(held_cat, held_out=True),
            "in_sample": _summarise(in_errs, held_out=False),
        }
        top = float(rho.max())
        if top < WELL_LOADED_RHO:
            warnings.append(
                f"{a}: the recording loads it to only {top:.0%} of the fitted capacity, which is poorly "
                f"identified (+-{_pct(per_ep[a]['capacity_rps']['rel_stderr'])}): record with more load on it "
                "(balanceiq record --rate, or fewer endpoints)"
            )
        if fit.method == "saturation":
            cross = _fit_latency_curve(s_settled)
            if cross is not None:
                per_ep[a]["capacity_rps"]["latency_curve_estimate"] = _r(cross[0], 3)
                ratio = cross[0] / fit.capacity_rps
                if top >= WELL_LOADED_RHO and not 2 / 3 <= ratio <= 1.5:
                    bias = per_ep[a]["in_sample"].get("p95") or {}
                    warnings.append(
                        f"{a}: latency follows an M/M/1 curve of capacity {cross[0]:.0f} rps, not the "
                        f"{fit.capacity_rps:.0f} rps saturation shows: the live queueing is "
                        + ("flatter (several servers, steady service times)" if ratio > 1 else "steeper")
                        + f" than the simulator's; its p95 is off by {_pct(bias.get('bias'))} (median) in sample"
                    )
    if not fits:
        raise CalibrationError(
            f"recording {rec.path}: no endpoint could be fitted ({len(rec.records)} usable record(s)); "
            + "; ".join(warnings)
        )
    # Endpoints without a fit still belong in the fleet: typical values, flagged.
    typical_cap = float(np.median([f.capacity_rps for f in fits.values()]))
    typical_base = float(np.median([f.base_latency_ms for f in fits.values()]))
    specs = []
    first_weights = _first_weights(rec.records, addresses)
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
    demand, demand_info = _demand(rec.records)
    scenario = scenario_from_dict(
        {
            "name": name,
            "description": (
                f"Calibrated from {Path(rec.path).name}: {len(rec.records)} records, {len(fits)}/{len(addresses)} "
                f"endpoints fitted (FleetSim M/M/1; capacity from {', '.join(sorted({f.method for f in fits.values()}))})."
            ),
            "step_s": 1.0,
            "duration_s": float(duration_s),
            "seed": int(seed),
            "demand": demand,
            "endpoints": specs,
            "events": [],
        },
        source=f"calibration of {rec.path}",
    )
    overall = _overall(pooled_out, pooled_in, per_ep)
    report = {
        **rec.summary(),
        "cluster": rec.records[0]["observation"].get("cluster"),
        "settled_records": int(settled.sum()),
        "window_s": _r(window_s, 3),
        "settle_margin_s": settle_margin_s,
        "folds": folds,
        "model": {
            "simulator": "FleetSim M/M/1 (balanceiq.sim.fleet)",
            "capacity": "saturation = min(rps / capacity, 1), robust least squares"
            if all(f.method == "saturation" for f in fits.values())
            else "saturation where recorded, else the M/M/1 latency curve (robust least squares of log p50, log p95)",
            "base_latency": f"median of p50 - M/M/1 median wait over records at utilisation <= {LOW_LOAD_RHO}",
            "simulator_error_model": {"base_error": BASE_ERROR, "overload_shed_slope": 1.0},
        },
        "endpoints": per_ep,
        "overall": overall,
        "demand": demand_info,
        "warnings": warnings,
        "created": time.time(),
    }
    return Calibration(scenario=scenario, report=report, fits=fits)


def _jackknife(values: Sequence[float], full: float) -> dict[str, Any]:
    """Delete-a-block jackknife standard error over the fold fits."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return {"stderr": None, "rel_stderr": None, "folds": int(v.size)}
    k = v.size
    se = math.sqrt((k - 1) / k * float(((v - v.mean()) ** 2).sum()))
    return {"stderr": _r(se, 4), "rel_stderr": _r(se / abs(full), 4) if full else None, "folds": int(k)}


def _overall(
    out: Mapping[str, list[np.ndarray]], inn: Mapping[str, list[np.ndarray]], per_ep: Mapping[str, Any]
) -> dict[str, Any]:
    held = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    ins = {k: np.concatenate(v) if v else np.zeros(0) for k, v in inn.items()}
    lat = np.abs(np.concatenate([held["p50"], held["p95"]]))
    lat_in = np.concatenate([ins["p50"], ins["p95"]])
    caps = [
        e["capacity_rps"]["rel_stderr"]
        for e in per_ep.values()
        if e.get("fitted") and e["capacity_rps"]["rel_stderr"] is not None
    ]
    bases = [
        e["base_latency_ms"]["rel_stderr"]
        for e in per_ep.values()
        if e.get("fitted") and e["base_latency_ms"]["rel_stderr"] is not None
    ]
    return {
        "held_out_latency_rel_err": _r(np.median(lat)) if lat.size else None,
        "held_out": _summarise(held, held_out=True),
        "in_sample_latency_rel_rms": _r(np.sqrt(np.mean(lat_in * lat_in))) if lat_in.size else None,
        "in_sample": _summarise(ins, held_out=False),
        "capacity_rel_stderr_max": _r(max(caps)) if caps else None,
        "base_latency_rel_stderr_max": _r(max(bases)) if bases else None,
    }


def _first_weights(records: Sequence[Mapping[str, Any]], addresses: Sequence[str]) -> dict[str, int]:
    """Static weights for the scenario: those in force at the first record, reduced."""
    for r in records:
        w = {e["address"]: _finite(e.get("weight")) for e in r["observation"]["endpoints"]}
        if all(math.isfinite(w.get(a, math.nan)) and w[a] >= 1 for a in addresses):
            ints = [max(1, round(w[a])) for a in addresses]
            g = math.gcd(*ints)
            return {a: i // g for a, i in zip(addresses, ints)}
    return dict.fromkeys(addresses, 1)


def _demand(records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    totals = []
    for r in records:
        rps = [_finite(e.get("rps")) for e in r["observation"]["endpoints"]]
        t = sum(x for x in rps if math.isfinite(x) and x > 0)
        if t > 0:
            totals.append(t)
    tot = np.asarray(totals)
    base = float(np.median(tot))
    noise = float(np.std(np.log(tot))) if tot.size > 1 else 0.0
    noise = round(min(max(noise, 0.0), 1.0), 4)
    spec = {"base_rps": round(base, 2), "diurnal_amplitude": 0.0, "noise": noise}
    info = {
        **spec,
        "min_rps": _r(tot.min(), 2),
        "max_rps": _r(tot.max(), 2),
        "note": "total rps of the recording; no daily cycle is fitted (add one by editing demand)",
    }
    return spec, info


# --------------------------------------------------------------------------- output


def scenario_yaml(cal: Calibration) -> str:
    """The scenario as YAML (loadable by :func:`~balanceiq.sim.scenario.load_scenario`),
    with a header comment summarising the fit."""
    data = cal.scenario.model_dump(mode="json")
    ov = cal.report["overall"]
    head = [
        f"# {cal.scenario.name}: written by balanceiq calibrate from {cal.report['recording']}",
        f"# {cal.report['records']} records ({cal.report['bad_lines']} bad lines skipped), "
        f"{cal.report['settled_records']} settled; held-out median latency error "
        f"{_pct(ov['held_out_latency_rel_err'])}.",
        "# Per endpoint: capacity_rps is the M/M/1 service rate, base_latency_ms its fixed part;",
        "# errors (not in the scenario format) are in the fit report:",
    ]
    for a, e in cal.report["endpoints"].items():
        if not e.get("fitted"):
            head.append(f"#   {a}: NOT FITTED ({e.get('samples', 0)} records): typical values used")
            continue
        cap, base = e["capacity_rps"], e["base_latency_ms"]
        head.append(
            f"#   {a}: capacity {cap['value']:.1f} rps (+-{_pct(cap['rel_stderr'])}, {cap['method']}), "
            f"base {base['value']:.1f} ms (+-{_pct(base['rel_stderr'])}), error baseline {e['errors']['baseline']}"
        )
    return "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=200)


def fit_summary(report: Mapping[str, Any]) -> str:
    """A few lines of fit error for a terminal: per endpoint and overall."""
    ov = report["overall"]
    held = ov.get("held_out") or {}

    def med(sig: str) -> str:
        v = held.get(sig)
        return "n/a" if not v else (_pct(v["median_abs"]) if v["kind"] == "relative" else f"{v['median_abs']:.3f}")

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
        cap, base = e["capacity_rps"], e["base_latency_ms"]
        lines.append(
            f"  {a}: capacity {cap['value']:.1f} rps +-{_pct(cap['rel_stderr'])} ({cap['method']}), "
            f"base latency {base['value']:.1f} ms +-{_pct(base['rel_stderr'])}, "
            f"unloaded p50 {e['unloaded_p50_ms']:.1f} ms, utilisation {e['utilization'][0]:.2f}-{e['utilization'][1]:.2f}"
        )
    for w in report.get("warnings", []):
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def write_calibration(cal: Calibration, scenario_path: Path | str, report_path: Path | str | None = None) -> None:
    """Write the scenario YAML (and the report JSON)."""
    sp = Path(scenario_path)
    sp.parent.mkdir(parents=True, exist_ok=True)
    sp.write_text(scenario_yaml(cal), encoding="utf-8")
    if report_path is not None:
        rp = Path(report_path)
        rp.parent.mkdir(parents=True, exist_ok=True)
        rp.write_text(json.dumps(cal.report, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------- truth


def backend_truth(backend: Mapping[str, Any]) -> dict[str, float]:
    """Capacity and unloaded latency of a testbed backend from its configured settings.

    A sample backend (``balanceiq/testbed/backend.py``) takes one of ``concurrency``
    slots, holds it for ``base_latency_ms + extra_latency_ms + U(0, jitter_ms)`` (plus
    ``tail_ms`` with probability ``tail_prob``), then answers; requests that find every
    slot busy wait in a FIFO queue, which does not hold a slot. Errors are decided
    inside the slot and still sleep. So the most it can answer per second, its
    **capacity**, is ``concurrency / E[slot hold]`` with
    ``E[slot hold] = (base + extra + jitter/2 + tail_prob * tail_ms) / 1000`` s; its
    busy fraction (the testbed's saturation) is ``load / capacity`` below that. Unlike
    the simulator it never sheds: above capacity the queue (and latency) grows until
    Envoy's or the client's timeout. ``concurrency / base`` alone overstates capacity by
    ``jitter / (2 base)`` (2.5% at 20 ms with the default 1 ms jitter).

    Its **unloaded median latency** is ``base + extra + jitter/2`` (plus ``tail_ms`` when
    ``tail_prob > 0.5``).
    """
    base = float(backend["base_latency_ms"])
    extra = float(backend.get("extra_latency_ms", 0.0) or 0.0)
    jitter = float(backend.get("jitter_ms", 1.0) if backend.get("jitter_ms") is not None else 1.0)
    tail_p = float(backend.get("tail_prob", 0.0) or 0.0)
    tail = float(backend.get("tail_ms", 0.0) or 0.0)
    conc = float(backend["concurrency"])
    hold_ms = base + extra + jitter / 2.0 + tail_p * tail
    return {
        "capacity_rps": conc / (hold_ms / 1000.0) if hold_ms > 0 else math.inf,
        "unloaded_p50_ms": base + extra + jitter / 2.0 + (tail if tail_p > 0.5 else 0.0),
        "base_latency_ms": base,
    }


def calibration_error(
    fitted: Calibration | Scenario | Mapping[str, Mapping[str, float]],
    truth: Scenario | Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Relative error of fitted capacity and latency against a known truth, per endpoint
    and worst / mean over endpoints.

    ``fitted``: a :class:`Calibration`, a :class:`Scenario`, or ``{address: {capacity_rps,
    base_latency_ms}}``. ``truth``: the :class:`Scenario` a simulator ran, or per address
    either a testbed backend's settings (``base_latency_ms``, ``concurrency``, optional
    ``jitter_ms``/``extra_latency_ms``/``tail_*``, e.g. ``testbed.backend_specs(settings)``
    keyed by name, or ``record_exploration(...)["truth"]``; converted by
    :func:`backend_truth`) or simulator parameters (``capacity_rps``, ``base_latency_ms``).

    What is compared:

    * ``capacity``: fitted ``capacity_rps`` vs the true capacity (for the testbed
      ``concurrency / E[slot hold]``, see :func:`backend_truth`);
    * ``latency``: the scenario's unloaded median latency (``base + 1000 ln2 /
      capacity``: the simulator puts service time in its exponential sojourn) vs the
      true unloaded median (testbed: ``base + extra + jitter/2``; simulator truth: its own
      ``base + 1000 ln2 / capacity``);
    * ``base_latency``: the raw ``base_latency_ms`` parameter against the truth's, for
      reference only with a testbed truth (the two mean different things there: a
      testbed backend's base latency is its whole service time).

    Relative error is ``(fitted - truth) / truth``; endpoints missing on either side are
    listed under ``missing``.
    """
    if isinstance(fitted, Calibration):
        fit_params = {
            e.name: {"capacity_rps": e.capacity_rps, "base_latency_ms": e.base_latency_ms}
            for e in fitted.scenario.endpoints
        }
    elif isinstance(fitted, Scenario):
        fit_params = {
            e.name: {"capacity_rps": e.capacity_rps, "base_latency_ms": e.base_latency_ms} for e in fitted.endpoints
        }
    else:
        fit_params = {
            a: {"capacity_rps": float(v["capacity_rps"]), "base_latency_ms": float(v["base_latency_ms"])}
            for a, v in fitted.items()
        }
    if isinstance(truth, Scenario):
        truth = {
            e.name: {"capacity_rps": e.capacity_rps, "base_latency_ms": e.base_latency_ms} for e in truth.endpoints
        }
    rows: dict[str, dict[str, Any]] = {}
    for a, t in truth.items():
        f = fit_params.get(a)
        if f is None:
            continue
        if "concurrency" in t:
            tt = backend_truth(t)
            kind = "testbed"
        else:
            cap_t = float(t["capacity_rps"])
            base_t = float(t["base_latency_ms"])
            tt = {"capacity_rps": cap_t, "base_latency_ms": base_t, "unloaded_p50_ms": base_t + 1000 * LN2 / cap_t}
            kind = "simulator"
        fit_unloaded = f["base_latency_ms"] + 1000 * LN2 / f["capacity_rps"]
        rows[a] = {
            "truth": kind,
            "capacity_rps": {
                "fitted": _r(f["capacity_rps"], 3),
                "truth": _r(tt["capacity_rps"], 3),
                "rel_error": _rel(f["capacity_rps"], tt["capacity_rps"]),
            },
            "latency_ms": {
                "fitted": _r(fit_unloaded, 3),
                "truth": _r(tt["unloaded_p50_ms"], 3),
                "rel_error": _rel(fit_unloaded, tt["unloaded_p50_ms"]),
            },
            "base_latency_ms": {
                "fitted": _r(f["base_latency_ms"], 3),
                "truth": _r(tt["base_latency_ms"], 3),
                "rel_error": _rel(f["base_latency_ms"], tt["base_latency_ms"]),
            },
        }

    def agg(key: str) -> dict[str, Any]:
        errs = [abs(r[key]["rel_error"]) for r in rows.values() if r[key]["rel_error"] is not None]
        return {"max_abs": _r(max(errs)) if errs else None, "mean_abs": _r(float(np.mean(errs))) if errs else None}

    return {
        "endpoints": rows,
        "capacity_rel_error": agg("capacity_rps"),
        "latency_rel_error": agg("latency_ms"),
        "base_latency_rel_error": agg("base_latency_ms"),
        "missing": sorted((set(truth) - set(fit_params)) | (set(fit_params) - set(truth))),
        "definitions": {
            "capacity": "max sustainable rps: testbed concurrency / mean slot hold (base+extra+jitter/2+tail_prob*tail) s",
            "latency": "unloaded median latency: simulator base + 1000 ln2 / capacity; testbed base + extra + jitter/2",
        },
    }


def _rel(fitted: float, truth: float) -> float | None:
    if not (math.isfinite(fitted) and math.isfinite(truth)) or truth == 0:
        return None
    return _r((fitted - truth) / truth)
