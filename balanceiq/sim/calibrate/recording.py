"""Recordings: one :class:`DecisionRecord` JSON line per control (or exploration) step, and reading them into
per-endpoint samples, with which records are *settled*: their whole window, plus a margin for scrape and rule-evaluation
lag, lies after the last weight change that moved >= 2% of traffic, so they measured one split."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from balanceiq.exceptions import BalanceIQError

UNUSABLE_FLAGS = frozenset({"no_traffic", "stale", "missing", "invalid", "warming"})
"""Observation flags that make an endpoint's row of a record unusable for fitting."""

MIN_MOVED = 0.02
"""A weight change moving less traffic than this does not unsettle the records after it."""


def rounded(x: float | None, nd: int = 4) -> float | None:
    """``x`` rounded for a report; None when missing or not finite (JSON has no nan)."""
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


@dataclass(frozen=True, kw_only=True)
class DecisionRecord:
    """One control interval: what was seen, what was decided, what Envoy did with it."""

    seq: int
    timestamp: float
    mode: str  # "policy" | "baseline" | "hold" (telemetry blind) | "standby" (no lease) | "explore"
    critical: tuple[str, ...] = ()
    weights: dict[str, int]
    previous: dict[str, int]
    reward: float | None = None  # realised reward of the interval that just ended
    moved: float = 0.0  # traffic_moved(previous, new)
    pushed: bool = False
    acked: bool | None = None  # None: not pushed, or no Envoy connected to ACK it
    push_ms: float | None = None
    ack_ms: float | None = None
    version: str | None = None
    notes: tuple[str, ...] = ()
    source: str = "none"
    error: str | None = None
    step_ms: float | None = None  # observe to push, the whole decision
    scores: dict[str, float] | None = None  # policy vs baseline proposal, negated LP objective
    shares: dict[str, float] | None = None  # the split decided (weights realise it in Envoy)
    shadow: bool = False  # decided in shadow mode: recorded, never pushed
    effect: dict[str, Any] | None = None  # estimated effect of the split decided vs the one in force
    score_ms: float | None = None  # the policy's scoring within step_ms (None: not asked)
    observation: dict[str, Any] | None = field(default=None, repr=False)

    def to_json(self, *, with_observation: bool = False) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies the observation only for it to be dropped.
        out = {f.name: getattr(self, f.name) for f in fields(self) if with_observation or f.name != "observation"}
        out["critical"], out["notes"] = list(self.critical), list(self.notes)
        out["weights"], out["previous"] = dict(self.weights), dict(self.previous)
        out["scores"] = {k: rounded(v, 6) for k, v in self.scores.items()} if self.scores else None
        out["shares"] = {k: round(float(v), 6) for k, v in self.shares.items()} if self.shares else None
        for key in ("reward", "push_ms", "ack_ms", "step_ms", "moved", "score_ms"):
            out[key] = rounded(out[key], 6)
        return out


class CalibrationError(BalanceIQError):
    """The recording cannot be read, or holds nothing a fit can use."""


@dataclass
class Recording:
    """The usable records of a recording file, and what was skipped and why."""

    path: str
    records: list[dict[str, Any]]
    lines: int = 0
    bad_reasons: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    """Well-formed records with nothing to fit (no observation data)."""


def finite(x: Any) -> float:
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
    if math.isnan(_obs_time(data)):
        return "no numeric timestamp"
    return None


