"""What the controller decided and what came of it: one record per interval, kept in
memory for the API and optionally appended to a JSONL recording (with the full
observation: simulator calibration fits against the inputs, not summaries)."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


@dataclass(frozen=True, kw_only=True)
class DecisionRecord:
    """One control interval: what was seen, what was decided, what Envoy did with it."""

    seq: int
    timestamp: float
    mode: str  # "policy" | "baseline" | "hold" (telemetry blind) | "standby" (no lease)
    critical: tuple[str, ...] = ()
    weights: dict[str, int]
    previous: dict[str, int]
    reward: float | None = None  # realised reward of the interval that just ended
    moved: float = 0.0  # traffic_moved(previous, new)
    pushed: bool = False
    acked: bool | None = None  # None: not pushed, or no Envoy connected to ACK it
    push_ms: float | None = None
    ack_ms: float | None = None
    version: str | None = None
    notes: tuple[str, ...] = ()
    source: str = "none"
    error: str | None = None
    step_ms: float | None = None  # observe to push, the whole decision
    scores: dict[str, float] | None = None  # policy vs baseline proposal, negated LP objective
    shares: dict[str, float] | None = None  # the split decided (weights realise it in Envoy)
    shadow: bool = False  # decided in shadow mode: recorded, never pushed
    effect: dict[str, Any] | None = None  # estimated effect of the split decided vs the one in force
    score_ms: float | None = None  # the policy's scoring within step_ms (None: not asked)
    observation: dict[str, Any] | None = field(default=None, repr=False)

    def to_json(self, *, with_observation: bool = False) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies the observation only for it to be dropped.
        out = {f.name: getattr(self, f.name) for f in fields(self) if with_observation or f.name != "observation"}
        out["critical"], out["notes"] = list(self.critical), list(self.notes)
        out["weights"], out["previous"] = dict(self.weights), dict(self.previous)
        out["scores"] = {k: _num(v) for k, v in self.scores.items()} if self.scores else None
        out["shares"] = {k: round(float(v), 6) for k, v in self.shares.items()} if self.shares else None
        for key in ("reward", "push_ms", "ack_ms", "step_ms", "moved", "score_ms"):
            out[key] = _num(out[key])
        return out


class DecisionLog:
    """The last ``size`` decisions in memory, and optionally every one appended to a file."""

    def __init__(self, size: int = 500, recording: str | os.PathLike[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._items: deque[DecisionRecord] = deque(maxlen=size)
        self._seq = 0
        self.recording = Path(recording) if recording else None
        self._recording_failed = False
        if self.recording is not None:
            self.recording.parent.mkdir(parents=True, exist_ok=True)

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def append(self, record: DecisionRecord) -> None:
        with self._lock:
            self._items.append(record)
        if self.recording is not None:
            try:
                with self.recording.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record.to_json(with_observation=True)) + "\n")
                self._recording_failed = False
            except OSError as exc:
                # A full disk must not stop the control loop; say so once per outage.
                if not self._recording_failed:
                    log.warning("decision recording to %s failed: %s", self.recording, exc)
                self._recording_failed = True

    def recent(self, limit: int = 20) -> list[DecisionRecord]:
        with self._lock:
            items = list(self._items)
        return items[::-1][: max(0, limit)]

    def last(self) -> DecisionRecord | None:
        with self._lock:
            return self._items[-1] if self._items else None
