"""An open-loop HTTP load generator: requests leave on a fixed schedule, whatever happens.

A closed-loop generator (:mod:`balanceiq_lab.testbed.load`: N workers, each sending its next
request when the previous one returns) slows down exactly when the system under test
does, so it sends fewer requests into a queue and times only the ones that got through:
*coordinated omission*. This one does not:

* **The schedule is fixed before the run**: :func:`arrival_schedule` gives every
  request's intended send time (offsets from the start), constant-rate or Poisson from a
  seed, so every run with the same arguments (every arm of a benchmark) gets the same
  arrivals.
* **Each request is fired at its intended time** regardless of how many are still
  outstanding, up to ``max_inflight`` (a safety bound on sockets and memory). A request
  that cannot be sent because that bound is reached is **recorded as an error**
  (``status == NOT_SENT``), never silently dropped or delayed.
* **Latency is completion minus the intended send time**, so any wait — in the
  generator, the network, the proxy or a backend's queue — is in the number. A request
  that was never answered (timeout) or never sent counts ``timeout_s`` as its latency.
* Per request it records the intended time, the actual send time, the latency, the
  HTTP status (``TRANSPORT_ERROR`` for a connection failure or timeout) and which backend
  answered (the sample backends' ``x-backend`` header).

Its own overhead is measured, not assumed: **schedule lag** (actual send minus intended)
percentiles, the CPU the generator process used per request, and the most requests it
had in flight. :func:`run_open_loop` runs it in this process's event loop; the CLI
(``python -m balanceiq_lab.openloop``) runs it as its own process, so nothing else
in a benchmark (a control loop holding the GIL, say) can delay the schedule::

    python -m balanceiq_lab.openloop --url http://127.0.0.1:10000/ --rate 150 \\
        --duration 75 [--arrivals poisson --seed 0] [--start-at EPOCH|-] --out result.json

Traffic goes to loopback only (:func:`balanceiq_lab.testbed.load.ensure_loopback`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from balanceiq_lab.errors import BenchError
from balanceiq_lab.results import error_rate, latency_summary, percentile
from balanceiq_lab.testbed.load import ensure_loopback

__all__ = [
    "ARRIVALS",
    "NOT_SENT",
    "TRANSPORT_ERROR",
    "OpenLoopResult",
    "Request",
    "arrival_schedule",
    "cli_argv",
    "latency_summary",
    "main",
    "percentile",
    "run_open_loop",
    "run_open_loop_sync",
]

ARRIVALS = ("constant", "poisson")
TRANSPORT_ERROR = 0  # connection refused/reset, timeout: no HTTP status
NOT_SENT = -1  # max_inflight reached at the intended time: counted as an error, never dropped
MAX_REQUESTS = 2_000_000  # rate x duration bound: memory and run time stay sane


def arrival_schedule(rate_rps: float, duration_s: float, *, arrivals: str = "poisson", seed: int = 0) -> np.ndarray:
    """Intended send offsets (seconds from the start, ascending, all ``< duration_s``).

    ``constant``: ``i / rate``. ``poisson``: exponential gaps of mean ``1 / rate`` drawn
    from ``numpy.random.default_rng(seed)``; the same seed gives the same schedule.
    """
    if not (math.isfinite(rate_rps) and rate_rps > 0):
        raise BenchError(f"rate must be a positive number of requests/s, got {rate_rps}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise BenchError(f"duration must be a positive number of seconds, got {duration_s}")
    if rate_rps * duration_s > MAX_REQUESTS:
        raise BenchError(f"rate x duration = {rate_rps * duration_s:.0f} requests; at most {MAX_REQUESTS} per run")
    if arrivals == "constant":
        n = max(1, math.floor(rate_rps * duration_s - 1e-9) + 1)
        offsets = np.arange(n, dtype=np.float64) / rate_rps
        return offsets[offsets < duration_s]
    if arrivals == "poisson":
        rng = np.random.default_rng(seed)
        expected = rate_rps * duration_s
        chunks: list[np.ndarray] = []
        last = 0.0
        while last < duration_s:
            gaps = rng.exponential(1.0 / rate_rps, size=int(expected + 6 * math.sqrt(expected) + 16))
            times = last + np.cumsum(gaps)
            chunks.append(times)
            last = float(times[-1])
        offsets = np.concatenate(chunks)
        return offsets[offsets < duration_s]
    raise BenchError(f"arrivals must be one of {', '.join(ARRIVALS)}, got {arrivals!r}")


@dataclass
class OpenLoopResult:
    """One run, one row per scheduled request (arrays in schedule order).

    ``intended_s``/``sent_s`` are offsets from the run's start (``start_wall``, epoch
    seconds); ``sent_s`` is NaN for a request that was not sent. ``latency_ms`` is
    completion minus intended send time; ``timeout_s`` for one never answered or never
    sent. ``backend`` indexes ``backends`` (-1: no ``x-backend`` header, e.g. Envoy's own
    503 or a transport error). ``error`` indexes ``error_kinds`` (-1: none).
    """

    intended_s: np.ndarray
    sent_s: np.ndarray
    latency_ms: np.ndarray
    status: np.ndarray
    backend: np.ndarray
    backends: list[str]
    error: np.ndarray
    error_kinds: list[str]
    start_wall: float
    timeout_s: float
    max_inflight: int
    url: str = ""
    arrivals: str = ""
    rate_rps: float = 0.0
    duration_s: float = 0.0
    seed: int | None = None
    cpu_s: float = 0.0  # CPU the generating process used during the run
    wall_s: float = 0.0  # start to the last completion
    peak_inflight: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    nbytes: np.ndarray | None = None  # body bytes per request; in-process runs only, not serialised

    def __len__(self) -> int:
        return int(self.intended_s.shape[0])

    @property
    def ok(self) -> np.ndarray:
        """2xx answers."""
        return (self.status >= 200) & (self.status < 300)

    @property
    def sent(self) -> np.ndarray:
        return self.status != NOT_SENT

    @property
    def completed_s(self) -> np.ndarray:
        """When each request finished (offset from the start): intended + latency."""
        return self.intended_s + self.latency_ms / 1000.0

    def backend_names(self) -> list[str | None]:
        return [self.backends[i] if i >= 0 else None for i in self.backend.tolist()]

    def schedule_lag_ms(self) -> np.ndarray:
        """Actual send minus intended send (ms), for requests that were sent."""
        sent = self.sent
        return (self.sent_s[sent] - self.intended_s[sent]) * 1000.0

    def overhead(self) -> dict[str, Any]:
        """The generator's own cost and timing error over this run."""
        n = len(self)
        lag = self.schedule_lag_ms()
        return {
            "schedule_lag_ms": {
                k: v for k, v in latency_summary(lag).items() if k in ("p50", "p99", "p999", "max", "mean")
            },
            "not_sent": int((~self.sent).sum()),
            "peak_inflight": self.peak_inflight,
            "max_inflight": self.max_inflight,
            "cpu_s": round(self.cpu_s, 3),
            "cpu_ms_per_request": round(1000.0 * self.cpu_s / n, 4) if n else None,
            "cpu_cores": round(self.cpu_s / self.wall_s, 3) if self.wall_s > 0 else None,
        }

    def summary(self, mask: np.ndarray | None = None) -> dict[str, Any]:
        """Latency percentiles (over every request in ``mask``, failures included), counts."""
        m = np.ones(len(self), dtype=bool) if mask is None else mask
        status = self.status[m]
        n = int(m.sum())
        ok = int(((status >= 200) & (status < 300)).sum())
        kinds: Counter[str] = Counter()
        for s, e in zip(status.tolist(), self.error[m].tolist()):
            if not 200 <= s < 300:
                kinds[self.error_kinds[e] if e >= 0 else f"HTTP {s}"] += 1
        return {
            "requests": n,
            "ok": ok,
            "errors": n - ok,
            "error_rate": error_rate(n, ok),
            "latency_ms": latency_summary(self.latency_ms[m]),
            "error_kinds": dict(kinds),
        }

    # -- (de)serialisation: the CLI hands results to its parent as JSON ----------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "intended_s": np.round(self.intended_s, 6).tolist(),
            "sent_s": [None if not math.isfinite(x) else round(x, 6) for x in self.sent_s.tolist()],
            "latency_ms": np.round(self.latency_ms, 4).tolist(),
            "status": self.status.tolist(),
            "backend": self.backend.tolist(),
            "backends": self.backends,
            "error": self.error.tolist(),
            "error_kinds": self.error_kinds,
            "start_wall": self.start_wall,
            "timeout_s": self.timeout_s,
            "max_inflight": self.max_inflight,
            "url": self.url,
            "arrivals": self.arrivals,
            "rate_rps": self.rate_rps,
            "duration_s": self.duration_s,
            "seed": self.seed,
            "cpu_s": self.cpu_s,
            "wall_s": self.wall_s,
            "peak_inflight": self.peak_inflight,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OpenLoopResult:
        return cls(
            intended_s=np.asarray(d["intended_s"], dtype=np.float64),
            sent_s=np.asarray([math.nan if x is None else x for x in d["sent_s"]], dtype=np.float64),
            latency_ms=np.asarray(d["latency_ms"], dtype=np.float64),
            status=np.asarray(d["status"], dtype=np.int64),
            backend=np.asarray(d["backend"], dtype=np.int64),
            backends=list(d["backends"]),
            error=np.asarray(d["error"], dtype=np.int64),
            error_kinds=list(d["error_kinds"]),
            start_wall=float(d["start_wall"]),
            timeout_s=float(d["timeout_s"]),
            max_inflight=int(d["max_inflight"]),
            url=d.get("url", ""),
            arrivals=d.get("arrivals", ""),
            rate_rps=float(d.get("rate_rps", 0.0)),
            duration_s=float(d.get("duration_s", 0.0)),
            seed=d.get("seed"),
            cpu_s=float(d.get("cpu_s", 0.0)),
            wall_s=float(d.get("wall_s", 0.0)),
            peak_inflight=int(d.get("peak_inflight", 0)),
            extra=dict(d.get("extra") or {}),
        )


