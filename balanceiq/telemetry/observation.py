"""The one `Observation` of a cluster's endpoints, from live telemetry or the simulator. Missing
data is never zero-filled: an unmeasured value is ``nan`` and the endpoint carries a flag saying why."""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import numpy as np

Source = Literal["prometheus", "envoy-admin", "simulator", "api", "none"]

# Why a field is not a measurement. An endpoint with any flag is not "healthy and idle".
NO_TRAFFIC = "no_traffic"  # no requests in the window: latency and error rate unknown
STALE = "stale"  # the newest sample is older than the staleness limit
MISSING = "missing"  # the source had no series for this endpoint
INVALID = "invalid"  # the source returned NaN/Inf/negative where that cannot be
WARMING = "warming"  # first scrape of a counter-based source: no rate yet
NO_LATENCY_SOURCE = "no_latency_source"  # nothing configured measures per-endpoint latency

# Feature order of Observation.to_array(); the policy's input layer depends on it.
_FEATURE_NAMES = "p50_ms p95_ms error_rate saturation inflight rps cost_per_million weight_share healthy"
FEATURES = tuple(_FEATURE_NAMES.split())

NAN = float("nan")


@dataclass(frozen=True, slots=True)
class EndpointObservation:
    """One endpoint over the observation window. ``nan`` means "not measured" (see flags)."""

    address: str
    p50_ms: float = NAN
    p95_ms: float = NAN
    error_rate: float = NAN  # fraction of requests answered 5xx or failed, 0..1
    saturation: float = NAN  # in-flight over concurrency limit (0..1+), when known
    inflight: float = NAN  # requests in flight at Envoy for this endpoint
    rps: float = NAN  # requests per second over the window
    cost_per_million: float = NAN  # $ per million requests (from config)
    weight: float = NAN  # Envoy load_balancing_weight in force
    healthy: bool | None = None  # Envoy's view (health checks, outlier detection); None: unknown
    age_s: float = NAN  # age of the newest sample behind this row
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def usable(self) -> bool:
        """True when latency and errors were measured on real, fresh traffic."""
        return not (self.flags & {NO_TRAFFIC, STALE, MISSING, INVALID, WARMING})


_FLOAT_FIELDS = tuple(f.name for f in fields(EndpointObservation) if f.type == "float")


@dataclass(frozen=True, slots=True)
class Observation:
    """Every endpoint of one cluster at one moment, and where the numbers came from."""

    cluster: str
    endpoints: tuple[EndpointObservation, ...]
    source: Source
    timestamp: float = field(default_factory=time.time)
    window_s: float = NAN
    errors: tuple[str, ...] = ()  # what went wrong on the way (e.g. "prometheus: timeout")

    @property
    def addresses(self) -> list[str]:
        return [e.address for e in self.endpoints]

    def by_address(self) -> dict[str, EndpointObservation]:
        return {e.address: e for e in self.endpoints}

    def to_array(self) -> tuple[np.ndarray, np.ndarray]:
        """``(features[N, F], valid[N, F])`` in :data:`FEATURES` order. Invalid entries are 0 in ``features``
        *and* False in ``valid``: the policy reads the mask, so a zero is never taken for a measurement."""
        total_weight = sum(e.weight for e in self.endpoints if math.isfinite(e.weight)) or NAN
        rows = [
            [
                *(getattr(e, f) for f in FEATURES[:7]),
                e.weight / total_weight,
                NAN if e.healthy is None else float(e.healthy),
            ]
            for e in self.endpoints
        ]
        arr = np.asarray(rows, dtype=np.float64).reshape(len(self.endpoints), len(FEATURES))
        valid = np.isfinite(arr)
        # Latency and error rate without fresh traffic behind them are not measurements.
        valid[:, :3] &= np.array([e.usable for e in self.endpoints], dtype=bool)[:, None]
        return np.where(valid, arr, 0.0), valid

    def to_json(self) -> dict[str, object]:
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "cluster": self.cluster,
            "source": self.source,
            "timestamp": self.timestamp,
            "window_s": num(self.window_s),
            "errors": list(self.errors),
            "endpoints": [
                # Field order kept from the dataclass; floats as numbers or null.
                {**asdict(e), **{f: num(getattr(e, f)) for f in _FLOAT_FIELDS}, "flags": sorted(e.flags)}
                for e in self.endpoints
            ],
        }


def as_float(x: object) -> float:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return NAN


def finite_or_nan(value: object) -> tuple[float, bool]:
    """``(value, ok)``: a float if ``value`` is a finite non-negative number, else (nan, False)."""
    x = as_float(value)
    return (x, True) if math.isfinite(x) and x >= 0 else (NAN, False)


def quantile_from_buckets(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """Prometheus' ``histogram_quantile`` on cumulative ``(le, count)`` pairs, with its rules
    (the first bucket starts at 0; the ``+Inf`` bucket gives the largest finite bound); ``nan`` if empty."""
    if not 0.0 <= q <= 1.0:
        return NAN
    pts = sorted((le, c) for le, c in buckets if not math.isnan(le) and math.isfinite(c) and c >= 0)
    if len(pts) < 2 or not math.isinf(pts[-1][0]):
        return NAN
    les = [le for le, _ in pts]
    # Counts must be cumulative; non-monotonic data (a reset mid-window) is clipped.
    cums = list(itertools.accumulate((c for _, c in pts), max))
    if cums[-1] <= 0:
        return NAN
    rank = q * cums[-1]
    i = bisect.bisect_left(cums, rank)  # the first bucket holding the rank-th observation
    if math.isinf(les[i]):
        return les[-2]
    prev_le, prev_c = (les[i - 1], cums[i - 1]) if i else (0.0, 0.0)
    if cums[i] == prev_c:
        return les[i]
    return prev_le + (les[i] - prev_le) * (rank - prev_c) / (cums[i] - prev_c)


def empty_observation(
    cluster: str, addresses: Sequence[str], costs: Mapping[str, float], source: Source, errors: Sequence[str]
) -> Observation:
    """Every endpoint flagged missing: what a caller gets when no source answered."""
    rows = (EndpointObservation(a, cost_per_million=costs.get(a, NAN), flags=frozenset({MISSING})) for a in addresses)
    return Observation(cluster, tuple(rows), source, errors=tuple(errors))
