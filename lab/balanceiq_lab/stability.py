"""Ping-pong in a sequence of traffic splits (address -> share or weight), one definition
for the demo report and ``balanceiq bench live``: a **reversal** is a share moving more than
``REVERSAL_THRESHOLD`` one way, then back within ``REVERSAL_WINDOW`` decisions."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

REVERSAL_THRESHOLD = 0.05
REVERSAL_WINDOW = 3


def _normalised(split: Mapping[str, float]) -> dict[str, float]:
    vals = {a: float(v) for a, v in split.items() if math.isfinite(float(v)) and float(v) >= 0}
    total = sum(vals.values())
    return {a: v / total for a, v in vals.items()} if total > 0 else dict.fromkeys(vals, 0.0)


def reversal_events(timeline: Sequence[Mapping[str, float]]) -> list[tuple[int, str]]:
    """``(decision index of the move back, address)`` for every reversal in ``timeline``
    (each move back counts once)."""
    splits = [_normalised(s) for s in timeline]
    out: list[tuple[int, str]] = []
    for a in sorted({a for s in splits for a in s}):
        series = [s.get(a, 0.0) for s in splits]
        moves = [after - before for before, after in itertools.pairwise(series)]
        for j, back in enumerate(moves):
            there = moves[max(0, j - REVERSAL_WINDOW) : j]
            if abs(back) > REVERSAL_THRESHOLD and any(abs(m) > REVERSAL_THRESHOLD and m * back < 0 for m in there):
                out.append((j + 1, a))
    return sorted(out)