@dataclass(frozen=True)
class Request:
    """One request of a round-robin mix: ``path`` is appended to the run's URL."""

    path: str = ""
    method: str = "GET"
    json: Any = None
    headers: Mapping[str, str] | None = None


class _Recorder:
    """The per-request arrays of one run, filled in as requests finish."""

    def __init__(self, n: int, on_progress: Callable[[int], None] | None) -> None:
        self.sent = np.full(n, math.nan)
        self.latency = np.full(n, math.nan)
        self.status = np.full(n, TRANSPORT_ERROR, dtype=np.int64)
        self.backend = np.full(n, -1, dtype=np.int64)
        self.error = np.full(n, -1, dtype=np.int64)
        self.nbytes = np.zeros(n, dtype=np.int64)
        self.backend_ix: dict[str, int] = {}
        self.error_ix: dict[str, int] = {}
        self.inflight = 0
        self.peak = 0
        self.done = 0
        self.on_progress = on_progress

    def kind(self, name: str) -> int:
        return self.error_ix.setdefault(name, len(self.error_ix))

    def finished(self) -> None:
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(self.done)

    def not_sent(self, i: int, timeout_s: float) -> None:
        self.status[i] = NOT_SENT
        self.error[i] = self.kind("not_sent_max_inflight")
        self.latency[i] = timeout_s * 1000.0
        self.finished()

    async def send(self, session: aiohttp.ClientSession, i: int, url: str, req: Request, due: float, t0: float) -> None:
        loop = asyncio.get_running_loop()
        self.sent[i] = loop.time() - t0  # when this request's task actually runs: the true send
        try:
            async with session.request(req.method, url + req.path, json=req.json, headers=req.headers) as resp:
                body = await resp.read()
                self.status[i] = resp.status
                self.nbytes[i] = len(body)
                name = resp.headers.get("x-backend")
                if name:
                    self.backend[i] = self.backend_ix.setdefault(name, len(self.backend_ix))
                self.latency[i] = (loop.time() - due) * 1000.0
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.status[i] = TRANSPORT_ERROR
            self.error[i] = self.kind(type(exc).__name__)
            # A timeout counts the full wait; a refused connection its (short) real time.
            self.latency[i] = (loop.time() - due) * 1000.0
        finally:
            self.inflight -= 1
            self.finished()


