"""An asyncio event loop on its own thread, for the grpc.aio servers (xDS, ALS) driven from
synchronous code: inside a Ray actor they must not share the actor's own loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Options of both servers: their streams live as long as Envoy (xDS for days).
GRPC_OPTIONS: list[tuple[str, Any]] = [
    # gRPC turns SO_REUSEPORT on by default: a second server on the port would silently take
    # half of Envoy's streams.
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 30_000),  # keepalives find dead peers
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class LoopThread:
    """:meth:`start`, then :meth:`run` coroutines on the loop; :meth:`close` stops and joins."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.loop is not None

    def start(self) -> None:
        if self.loop is not None:
            raise RuntimeError(f"{self.name} loop already running")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=self.name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait; raises TimeoutError past ``timeout``."""
        assert self.loop is not None, "start() first"
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise TimeoutError(f"{self.name}: did not finish within {timeout}s") from None

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Schedule ``fn`` on the loop from any thread; a no-op once closed."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn)

    def close(self, cleanup: Coroutine[Any, Any, object] | None = None, timeout: float = 10.0) -> None:
        """Run ``cleanup`` (errors logged, not raised: we are shutting down), then stop."""
        loop, self.loop = self.loop, None
        if loop is None:
            if cleanup is not None:
                cleanup.close()  # never awaited: say so to Python instead of warning
            return
        if cleanup is not None:
            fut = asyncio.run_coroutine_threadsafe(cleanup, loop)
            try:
                fut.result(timeout)
            except Exception:
                log.debug("%s: error during shutdown", self.name, exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
            if not self._thread.is_alive():
                loop.close()
        self._thread = None
