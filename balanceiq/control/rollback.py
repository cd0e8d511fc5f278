"""The circuit breaker between the learned policy and the baseline heuristic."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, Literal

from balanceiq.control.args import _finite_float, _fmt, _int_arg, _now
from balanceiq.exceptions import GuardrailError

Mode = Literal["policy", "baseline"]


def _rollback_args(after: object, margin: object, probation_after: object) -> tuple[int, float, int]:
    a = _int_arg("rollback_after", after, 1)
    mg = _finite_float("rollback_margin", margin)
    if mg < 0:
        raise GuardrailError(f"rollback_margin must be >= 0, got {margin!r}")
    return a, mg, _int_arg("probation_after", probation_after, 1)


def _finite_or_nan(x: object) -> float:
    try:
        f = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


class RollbackMonitor:
    """Both proposals are scored on the *same* observation (higher is better): realised rewards
    across time would blame the policy for the weather. In ``policy`` mode, ``after`` consecutive
    intervals worse by more than ``margin`` roll back; in ``baseline`` mode (the policy still scored)
    ``probation_after`` intervals no longer worse bring it back. Thread-safe: the loop records, the API reads."""

    def __init__(self, after: int, margin: float, probation_after: int) -> None:
        self.after, self.margin, self.probation_after = _rollback_args(after, margin, probation_after)
        self._lock = threading.Lock()
        self._transitions: deque[dict[str, Any]] = deque(maxlen=20)
        self._last: tuple[float, float] | None = None  # the last (policy, baseline) scores compared
        self.worse_streak = 0
        self.good_streak = 0
        self.rollbacks = 0
        self.recoveries = 0
        self.since = time.time()
        self.mode: Mode = "policy"
        self.reason = "using the policy (scored against the baseline every interval)"

    def _go(self, to: Mode, reason: str, now: float) -> None:
        self._transitions.append({"at": now, "from": self.mode, "to": to, "reason": reason})
        self.mode = to
        self.reason = reason
        self.since = now
        self.worse_streak = 0
        self.good_streak = 0

    def record(self, policy_score: float, baseline_score: float, now: float | None = None) -> str:
        """Account one interval's shadow comparison; return the mode for the next decision."""
        p, b = _finite_or_nan(policy_score), _finite_or_nan(baseline_score)
        t = _now(now)
        with self._lock:
            if not math.isfinite(b):
                return self.mode  # nothing to compare against: no evidence either way
            self._last = (p, b)
            worse = not math.isfinite(p) or p < b - self.margin
            last = f"(last {_fmt(p)} vs {_fmt(b)})"
            if self.mode == "policy":
                self.worse_streak = self.worse_streak + 1 if worse else 0
                if self.worse_streak >= self.after:
                    self.rollbacks += 1
                    self._go(
                        "baseline",
                        f"rollback: the policy scored below the baseline by more than {_fmt(self.margin)} for "
                        f"{self.worse_streak} consecutive interval(s) {last}; using the baseline until the "
                        f"policy holds its own for {self.probation_after} interval(s)",
                        t,
                    )
            else:
                self.good_streak = 0 if worse else self.good_streak + 1
                if self.good_streak >= self.probation_after:
                    self.recoveries += 1
                    self._go(
                        "policy",
                        f"recovered: the policy scored within {_fmt(self.margin)} of the baseline or better for "
                        f"{self.good_streak} consecutive interval(s) {last}; using the policy",
                        t,
                    )
            return self.mode

    def reconfigure(self, after: int, margin: float, probation_after: int) -> None:
        """New thresholds (validated first, so a bad call changes nothing)."""
        a, mg, p = _rollback_args(after, margin, probation_after)
        with self._lock:
            self.after, self.margin, self.probation_after = a, mg, p

    def state(self) -> dict[str, Any]:
        with self._lock:
            p, b = self._last or (math.nan, math.nan)
            return {
                **{k: getattr(self, k) for k in ("mode", "reason", "since", "worse_streak", "good_streak")},
                "last_policy_score": p if math.isfinite(p) else None,
                "last_baseline_score": b if math.isfinite(b) else None,
                **{k: getattr(self, k) for k in ("rollbacks", "recoveries", "after", "margin", "probation_after")},
                "transitions": [dict(x) for x in self._transitions],
            }