def _check_run(url: str, intended: np.ndarray, max_inflight: int, timeout_s: float) -> None:
    ensure_loopback(url)
    if max_inflight < 1:
        raise BenchError(f"max_inflight must be >= 1, got {max_inflight}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise BenchError(f"timeout must be > 0 seconds, got {timeout_s}")
    if intended.ndim != 1 or (intended.size and (np.any(np.diff(intended) < 0) or intended[0] < 0)):
        raise BenchError("schedule must be a 1-D array of non-decreasing offsets >= 0")


async def run_open_loop(
    url: str,
    schedule: np.ndarray | Sequence[float],
    *,
    max_inflight: int = 1000,
    timeout_s: float = 11.0,
    start_wall: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    requests: Sequence[Request] = (Request(),),
    connections: int | None = None,
    keepalive_s: float | None = None,
) -> OpenLoopResult:
    """Send request ``i % len(requests)`` to ``url`` at each offset of ``schedule``
    (seconds after the start).

    The start is ``start_wall`` (epoch seconds; the call sleeps until then) or now. A
    request whose intended time comes while ``max_inflight`` are outstanding is not sent
    and recorded as ``NOT_SENT``. Returns when every sent request has finished (each is
    bounded by ``timeout_s``). Setting ``stop`` ends the schedule early (a fault test
    runs load until its fault has played out): the result holds only the requests that
    were due before it was set. ``connections`` bounds the connection pool (default
    ``max_inflight``); ``keepalive_s`` below the server's keep-alive means a pooled
    connection is never reused just as the server closes it (an error of the client's making).
    """
    intended = np.asarray(schedule, dtype=np.float64)
    _check_run(url, intended, max_inflight, timeout_s)
    n = int(intended.size)
    rec = _Recorder(n, on_progress)
    loop = asyncio.get_running_loop()
    now_wall = time.time()
    start_wall = now_wall if start_wall is None else float(start_wall)
    t0 = loop.time() + (start_wall - now_wall)  # the start on the loop's monotonic clock
    cpu0 = time.process_time()
    limit = max_inflight if connections is None else connections
    extra: dict[str, Any] = {} if keepalive_s is None else {"keepalive_timeout": keepalive_s}
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, force_close=False, **extra)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        i = 0
        while i < n:
            if stop is not None and stop.is_set():
                break
            wait = t0 + intended[i] - loop.time()
            if wait > 0:
                # Bounded with a ``stop``, so it is seen soon even at a low rate.
                await asyncio.sleep(wait if stop is None else min(wait, 0.1))
                continue
            # Everything due by now leaves in this pass (after a stall, a burst: that is
            # the schedule, not a choice of the generator).
            now = loop.time()
            while i < n and t0 + intended[i] <= now:
                if rec.inflight >= max_inflight:
                    rec.not_sent(i, timeout_s)
                else:
                    rec.inflight += 1
                    rec.peak = max(rec.peak, rec.inflight)
                    req = requests[i % len(requests)]
                    task = asyncio.create_task(rec.send(session, i, url, req, t0 + intended[i], t0))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
        if tasks:
            await asyncio.gather(*list(tasks))
    wall = loop.time() - t0
    cpu = time.process_time() - cpu0
    return OpenLoopResult(  # stopped early: what was never due is not part of the run
        intended_s=intended[:i],
        sent_s=rec.sent[:i],
        latency_ms=rec.latency[:i],
        status=rec.status[:i],
        backend=rec.backend[:i],
        backends=sorted(rec.backend_ix, key=rec.backend_ix.__getitem__),
        error=rec.error[:i],
        error_kinds=sorted(rec.error_ix, key=rec.error_ix.__getitem__),
        start_wall=start_wall,
        timeout_s=timeout_s,
        max_inflight=max_inflight,
        url=url,
        cpu_s=cpu,
        wall_s=wall,
        peak_inflight=rec.peak,
        nbytes=rec.nbytes[:i],
    )