def read_recording(path: Path | str) -> Recording:
    """The records of ``path`` with a usable observation, of its most recorded cluster; bad lines are counted (by
    reason) and skipped. Raises :class:`CalibrationError` when the file cannot be read or none of it is usable."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise CalibrationError(f"recording {p}: file not found") from None
    except OSError as exc:
        raise CalibrationError(f"recording {p}: cannot read: {exc.strerror or exc}") from exc
    rec = Recording(path=str(p), records=[])
    parsed = []
    for line in filter(str.strip, text.splitlines()):
        rec.lines += 1
        try:
            data = json.loads(line)
            why = _check_record(data)
        except ValueError:
            why = "not JSON"
        if why is not None:
            rec.bad_reasons[why] += 1
        elif data["observation"].get("source") == "none" or not any(map(_usable_row, data["observation"]["endpoints"])):
            rec.skipped["no usable endpoint in the observation"] += 1
        else:
            parsed.append(data)
    clusters = Counter(str(d["observation"].get("cluster", "")) for d in parsed)
    chosen = clusters.most_common(1)[0][0] if clusters else ""
    for d in parsed:
        if str(d["observation"].get("cluster", "")) == chosen:
            rec.records.append(d)
        else:
            rec.skipped[f"other cluster ({d['observation'].get('cluster')})"] += 1
    if not rec.records:
        detail = f"{rec.lines} non-empty line(s), {rec.bad_reasons.total()} bad"
        if rec.bad_reasons:
            detail += " (" + ", ".join(f"{k}: {v}" for k, v in rec.bad_reasons.most_common()) + ")"
        if rec.skipped:
            detail += ", " + ", ".join(f"{v} skipped: {k}" for k, v in rec.skipped.items())
        raise CalibrationError(f"recording {p} has no usable records: {detail}")
    rec.records.sort(key=_obs_time)
    return rec


def _obs_time(record: Mapping[str, Any]) -> float:
    t = finite(record["observation"].get("timestamp"))
    return t if not math.isnan(t) else finite(record.get("timestamp"))


def _usable_row(e: Mapping[str, Any]) -> bool:
    """The endpoint carried traffic, was not unhealthy and has none of the :data:`UNUSABLE_FLAGS`."""
    flags = e.get("flags") or []
    if not isinstance(flags, list) or UNUSABLE_FLAGS & {str(f) for f in flags} or e.get("healthy") is False:
        return False
    return finite(e.get("rps")) > 0 and not math.isnan(finite(e.get("p50_ms")))


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


def _shares(weights: Mapping[str, Any]) -> dict[str, float] | None:
    vals = {k: v for k, v in ((k, finite(v)) for k, v in weights.items()) if v >= 0}  # nan is not >= 0
    total = sum(vals.values())
    return {k: v / total for k, v in vals.items()} if total > 0 else None


def _moved(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def _settled(records: Sequence[Mapping[str, Any]], settle_margin_s: float, default_window_s: float) -> np.ndarray:
    """True where a record's window (plus margin) started after the last real weight change: a recorded push (at
    ``timestamp + step_ms``) moving at least :data:`MIN_MOVED` of traffic, or a change of the reported weights no push
    explains (another writer, a restart), dated at that observation."""
    out = np.zeros(len(records), dtype=bool)
    last_change = -math.inf
    expected: dict[str, float] | None = None  # shares in force according to what we saw
    for i, r in enumerate(records):
        obs = r["observation"]
        t = _obs_time(r)
        w = finite(obs.get("window_s"))
        seen = _shares({e["address"]: e.get("weight") for e in obs["endpoints"]})
        if seen is not None:
            if expected is not None and _moved(expected, seen) >= MIN_MOVED:
                last_change = max(last_change, t)
            expected = seen
        out[i] = t - last_change >= (w if w > 0 else default_window_s) + settle_margin_s
        after = _shares(r["weights"]) if r.get("pushed") and isinstance(r.get("weights"), dict) else None
        if after is not None:
            before = expected
            if before is None and isinstance(r.get("previous"), dict):
                before = _shares(r["previous"])
            if before is None or _moved(before, after) >= MIN_MOVED:
                step_ms = finite(r.get("step_ms"))
                start = finite(r.get("timestamp"))
                pushed_at = (start if not math.isnan(start) else t) + (step_ms / 1000 if step_ms > 0 else 0.0)
                last_change = max(last_change, pushed_at)
            expected = after
    return out


def endpoint_samples(
    recording: Recording, *, settle_margin_s: float = 1.0, default_window_s: float = 10.0
) -> tuple[list[str], dict[str, Samples], np.ndarray]:
    """``(addresses in first-seen order, samples per address, settled per record)``. A sample is *draining* when its
    record is not settled and the last push cut the endpoint's share by over 10% while it was saturated (>= 0.95): its
    live queue is still being worked off, so it reads busy under a load it could carry."""
    records = recording.records
    settled = _settled(records, settle_margin_s, default_window_s)
    rows: dict[str, list[tuple[Any, ...]]] = {}
    last_sat: dict[str, float] = {}
    cut: set[str] = set()
    for i, r in enumerate(records):
        for e in r["observation"]["endpoints"]:
            a = e["address"]
            rows.setdefault(a, [])
            sat = finite(e.get("saturation"))
            if not math.isnan(sat):
                last_sat[a] = sat
            if _usable_row(e):  # one row per sample, in the order of Samples' fields
                signals = [finite(e.get(k)) for k in ("rps", "p50_ms", "p95_ms", "error_rate")]
                tail = (settled[i], finite(e.get("cost_per_million")), a in cut and not settled[i])
                rows[a].append((i, *signals, sat, finite(e.get("inflight")), *tail))
        if settled[i]:
            cut.clear()
        if r.get("pushed") and isinstance(r.get("weights"), dict) and isinstance(r.get("previous"), dict):
            before = _shares(r["previous"]) or {}
            after = _shares(r["weights"]) or {}
            cut = {a for a, share in before.items() if after.get(a, 0.0) < 0.9 * share and last_sat.get(a, 0.0) >= 0.95}
    names = [f.name for f in fields(Samples)]
    out = {}
    for a, row in rows.items():
        c: dict[str, np.ndarray] = dict(zip(names, np.array(row, dtype=np.float64).reshape(-1, len(names)).T))
        c.update(record=c["record"].astype(np.int64), settled=c["settled"] > 0.5, draining=c["draining"] > 0.5)
        out[a] = Samples(**c)
    return list(rows), out, settled
