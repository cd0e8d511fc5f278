"""Ping-pong in a sequence of traffic splits (address -> share or weight), one definition
for the controller, the demo report and ``balanceiq bench live``: a **reversal** is a
share moving more than ``threshold`` one way, then back within ``window`` decisions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

REVERSAL_THRESHOLD = 0.05
REVERSAL_WINDOW = 3


def _normalised(split: Mapping[str, float]) -> dict[str, float]:
    vals = {a: float(v) for a, v in split.items() if math.isfinite(float(v)) and float(v) >= 0}
    total = sum(vals.values())
    return {a: v / total for a, v in vals.items()} if total > 0 else dict.fromkeys(vals, 0.0)


def reversal_events(
    timeline: Sequence[Mapping[str, float]],
    threshold: float = REVERSAL_THRESHOLD,
    window: int = REVERSAL_WINDOW,
) -> list[tuple[int, str]]:
    """``(decision index of the move back, address)`` for every reversal in ``timeline``
    (each move back counts once)."""
    splits = [_normalised(s) for s in timeline]
    addresses = sorted({a for s in splits for a in s})
    out: list[tuple[int, str]] = []
    for a in addresses:
        series = [s.get(a, 0.0) for s in splits]
        moves = [series[i + 1] - series[i] for i in range(len(series) - 1)]
        for j, back in enumerate(moves):
            if abs(back) <= threshold:
                continue
            for i in range(max(0, j - window), j):
                there = moves[i]
                if abs(there) > threshold and there * back < 0:
                    out.append((j + 1, a))
                    break
    return sorted(out)


def count_reversals(
    timeline: Sequence[Mapping[str, float]],
    threshold: float = REVERSAL_THRESHOLD,
    window: int = REVERSAL_WINDOW,
) -> int:
    """How many reversals ``timeline`` has (see :func:`reversal_events`)."""
    return len(reversal_events(timeline, threshold, window))
