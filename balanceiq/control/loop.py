"""Runs a :class:`~balanceiq.control.controller.Controller` on a clock."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from balanceiq.control.controller import Controller

log = logging.getLogger("balanceiq.control.controller")  # its name before the move, for log configs


class ControlLoop:
    """Runs :meth:`Controller.step` every ``interval_s`` on a daemon thread."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_tick: float | None = None
        self.steps = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="balanceiq-control", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Apply a changed interval (or overrides) now rather than after the old interval."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.controller.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.controller.step()
            except Exception:  # the loop must outlive any bug in one step
                log.exception("control step failed")
            self.steps += 1
            self.last_tick = time.time()
            wait = max(0.0, self.controller.policy.interval_s - (time.monotonic() - started))
            self._wake.wait(wait)
            self._wake.clear()
