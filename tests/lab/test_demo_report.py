"""`balanceiq demo`'s report: per phase each cloud's share, p95 and price, the blended
price, and weight reversals (total and per phase). Pure functions; nothing is started."""

from __future__ import annotations

import pytest
from rich.console import Console

from balanceiq_lab.demo import _by_cloud, _print_summary, summarise


def _weights(shares: dict[str, float], prices: dict[str, float]) -> dict[str, object]:
    return {
        "endpoints": [
            {
                "address": a,
                "share": s,
                "weight": round(10000 * s),
                "rps": 100 * s,
                "p95_ms": 20.0,
                "error_rate": 0.0,
                "cost_per_million": prices[a],
            }
            for a, s in shares.items()
        ]
    }


CLOUDS = {"a1": "aws", "a2": "aws", "g1": "gcp"}


def _interval(t: float, phase: str, shares: dict[str, float], prices: dict[str, float]) -> dict[str, object]:
    w = _weights(shares, prices)
    return {
        "t": t,
        "phase": phase,
        "clouds": _by_cloud(w, CLOUDS),
        "cost_per_million": 0.3,
        "weights": {e["address"]: e["weight"] for e in w["endpoints"]},
    }  # type: ignore[attr-defined]


def test_by_cloud_prices_are_share_weighted() -> None:
    c = _by_cloud(_weights({"a1": 0.3, "a2": 0.1, "g1": 0.6}, {"a1": 0.2, "a2": 0.6, "g1": 0.5}), CLOUDS)
    assert c["aws"]["share"] == pytest.approx(0.4) and c["aws"]["cost_per_million"] == pytest.approx(0.3)
    assert c["gcp"]["cost_per_million"] == pytest.approx(0.5)
    idle = _by_cloud(_weights({"a1": 0.0, "a2": 0.0, "g1": 1.0}, {"a1": 0.2, "a2": 0.6, "g1": 0.5}), CLOUDS)
    assert idle["aws"]["cost_per_million"] == pytest.approx(0.4)  # no share: the plain mean


def test_phases_have_cloud_prices_and_reversals() -> None:
    prices = {"a1": 0.2, "a2": 0.2, "g1": 0.5}
    dear = {**prices, "g1": 2.0}
    even = {"a1": 0.25, "a2": 0.25, "g1": 0.5}
    rows = [
        _interval(1, "start", even, prices),
        _interval(2, "start", even, prices),
        _interval(3, "gcp dearer", {"a1": 0.45, "a2": 0.45, "g1": 0.1}, dear),  # away from gcp
        _interval(4, "gcp dearer", even, dear),  # and straight back: a1, a2, g1 reverse
        _interval(5, "gcp dearer", even, dear),
    ]
    phases = summarise(rows, ["aws", "gcp"])
    assert [p["phase"] for p in phases] == ["start", "gcp dearer"]
    assert [p["reversals"] for p in phases] == [0, 3]
    assert phases[0]["clouds"]["gcp"]["cost_per_million"] == pytest.approx(0.5)
    assert phases[1]["clouds"]["gcp"]["cost_per_million"] == pytest.approx(2.0)
    assert phases[1]["clouds"]["aws"]["share"] == pytest.approx((0.9 + 0.5 + 0.5) / 3)
    report = {"phases": phases, "reversals": sum(p["reversals"] for p in phases), "load": None}
    console = Console(record=True, width=200)
    from pathlib import Path

    _print_summary(report, ["aws", "gcp"], console, Path("/tmp/unused"))
    text = console.export_text()
    assert "gcp $/M" in text and "reversals" in text and "2.000" in text and "3 in total" in text
