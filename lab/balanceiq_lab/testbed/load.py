"""A bounded HTTP load generator: at most ``total`` requests, at most ``max_seconds``.

Used by the demo, the tests and the benchmarks. It counts which backend answered (the
sample backends set ``x-backend``), status codes and latencies. Traffic goes to loopback
only: :func:`run_load` refuses any other address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import httpx
import numpy as np

from balanceiq_lab.errors import BenchError


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    failed: int = 0  # transport errors and 5xx that Envoy itself produced
    backend_5xx: int = 0  # 5xx a backend answered (e.g. injected errors); Envoy did its job
    by_backend: Counter[str] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def shares(self) -> dict[str, float]:
        total = sum(self.by_backend.values())
        return {k: v / total for k, v in sorted(self.by_backend.items())} if total else {}

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def to_json(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "backend_5xx": self.backend_5xx,
            "rps": self.sent / self.elapsed_s if self.elapsed_s else 0.0,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "by_backend": dict(self.by_backend),
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "errors": dict(self.errors),
        }


def ensure_loopback(url: str) -> None:
    host = httpx.URL(url).host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise BenchError(f"load is only ever sent to loopback; refusing {url}")


async def run_load(
    url: str,
    *,
    total: int,
    concurrency: int = 16,
    max_seconds: float = 60.0,
    timeout_s: float = 5.0,
    rate_rps: float | None = None,
    stop: threading.Event | None = None,
) -> LoadResult:
    """Send up to ``total`` GETs with ``concurrency`` workers, stopping at ``max_seconds``
    (or when ``stop`` is set, for background load in tests and benchmarks)."""
    ensure_loopback(url)
    result = LoadResult()
    remaining = total
    start = time.monotonic()
    deadline = start + max_seconds
    interval = (concurrency / rate_rps) if rate_rps else 0.0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline and not (stop and stop.is_set()):
            remaining -= 1
            result.sent += 1
            t0 = time.monotonic()
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    result.by_status[resp.status] += 1
                    backend = resp.headers.get("x-backend")
                    if backend:
                        result.by_backend[backend] += 1
                    if resp.status < 500:
                        result.ok += 1
                    elif backend:
                        result.backend_5xx += 1
                    else:
                        result.failed += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                result.failed += 1
                result.errors[type(exc).__name__] += 1
            result.latencies_ms.append((time.monotonic() - t0) * 1000)
            if interval:
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    result.elapsed_s = time.monotonic() - start
    return result


def run_load_sync(url: str, **kwargs: object) -> LoadResult:
    return asyncio.run(run_load(url, **kwargs))  # type: ignore[arg-type]


class LoadThread:
    """Bounded open-loop load through Envoy, in chunks, until stopped or ``max_s`` is up."""

    def __init__(self, url: str, rate_rps: float, concurrency: int, max_s: float, chunk_s: float = 60.0) -> None:
        self.url, self.rate, self.concurrency, self.max_s, self.chunk_s = url, rate_rps, concurrency, max_s, chunk_s
        self._stop = threading.Event()
        self.sent = 0
        self.failed = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="liveenv-load", daemon=True)

    def start(self) -> LoadThread:
        self.thread.start()
        return self

    def _run(self) -> None:
        end = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < end:
            span = min(self.chunk_s, end - time.monotonic())
            try:
                res = run_load_sync(
                    self.url,
                    total=int(self.rate * span) + self.concurrency,
                    concurrency=self.concurrency,
                    max_seconds=span,
                    rate_rps=self.rate,
                    stop=self._stop,
                    timeout_s=3.0,
                )
            except Exception as exc:  # keep trying: a live env without load sees nothing
                self.error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(1.0)
                continue
            self.sent += res.sent
            self.failed += res.failed

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout)
