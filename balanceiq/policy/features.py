"""Observation -> the policy's input: one normalised feature row per endpoint, padded to
``n_max`` with zeros (the last column marks present endpoints). Unmeasured values are 0
*and* flagged in validity columns, so the network can tell "zero" from "unknown"."""

from __future__ import annotations

import numpy as np

from balanceiq.telemetry.observation import FEATURES, Observation

# value columns, validity columns, capacity share, estimated utilisation, its deviation
# from the fleet's (signed and absolute), present
N_FEATURES = 2 * len(FEATURES) + 5


def encode(obs: Observation, capacity: np.ndarray, n_max: int, slo_ms: float = 150.0) -> np.ndarray:
    feats, valid = obs.to_array()
    n = feats.shape[0]
    if n > n_max:
        raise ValueError(f"{n} endpoints exceed the policy's n_max={n_max}")
    f = feats.copy()
    col = {name: i for i, name in enumerate(FEATURES)}
    # Extreme but finite inputs (1e-300 capacity, 1e300 rps) must give bounded features, not inf/NaN or warnings.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
        f[:, col["p50_ms"]] = np.clip(f[:, col["p50_ms"]] / slo_ms, 0, 10)
        f[:, col["p95_ms"]] = np.clip(f[:, col["p95_ms"]] / slo_ms, 0, 10)
        f[:, col["saturation"]] = np.clip(f[:, col["saturation"]], 0, 3)
        f[:, col["inflight"]] = np.log1p(np.clip(f[:, col["inflight"]], 0, None)) / 5
        total_rps = f[:, col["rps"]].sum()
        # A copy: the column is normalised in place next, and utilisation needs rps.
        rps = f[:, col["rps"]].copy()
        f[:, col["rps"]] = rps / total_rps if total_rps > 0 else 0.0
        max_cost = f[:, col["cost_per_million"]].max()
        f[:, col["cost_per_million"]] = f[:, col["cost_per_million"]] / max_cost if max_cost > 0 else 0.0
        f[:, col["weight_share"]] = f[:, col["weight_share"]] * n
        cap = np.nan_to_num(capacity, nan=0.0, posinf=0.0)
        cap_share = cap / cap.sum() if cap.sum() > 0 else np.zeros(n)
        util = np.clip(np.divide(rps, cap, out=np.zeros(n), where=cap > 0), 0, 3)
        # Deviation from the fleet's balanced utilisation (CFR-RL gains most pairing those furthest above and below).
        fleet = float(np.clip(total_rps / cap.sum(), 0, 3)) if cap.sum() > 0 else 0.0
        dev = np.where(cap > 0, util - fleet, 0.0)
        rows = np.column_stack([f, valid, cap_share * n, util, np.clip(dev, -3, 3), np.abs(dev), np.ones(n)])
    rows = np.nan_to_num(rows, nan=0.0, posinf=3.0, neginf=-3.0)
    rows = np.clip(rows, -1e6, 1e6)
    out = np.zeros((n_max, N_FEATURES), dtype=np.float32)
    out[:n] = rows
    return out
