"""The weight store: the one place snapshots are versioned, published and persisted. Versions are
``"<epoch>.<seq>"``; the epoch, ``max(previous epoch + 1, now in ms)``, is written before the first
publish, so versions never repeat across restarts even if the clock steps back."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from balanceiq.exceptions import AssignmentError
from balanceiq.xds.assignment import Assignment
from balanceiq.xds.snapshot import Snapshot, build_snapshot

log = logging.getLogger(__name__)

STATE_FILE = "xds-snapshot.json"
EPOCH_FILE = "xds-epoch"

Watcher = Callable[[Snapshot], None]


class SnapshotStore:
    """The latest snapshot, versioned, watched and optionally persisted. Thread-safe; watchers
    run on the publishing thread and must only hand the snapshot off."""

    def __init__(self, state_dir: Path | str | None = None) -> None:
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._watchers: list[Watcher] = []
        self._latest: Snapshot | None = None
        self._seq = 0
        self.epoch = time.time_ns() // 1_000_000
        if self._state_dir is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoch = max(self.epoch, int((self._state_dir / EPOCH_FILE).read_text()) + 1)
            _atomic_write(self._state_dir / EPOCH_FILE, str(self.epoch))

    def next_version(self) -> str:
        with self._lock:
            self._seq += 1
            return f"{self.epoch}.{self._seq}"

    def latest(self) -> Snapshot | None:
        return self._latest

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher(snapshot)`` on every publish; returns an unsubscribe function."""
        with self._lock:
            self._watchers.append(watcher)

        def cancel() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._watchers.remove(watcher)

        return cancel

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._latest = snapshot
            watchers = list(self._watchers)
        for w in watchers:
            try:
                w(snapshot)
            except Exception:  # one broken watcher must not starve the others
                log.exception("snapshot watcher failed")

    def publish_assignments(self, assignments: Iterable[Assignment]) -> Snapshot:
        # One lock for version, build and publish: concurrent callers must not leave an older version latest.
        with self._publish_lock:
            snapshot = build_snapshot(self.next_version(), assignments)
            self.publish(snapshot)
            # Persist after streams were notified: the disk write is off the push path.
            if self._state_dir is not None:
                data = {
                    "version": snapshot.version,
                    "saved_at": time.time(),
                    "assignments": [a.to_json() for a in snapshot.assignments.values()],
                }
                try:
                    _atomic_write(self._state_dir / STATE_FILE, json.dumps(data, indent=1))
                except OSError as exc:
                    log.error("could not persist xDS snapshot %s: %s", snapshot.version, exc)
        return snapshot

    def restore(self) -> list[Assignment] | None:
        """Assignments of the last persisted snapshot, or None if there is none usable."""
        path = self._state_dir / STATE_FILE if self._state_dir is not None else None
        if path is None or not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return [Assignment.from_json(a) for a in data["assignments"]]
        except (OSError, ValueError, KeyError, TypeError, RecursionError, AssignmentError) as exc:
            # A corrupt state file must not stop the server: fall back to config defaults.
            log.warning("ignoring unreadable xDS state %s: %s", path, exc)
            return None


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
