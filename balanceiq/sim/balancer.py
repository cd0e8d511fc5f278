"""Envoy's balancers as splits: each endpoint's share of a step's traffic under a policy's weights, and for the
least-request balancers how long requests wait.

- ``round_robin``: shares proportional to the weights.
- ``least_request``: power of two choices (equal weights) or ``weight / (active + 1)``. Each endpoint's in-flight count
  is a birth-death chain whose arrivals depend on every endpoint's distribution (mean-field JSQ(d)); the split is that
  system's fixed point.
- ``cswrr``: weights ``qps / utilisation`` from each endpoint's last ORCA report of the step (:func:`orca_weights`),
  utilisation as the lab's backends report it: slots in use when a response leaves (a one-slot backend always reports 1).

The least-request balancers skip endpoints that are down (Envoy's health checks eject them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BALANCERS = ("round_robin", "least_request", "cswrr")
"""The balancers :func:`split` models, by their names in the benchmarks."""

IN_FLIGHT_MAX = 64  # States of each endpoint's chain: 0 .. this - 1 requests in flight.
_ITERATIONS = 60
_DAMPING = 0.5
_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Split:
    """Shares (sum 1); for the least-request balancers also, per endpoint, the chance a
    request waits for a slot and its mean wait when it does (ms), else ``None``."""

    shares: np.ndarray
    p_wait: np.ndarray | None = None
    wait_ms: np.ndarray | None = None


def _arrivals(x: np.ndarray, demand: float, w: np.ndarray, equal: bool) -> np.ndarray:
    """Arrival rate (req/s) at each endpoint in each state, given every endpoint's state distribution ``x`` (rows)."""
    n, k = x.shape
    if equal:
        beaten = (1.0 - np.cumsum(x, axis=1)) + 0.5 * x  # P(A_j > k) + P(A_j = k) / 2
        others = beaten.sum(axis=0)[None, :] - beaten
        return demand / (n * n) * (1.0 + 2.0 * others)
    inv = 1.0 / np.arange(1.0, k + 1.0)
    return demand * w[:, None] * inv[None, :] / float((w[:, None] * x * inv[None, :]).sum())


def _chain(rate: np.ndarray, servers: np.ndarray, per_server: np.ndarray) -> np.ndarray:
    """Stationary distributions of birth-death chains: births ``rate[i, k]`` in state k,
    deaths ``min(k, c_i) x per_server_i``."""
    k = np.arange(1.0, rate.shape[1])
    deaths = np.minimum(k[None, :], servers[:, None]) * per_server[:, None]
    step = np.log(np.maximum(rate[:, :-1], 1e-300)) - np.log(deaths)
    logx = np.concatenate([np.zeros((rate.shape[0], 1)), np.cumsum(step, axis=1)], axis=1)
    x = np.exp(logx - logx.max(axis=1, keepdims=True))
    return x / x.sum(axis=1, keepdims=True)


def _least_request(
    w: np.ndarray, demand: float, capacity: np.ndarray, servers: np.ndarray, start: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shares, chance of waiting, the chains' distributions and the mean wait (ms)."""
    c = np.maximum(np.floor(servers), 1.0)
    per_server = capacity / c
    equal = bool(np.all(w == w[0]))
    x = start if start is not None and start.shape == (w.size, IN_FLIGHT_MAX) else None
    if x is None:
        x = _chain(np.full((w.size, IN_FLIGHT_MAX), demand / w.size), c, per_server)
    step, last = _DAMPING, np.inf
    for _ in range(_ITERATIONS):
        new = _chain(_arrivals(x, demand, w, equal), c, per_server)
        gap = float(np.abs(new - x).max())
        if gap < _TOLERANCE:
            x = new
            break
        if gap > last:  # overshooting: smaller steps
            step = max(step * 0.5, 0.05)
        last = gap
        x = (1.0 - step) * x + step * new
    flow = x * _arrivals(x, demand, w, equal)
    shares = flow.sum(axis=1)
    seen = flow / np.maximum(shares[:, None], 1e-300)  # the state an arriving request finds
    queued = np.arange(IN_FLIGHT_MAX)[None, :] - c[:, None] + 1.0
    waits = queued > 0
    p_wait = (seen * waits).sum(axis=1)
    wait_ms = 1000.0 * (seen * np.where(waits, queued, 0.0)).sum(axis=1) / np.maximum(p_wait, 1e-300) / capacity
    return shares / shares.sum(), np.clip(p_wait, 0.0, 1.0), x, wait_ms


def split(
    balancer: str,
    weights: np.ndarray,
    demand: float,
    capacity: np.ndarray,
    up: np.ndarray,
    servers: np.ndarray,
    state: dict[str, np.ndarray] | None = None,
) -> Split:
    """What ``balancer`` does with these ``weights`` (sum 1) when ``demand`` req/s arrive
    at endpoints of this ``capacity`` (req/s) and ``servers``. ``state`` carries the
    least-request chains from one step to the next (a warm start)."""
    if balancer == "round_robin":
        return Split(weights)
    if balancer not in BALANCERS:
        raise ValueError(f"unknown balancer {balancer!r}; known: {', '.join(BALANCERS)}")
    live = up & (capacity > 0)
    if not live.any():
        return Split(weights)
    w = np.where(live, weights, 0.0)
    if balancer == "cswrr" or demand <= 0 or w.sum() <= 0:
        return Split(w / w.sum() if w.sum() > 0 else live / live.sum())
    idx = np.flatnonzero(live)
    start = None
    if state is not None and np.array_equal(state.get("rows", np.empty(0)), idx):
        start = state["chains"]
    shares, p_wait, x, wait_ms = _least_request(w[idx], demand, capacity[idx], servers[idx], start)
    if state is not None:
        state["chains"], state["rows"] = x, idx
    out, pw, wm = np.zeros((3, capacity.size))
    out[idx], pw[idx], wm[idx] = shares, p_wait, wait_ms
    return Split(out, pw, wm)


def orca_weights(
    load: np.ndarray,
    capacity: np.ndarray,
    servers: np.ndarray,
    busy: np.ndarray,
    queued: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """CSWRR's weights for the next second, as Envoy sets them from each endpoint's *last* ORCA report
    (``OrcaLoadReportHandler::calculateWeightFromOrcaReport`` and ``OrcaWeightManager::updateWeightsOnHosts``
    in ``source/extensions/load_balancing_policies/common/orca_weight_manager.cc``): ``qps / utilisation``
    truncated to an integer, at least 1. The lab's backends report the arrivals of the last second and the
    slots in use as the response leaves, itself included: 1 + Binomial(slots - 1, ``busy``), every slot
    while requests are ``queued``; one report, not an average, so the weight of a many-slot endpoint jumps.
    They report no errors (no penalty). An endpoint without a report gets the median of the others' weights."""
    reported = (load > 0) & (capacity > 0)
    if not reported.any():
        return np.ones_like(load)
    c = np.maximum(np.round(servers), 1.0)
    slots = np.where(queued, c, 1.0 + rng.binomial((c - 1.0).astype(np.int64), np.clip(busy, 0.0, 1.0)))
    w = np.maximum(np.floor(load * c / slots), 1.0)
    return np.where(reported, w, np.floor(np.median(w[reported])))