def run_open_loop_sync(url: str, schedule: np.ndarray | Sequence[float], **kwargs: Any) -> OpenLoopResult:
    return asyncio.run(run_open_loop(url, schedule, **kwargs))


# -- CLI: the generator in its own process -------------------------------------------------


def cli_argv(
    url: str,
    rate_rps: float,
    duration_s: float,
    out: Path,
    *,
    arrivals: str,
    seed: int | None = None,
    max_inflight: int | None = None,
    timeout_s: float | None = None,
    start_at: str | None = None,
) -> list[str]:
    """The command line that runs this generator as a child process (options left out: defaults)."""
    argv = [sys.executable, "-m", "balanceiq_lab.openloop", "--url", url, "--rate", f"{rate_rps:g}"]
    argv += ["--duration", f"{duration_s:g}", "--arrivals", arrivals]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if max_inflight is not None:
        argv += ["--max-inflight", str(max_inflight)]
    if timeout_s is not None:
        argv += ["--timeout", f"{timeout_s:g}"]
    if start_at is not None:
        argv += ["--start-at", start_at]
    return argv + ["--out", str(out)]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m balanceiq_lab.openloop", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="Target (loopback only).")
    p.add_argument("--rate", type=float, required=True, help="Mean arrivals per second.")
    p.add_argument("--duration", type=float, required=True, help="Seconds of arrivals.")
    p.add_argument("--arrivals", choices=ARRIVALS, default="poisson")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-inflight", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=11.0, help="Per-request timeout (s).")
    p.add_argument(
        "--start-at",
        default=None,
        help="Epoch seconds of the schedule's t=0 (default: now); '-': read it from stdin after 'ready'.",
    )
    p.add_argument("--out", type=Path, required=True, help="Write the result JSON here.")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one schedule; 0 on success, 2 on bad input. Prints ``ready`` before waiting."""
    args = _parse_args(argv)
    try:
        ensure_loopback(args.url)
        schedule = arrival_schedule(args.rate, args.duration, arrivals=args.arrivals, seed=args.seed)
        print("ready", flush=True)
        start = args.start_at
        if start == "-":
            start = sys.stdin.readline().strip()
        try:
            start_wall = None if start is None else float(start)
        except ValueError:
            raise BenchError(f"--start-at must be epoch seconds or '-', got {start!r}") from None
        res = run_open_loop_sync(
            args.url, schedule, max_inflight=args.max_inflight, timeout_s=args.timeout, start_wall=start_wall
        )
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    res.arrivals, res.rate_rps, res.duration_s, res.seed = args.arrivals, args.rate, args.duration, args.seed
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(res.to_json()))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
