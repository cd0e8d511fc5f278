"""Calibration error against a known truth (balanceiq_lab.bench.calibration)."""

from __future__ import annotations

import math

import pytest

from balanceiq_lab.bench.calibration import backend_truth, calibration_error


def test_backend_truth_matches_the_backend_queueing() -> None:
    """concurrency / mean slot hold, with the hold including half the uniform jitter."""
    t = backend_truth({"base_latency_ms": 20.0, "concurrency": 2})
    assert t["capacity_rps"] == pytest.approx(2 / 0.0205)
    assert t["unloaded_p50_ms"] == pytest.approx(20.5)
    t = backend_truth(
        {
            "base_latency_ms": 20.0,
            "concurrency": 4,
            "jitter_ms": 0.0,
            "extra_latency_ms": 5.0,
            "tail_prob": 0.1,
            "tail_ms": 50.0,
        }
    )
    assert t["capacity_rps"] == pytest.approx(4 / 0.030)
    assert t["unloaded_p50_ms"] == pytest.approx(25.0)


def test_calibration_error_against_backend_truth() -> None:
    fitted = {
        "a": {"capacity_rps": 90.0, "base_latency_ms": 14.0},
        "b": {"capacity_rps": 60.0, "base_latency_ms": 50.0},
    }
    truth = {
        "a": {"base_latency_ms": 20.0, "concurrency": 2},
        "b": {"base_latency_ms": 60.0, "concurrency": 4},
        "c": {"base_latency_ms": 1.0, "concurrency": 1},
    }
    ce = calibration_error(fitted, truth)
    a = ce["endpoints"]["a"]
    assert a["capacity_rps"]["rel_error"] == pytest.approx(90 / (2 / 0.0205) - 1, abs=1e-4)
    assert a["latency_ms"]["fitted"] == pytest.approx(14 + 1000 * math.log(2) / 90, abs=1e-3)
    assert a["latency_ms"]["rel_error"] == pytest.approx((14 + 1000 * math.log(2) / 90) / 20.5 - 1, abs=1e-4)
    assert ce["missing"] == ["c"]
    assert ce["capacity_rel_error"]["max_abs"] == pytest.approx(
        max(abs(90 / (2 / 0.0205) - 1), abs(60 / (4 / 0.0605) - 1)), abs=1e-4
    )
