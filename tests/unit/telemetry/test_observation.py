"""The Observation contract and the quantile helper shared by every source."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from balanceiq.telemetry.observation import (
    FEATURES,
    MISSING,
    NO_TRAFFIC,
    EndpointObservation,
    Observation,
    empty_observation,
    finite_or_nan,
    quantile_from_buckets,
)


def obs(*eps: EndpointObservation) -> Observation:
    return Observation(cluster="c", endpoints=eps, source="prometheus")


def test_array_masks_what_was_not_measured() -> None:
    good = EndpointObservation(
        "a:1",
        p50_ms=10,
        p95_ms=20,
        error_rate=0.1,
        saturation=0.5,
        inflight=2,
        rps=100,
        cost_per_million=0.4,
        weight=3,
        healthy=True,
    )
    idle = EndpointObservation(
        "b:1", p50_ms=float("nan"), rps=0.0, cost_per_million=0.2, weight=1, healthy=True, flags=frozenset({NO_TRAFFIC})
    )
    feats, valid = obs(good, idle).to_array()
    assert feats.shape == valid.shape == (2, len(FEATURES))
    assert valid[0].all()
    assert feats[0, FEATURES.index("weight_share")] == 0.75
    # Idle: latency and error rate are not measurements, and are never zeros posing as ones.
    for name in ("p50_ms", "p95_ms", "error_rate"):
        assert not valid[1, FEATURES.index(name)]
    assert valid[1, FEATURES.index("rps")] and feats[1, FEATURES.index("rps")] == 0.0
    assert np.isfinite(feats).all()


def test_empty_observation_flags_everything_missing() -> None:
    o = empty_observation("c", ["a:1", "b:2"], {"a:1": 0.3}, "none", ["prometheus: down"])
    assert [e.flags for e in o.endpoints] == [frozenset({MISSING})] * 2
    assert o.endpoints[0].cost_per_million == 0.3 and math.isnan(o.endpoints[1].cost_per_million)
    assert not any(e.usable for e in o.endpoints)
    assert o.to_json()["endpoints"][0]["p95_ms"] is None


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(), st.none(), st.integers()))
def test_finite_or_nan_accepts_only_finite_non_negative(value: object) -> None:
    x, ok = finite_or_nan(value)
    if ok:
        assert math.isfinite(x) and x >= 0
    else:
        assert math.isnan(x)


def test_quantile_matches_prometheus_rules() -> None:
    buckets = [(0.01, 10.0), (0.02, 30.0), (0.05, 100.0), (float("inf"), 100.0)]
    assert quantile_from_buckets(buckets, 0.5) == 0.02 + 0.03 * (50 - 30) / 70
    assert quantile_from_buckets(buckets, 0.1) == 0.01
    assert quantile_from_buckets([(0.1, 0.0), (float("inf"), 5.0)], 0.9) == 0.1  # in +Inf: last finite bound
    assert math.isnan(quantile_from_buckets([(0.1, 0.0), (float("inf"), 0.0)], 0.5))  # no traffic
    assert math.isnan(quantile_from_buckets([(0.1, 3.0)], 0.5))  # no +Inf bucket: malformed
    assert math.isnan(quantile_from_buckets(buckets, 1.5))


@given(
    st.lists(st.floats(min_value=0.0005, max_value=4.0), min_size=1, max_size=300),
    st.floats(min_value=0.01, max_value=0.99),
)
def test_quantile_lies_in_the_bucket_holding_the_true_quantile(samples: list[float], q: float) -> None:
    bounds = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf")]
    buckets = [(b, float(sum(1 for s in samples if s <= b))) for b in bounds]
    est = quantile_from_buckets(buckets, q)
    true = float(np.quantile(samples, q, method="inverted_cdf"))
    upper = next(b for b in bounds if true <= b)
    lower = max([0.0] + [b for b in bounds if b < upper])
    assert lower - 1e-12 <= est <= upper + 1e-12


@given(
    st.lists(st.tuples(st.floats(allow_nan=True), st.floats(allow_nan=True, allow_infinity=True)), max_size=20),
    st.floats(allow_nan=True),
)
def test_quantile_never_raises(buckets: list[tuple[float, float]], q: float) -> None:
    quantile_from_buckets(buckets, q)
