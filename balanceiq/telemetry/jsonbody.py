"""JSON from outside the process, refused before decoding when nested absurdly deep: ``json.loads``
recurses once per level, and near the recursion limit even the finalizers a garbage collection runs
fail (an unraisable error far from the parser). So depth is checked first, in C via numpy."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

MAX_DEPTH = 100
"""Deeper than any Prometheus, Envoy admin, ALS or ORCA body (they nest under 10 levels)."""

_OPEN = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSE = np.frombuffer(b"]}", dtype=np.uint8)


def nesting_depth(body: str | bytes) -> int:
    """An upper bound of the nesting depth (brackets inside strings count too)."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    a = np.frombuffer(raw, dtype=np.uint8)
    step = np.isin(a, _OPEN).astype(np.int32) - np.isin(a, _CLOSE)
    return int(np.cumsum(step).max(initial=0))


def check_depth(body: str | bytes) -> None:
    """ValueError when ``body`` may nest deeper than :data:`MAX_DEPTH`."""
    if nesting_depth(body) > MAX_DEPTH:
        raise ValueError(f"JSON nested too deeply (over {MAX_DEPTH} levels)")


def loads(body: str | bytes) -> Any:
    """``json.loads`` after :func:`check_depth`; ValueError for anything not JSON."""
    check_depth(body)
    return json.loads(body)
