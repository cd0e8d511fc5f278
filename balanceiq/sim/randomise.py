"""Random fleets and timelines to train on (domain randomisation), drawn like the lab's unseen-fleet suite but from
their own generator, so the suite's fleets, the shipped scenarios and any scenario of the user's stay held back."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from balanceiq.sim.scenario import Scenario, scenario_from_dict

CLOUDS = ("aws", "gcp", "azure", "oci")
ENDPOINTS = (3, 120)  # Fewest and most endpoints of a drawn fleet.
LOAD = (0.4, 0.8)  # Offered load as a fraction of the fleet's capacity, at the start.
_EVENTS = ("slowdown", "slots", "errors", "tail", "price", "cloud_price", "demand")


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _endpoints(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    clouds = [str(c) for c in rng.choice(CLOUDS, size=int(rng.integers(2, 5)), replace=False)]
    assign = [clouds[int(i)] for i in rng.permutation([*range(len(clouds)), *rng.integers(0, len(clouds), n)])[:n]]
    prices = np.exp(rng.uniform(math.log(0.05), math.log(1.0), n))
    prices = np.maximum(prices, prices.max() / 20.0)
    out = []
    for i in range(n):
        mean_ms = _loguniform(rng, 5.0, 150.0)
        servers = int(rng.integers(1, 17))
        heavy = rng.random() < 0.25
        sigma = 0.1 if heavy else float(rng.uniform(0.2, 0.6))
        tail_prob = float(rng.uniform(0.01, 0.05)) if heavy else 0.0
        tail_ms = float(rng.uniform(100.0, 500.0)) if heavy else 0.0
        service_ms = mean_ms * math.exp(sigma * sigma / 2) + tail_prob * tail_ms
        out.append(
            {
                "name": f"ep{i}",
                "cloud": assign[i],
                "region": "r1",
                "capacity_rps": 1000.0 * servers / service_ms,
                "base_latency_ms": 1.0,
                "cost_per_million": round(float(prices[i]), 4),
                "servers": servers,
                "service_cv": min(1.0, math.sqrt(math.expm1(sigma * sigma))),
                "tail_prob": tail_prob,
                "tail_ms": tail_ms,
            }
        )
    return out


def _event(rng: np.random.Generator, kind: str, at: float, eps: list[dict[str, Any]]) -> dict[str, Any]:
    ep = eps[int(rng.integers(len(eps)))]
    ev: dict[str, Any] = {"at_s": round(at, 3), "target": ep["name"]}
    if kind == "slowdown":
        return {**ev, "kind": "capacity", "value": round(1.0 / float(rng.uniform(2.0, 5.0)), 4)}
    if kind == "slots":
        return {**ev, "kind": "servers", "value": round(1.0 / float(rng.integers(2, 4)), 4)}
    if kind == "errors":
        return {**ev, "kind": "errors", "value": round(float(rng.uniform(0.05, 0.3)), 4)}
    if kind == "tail":
        value, fraction = round(float(rng.uniform(100.0, 500.0)), 1), round(float(rng.uniform(0.02, 0.1)), 4)
        return {**ev, "kind": "tail_latency", "value": value, "fraction": fraction}
    m = 1.0
    while 1 / 1.5 < m < 1.5:
        m = _loguniform(rng, 0.2, 10.0)
    if kind == "price":
        return {**ev, "kind": "cost", "value": round(m, 4)}
    if kind == "cloud_price":
        return {**ev, "target": f"cloud:{ep['cloud']}", "kind": "cost", "value": round(m, 4)}
    return {**ev, "target": "all", "kind": "demand", "value": round(float(rng.uniform(1.1, 1.4)), 4)}


def random_scenario(
    seed: int, *, endpoints: tuple[int, int] = ENDPOINTS, duration_s: float = 120.0, step_s: float = 1.0
) -> Scenario:
    """One random fleet and timeline; the same for the same arguments."""
    lo, hi = endpoints
    if not (1 <= lo <= hi <= 4096):
        raise ValueError(f"endpoints must be a range within 1..4096, got {endpoints}")
    rng = np.random.default_rng(seed)
    # Log-uniform sizes: as many small fleets as large ones.
    n = min(hi, math.floor(_loguniform(rng, lo, hi + 1)))
    eps = _endpoints(rng, n)
    capacity = sum(e["capacity_rps"] for e in eps)
    times = np.sort(rng.uniform(0.25, 0.8, int(rng.integers(2, 4)))) * duration_s
    events = [_event(rng, str(rng.choice(_EVENTS)), float(t), eps) for t in times]
    return scenario_from_dict(
        {
            "name": f"random-{seed}",
            "description": f"random fleet {seed}: {len(eps)} endpoints",
            "duration_s": duration_s,
            "step_s": step_s,
            "endpoints": eps,
            "demand": {"base_rps": float(rng.uniform(*LOAD)) * capacity, "diurnal_amplitude": 0.0, "noise": 0.05},
            "events": events,
        }
    )
