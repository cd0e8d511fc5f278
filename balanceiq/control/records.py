"""One record per decision, kept in memory for the API and optionally appended to a JSONL recording
with the full observation (simulator calibration fits against the inputs, not summaries)."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from pathlib import Path

from balanceiq.sim.calibrate.recording import DecisionRecord as DecisionRecord  # the recording format

log = logging.getLogger(__name__)


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
