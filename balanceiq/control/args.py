"""Shared by overrides, guardrails and rollback: limits, argument checks that raise
:class:`~balanceiq.exceptions.GuardrailError` naming the argument, and number formatting."""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Sequence

from balanceiq.exceptions import GuardrailError

#: The controller's weights always sum to this; a "set" weight w means share w / WEIGHT_SCALE.
WEIGHT_SCALE = 10000

# Shares are floats: a sum within this of 1 is 1 (and fixed shares may sum to 1 + this).
_SUM_TOL = 1e-9
_MAX_NAMES = 5


def _fmt(x: float | None) -> str:
    """Numbers in notes and reasons: short, and ``n/a`` for a missing value."""
    return "n/a" if x is None else f"{x:.3g}"


def _names(names: Sequence[str]) -> str:
    """A readable, bounded list of endpoints for a note (40 addresses would drown it)."""
    if len(names) <= _MAX_NAMES:
        return ", ".join(names)
    return f"{', '.join(names[:_MAX_NAMES])} and {len(names) - _MAX_NAMES} more"


def _finite_float(name: str, value: object) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise GuardrailError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise GuardrailError(f"{name} must be finite, got {value!r}")
    return v


def _now(now: float | None) -> float:
    return time.time() if now is None else _finite_float("now", now)


def _int_arg(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; not a bool (``after=True`` is a bug, not a count)."""
    wanted = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    if not isinstance(value, bool):
        try:
            v = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            if v >= minimum and (maximum is None or v <= maximum):
                return v
    raise GuardrailError(f"{name} must be an integer {wanted}, got {value!r}")
