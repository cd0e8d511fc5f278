"""Sample HTTP backend for the local testbed.

Each :class:`Backend` stands in for one service endpoint in one "cloud": it answers after
a configurable latency, enforces a concurrency limit with a real wait queue (so latency
rises under load the way a saturated service's does), injects errors and tail-latency
brownouts, exports Prometheus metrics and, optionally, ORCA load reports for Envoy.
Everything can be changed at run time through ``POST /control``.

Several backends usually share one process and one event loop (``--spec``), so each has
its own :class:`prometheus_client.CollectorRegistry` and nothing is global.

CLI::

    python -m balanceiq_lab.testbed.backend --name b1 --port 18001 --cloud aws \\
        --region us-east-1 --latency-ms 20 --concurrency 8 [--error-rate 0] [--cost 0.4] [--sigma 0.5] [--orca]
    python -m balanceiq_lab.testbed.backend --spec '[{"name": "b1", "port": 18001, ...}, ...]'

It prints ``ready <url>`` once per backend when listening and exits 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import random
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from balanceiq.exceptions import ConfigError
from balanceiq_lab.errors import BackendError

__all__ = [
    "CONTROL_FIELDS",
    "DURATION_BUCKETS",
    "ORCA_HEADER",
    "Backend",
    "BackendSettings",
    "main",
    "mean_service_ms",
    "run_backends",
    "true_capacity_rps",
]

ORCA_HEADER = "endpoint-load-metrics"

# Fine enough to tell 5–500 ms latencies apart within ~10 ms, which is what the
# controller's p95 estimates and the tests need.
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.06,
    0.075,
    0.1,
    0.125,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)

# How long stop() lets in-flight requests finish before cancelling them; a testbed
# backend holds no state worth waiting for.
_SHUTDOWN_TIMEOUT_S = 1.0


def _is_number(value: Any) -> bool:
    # bool is an int subclass; `true` is never a meaningful latency.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_non_negative(value: Any) -> str | None:
    if not _is_number(value) or not math.isfinite(value):
        return "must be a finite number"
    if value < 0:
        return "must be >= 0"
    return None


def _check_fraction(value: Any) -> str | None:
    if not _is_number(value) or not math.isfinite(value):
        return "must be a finite number"
    if not 0.0 <= value <= 1.0:
        return "must be between 0 and 1"
    return None


def _check_concurrency(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return "must be an integer"
    if value < 1:
        return "must be >= 1"
    return None


def _check_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


SIGMA_MAX = 3.0


def _check_sigma(value: Any) -> str | None:
    if not _is_number(value) or not math.isfinite(value):
        return "must be a finite number"
    if not 0.0 <= value <= SIGMA_MAX:
        return f"must be between 0 and {SIGMA_MAX:g}"
    return None


# Fields POST /control may change, with their validators. name/host/port/cloud/region
# identify the backend and are fixed for its lifetime.
CONTROL_FIELDS: dict[str, Any] = {
    "base_latency_ms": _check_non_negative,
    "jitter_ms": _check_non_negative,
    "extra_latency_ms": _check_non_negative,
    "concurrency": _check_concurrency,
    "error_rate": _check_fraction,
    "cost_per_million_requests": _check_non_negative,
    "orca": _check_bool,
    "tail_prob": _check_fraction,
    "tail_ms": _check_non_negative,
    "sigma": _check_sigma,
    "healthy": _check_bool,
}


def _check_str(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _check_port(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        return "must be an integer port in 0..65535 (0 picks a free one)"
    return None


def _check_seed(value: Any) -> str | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return None
    return "must be an integer or null"


_SETTINGS_CHECKS: dict[str, Any] = {
    "name": _check_str,
    "host": _check_str,
    "port": _check_port,
    "cloud": _check_str,
    "region": _check_str,
    "seed": _check_seed,
    **{k: v for k, v in CONTROL_FIELDS.items() if k != "healthy"},
}


@dataclass(kw_only=True)
class BackendSettings:
    """How one sample backend behaves. Mutable: ``POST /control`` edits it live.

    Latency of a request is ``(base_latency_ms + extra_latency_ms) * exp(sigma * N(0, 1))``
    (lognormal with median ``base + extra``; ``sigma`` 0, the default, is a fixed delay)
    ``+ U(0, jitter_ms)``, plus ``tail_ms`` with probability ``tail_prob``, plus however
    long it waited for one of the ``concurrency`` slots. :func:`mean_service_ms` is the
    mean slot hold, so ``concurrency / mean`` is the true capacity.
    """

    name: str
    host: str = "127.0.0.1"
    port: int
    cloud: str
    region: str
    base_latency_ms: float
    jitter_ms: float = 1.0
    concurrency: int
    error_rate: float = 0.0
    cost_per_million_requests: float = 0.0
    extra_latency_ms: float = 0.0
    orca: bool = False
    tail_prob: float = 0.0
    tail_ms: float = 0.0
    sigma: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = [
            (key, msg) for key, check in _SETTINGS_CHECKS.items() if (msg := check(getattr(self, key))) is not None
        ]
        if problems:
            raise ConfigError(problems, source=f"backend {self.name!r}")

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> BackendSettings:
        """Build settings from a JSON-like dict, reporting every problem at once."""
        if not isinstance(data, dict):
            raise ConfigError([("", "backend settings must be a JSON object")], source)
        known = {f.name for f in dataclasses.fields(cls)}
        problems = [(str(k), "unknown field") for k in data if k not in known]
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        problems += [(k, "is required") for k in required if k not in data]
        if problems:
            raise ConfigError(problems, source)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(exc.problems, source or exc.source) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def mean_service_ms(
    base_latency_ms: float,
    *,
    extra_latency_ms: float = 0.0,
    sigma: float = 0.0,
    jitter_ms: float = 1.0,
    tail_prob: float = 0.0,
    tail_ms: float = 0.0,
) -> float:
    """Mean time a request holds a concurrency slot (ms), queueing excluded:
    ``(base + extra) * exp(sigma**2 / 2) + jitter / 2 + tail_prob * tail_ms``."""
    return (base_latency_ms + extra_latency_ms) * math.exp(sigma * sigma / 2.0) + jitter_ms / 2.0 + tail_prob * tail_ms


def true_capacity_rps(concurrency: int, mean_ms: float) -> float:
    """Requests per second a backend sustains: ``concurrency / mean slot hold``."""
    return concurrency / (mean_ms / 1000.0) if mean_ms > 0 else math.inf


class _Limiter:
    """A FIFO concurrency limiter whose limit can change while requests wait.

    asyncio.Semaphore cannot be resized, and swapping in a new one would strand the
    requests already queued on the old one; here raising the limit admits waiters at
    once and lowering it only holds back new admissions (in-flight work finishes).
    """

    __slots__ = ("_waiters", "inflight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.inflight < self.limit and not self._waiters:
            self.inflight += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The slot was handed over just before the cancel landed; pass it on.
                self.release()
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.inflight -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        # The slot is transferred to the waiter here (inflight counted now), so a
        # newcomer cannot overtake a request that has queued longer.
        while self._waiters and self.inflight < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self.inflight += 1


class _RateMeter:
    """Requests per second over the last second, O(1) per request.

    Sliding-window approximation: the previous whole second's count weighted by how
    much of it still lies inside the window, plus the current second's count.
    """

    __slots__ = ("_current", "_previous", "_second")

    def __init__(self) -> None:
        self._second = 0
        self._current = 0
        self._previous = 0

    def _roll(self, now: float) -> None:
        second = int(now)
        if second != self._second:
            self._previous = self._current if second == self._second + 1 else 0
            self._current = 0
            self._second = second

    def mark(self, now: float) -> None:
        self._roll(now)
        self._current += 1

    def rate(self, now: float) -> float:
        self._roll(now)
        return self._previous * (1.0 - (now - self._second)) + self._current


class Backend:
    """One sample backend: an aiohttp app with its own metrics registry."""

    def __init__(self, settings: BackendSettings) -> None:
        # A private copy: the caller's object must not change under it via /control.
        self.settings = dataclasses.replace(settings)
        self.healthy = True
        self._rng = random.Random(settings.seed)
        self._limiter = _Limiter(settings.concurrency)
        self._rate = _RateMeter()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._body = b""
        self._init_metrics()
        self.app = self._make_app()

    # -- metrics ---------------------------------------------------------------------

    def _init_metrics(self) -> None:
        s = self.settings
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._duration = Histogram(
            "backend_request_duration_seconds",
            "Time from request arrival to response, including time queued for a slot.",
            ["backend", "code"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._requests = Counter("backend_requests", "Requests answered.", ["backend", "code"], registry=r)
        # Gauges read live state when scraped, so the request path never updates them.
        Gauge(
            "backend_inflight_requests",
            "Requests holding a concurrency slot.",
            ["backend"],
            registry=r,
        ).labels(s.name).set_function(lambda: self._limiter.inflight)
        Gauge(
            "backend_queue_depth",
            "Requests waiting for a concurrency slot.",
            ["backend"],
            registry=r,
        ).labels(s.name).set_function(lambda: self._limiter.queued)
        Gauge(
            "backend_concurrency_limit",
            "Concurrency slots.",
            ["backend"],
            registry=r,
        ).labels(s.name).set_function(lambda: self._limiter.limit)
        Gauge(
            "backend_cost_per_million_requests",
            "Price of one million requests on this backend.",
            ["backend"],
            registry=r,
        ).labels(s.name).set_function(lambda: self.settings.cost_per_million_requests)
        Gauge(
            "backend_info",
            "Where this backend runs; always 1.",
            ["backend", "cloud", "region"],
            registry=r,
        ).labels(s.name, s.cloud, s.region).set(1)
        # Label lookups cost a lock and a dict probe; these are the only two codes.
        self._observe = {
            code: (
                self._duration.labels(s.name, str(code)).observe,
                self._requests.labels(s.name, str(code)).inc,
            )
            for code in (200, 503)
        }

    # -- app ---------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/control", self._handle_control_get)
        app.router.add_post("/control", self._handle_control_post)
        # Registered last so the fixed paths above win.
        app.router.add_route("*", "/{tail:.*}", self._handle_request)
        return app

    def _render_body(self) -> None:
        s = self.settings
        self._body = json.dumps({"backend": s.name, "cloud": s.cloud, "region": s.region, "port": self.port}).encode()

    async def _handle_request(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._rate.mark(started)
        limiter = self._limiter
        await limiter.acquire()
        try:
            s = self.settings
            rng = self._rng
            delay_ms = s.base_latency_ms + s.extra_latency_ms
            if s.sigma > 0:
                delay_ms *= rng.lognormvariate(0.0, s.sigma)
            if s.jitter_ms > 0:
                delay_ms += rng.uniform(0.0, s.jitter_ms)
            if s.tail_prob > 0 and rng.random() < s.tail_prob:
                delay_ms += s.tail_ms
            failed = s.error_rate > 0 and rng.random() < s.error_rate
            if delay_ms > 0:
                await asyncio.sleep(delay_ms / 1000.0)
            headers = {"x-backend": s.name}
            if s.orca:
                # Read while still holding the slot so the report counts this request.
                headers[ORCA_HEADER] = self._orca_value(loop.time())
        finally:
            limiter.release()
        code = 503 if failed else 200
        observe, inc = self._observe[code]
        observe(loop.time() - started)
        inc()
        if failed:
            return web.Response(
                status=503,
                body=b'{"error": "injected failure"}',
                content_type="application/json",
                headers=headers,
            )
        return web.Response(body=self._body, content_type="application/json", headers=headers)

    def _orca_value(self, now: float) -> str:
        util = min(1.0, self._limiter.inflight / self._limiter.limit)
        rps = self._rate.rate(now)
        # Envoy's native-HTTP ORCA parser (source/common/orca/orca_parser.cc) splits each
        # comma-separated entry on ':'; an '=' separator is rejected as an empty value.
        return f"TEXT cpu_utilization:{util:.4f},rps_fractional:{rps:.3f},application_utilization:{util:.4f}"

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        if self.healthy:
            return web.Response(text="ok")
        return web.Response(status=503, text="unhealthy")

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def control_state(self) -> dict[str, Any]:
        """What GET /control answers: the settings plus the health flag."""
        state = self.settings.to_dict()
        state["port"] = self.port
        state["healthy"] = self.healthy
        return state

    async def _handle_control_get(self, request: web.Request) -> web.Response:
        return web.json_response(self.control_state())

    async def _handle_control_post(self, request: web.Request) -> web.Response:
        try:
            update = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            return _bad_request("", f"body is not valid JSON: {exc}")
        if not isinstance(update, dict):
            return _bad_request("", "body must be a JSON object")
        problems = []
        for key, value in update.items():
            check = CONTROL_FIELDS.get(key)
            if check is None:
                problems.append((key, "unknown or read-only field"))
            elif (msg := check(value)) is not None:
                problems.append((key, msg))
        if problems:
            return _bad_request(*problems[0], problems=problems)
        self.apply(update)
        return web.json_response(self.control_state())

    def apply(self, update: dict[str, Any]) -> None:
        """Apply an already-validated control update."""
        for key, value in update.items():
            if key == "healthy":
                self.healthy = value
            else:
                setattr(self.settings, key, value)
        if "concurrency" in update:
            self._limiter.resize(update["concurrency"])

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port once started (resolves port 0), else the configured one."""
        return self._port if self._port is not None else self.settings.port

    @property
    def url(self) -> str:
        host = self.settings.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def started(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Bind and serve. Raises BackendError if the address cannot be bound."""
        if self._runner is not None:
            raise BackendError(f"backend {self.settings.name!r} is already started")
        s = self.settings
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        # A deep backlog so bursts from a load generator queue in the kernel, not RST.
        site = web.TCPSite(runner, s.host, s.port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise BackendError(f"backend {s.name!r} cannot listen on {s.host}:{s.port}: {exc.strerror or exc}") from exc
        self._runner = runner
        self._port = runner.addresses[0][1]
        self.settings.port = self._port
        self._render_body()

    async def stop(self) -> None:
        """Stop serving; requests still running get a short grace period. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Backend:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _bad_request(field: str, message: str, problems: list[tuple[str, str]] | None = None) -> web.Response:
    problems = problems or [(field, message)]
    return web.json_response(
        {
            "error": f"{field}: {message}" if field else message,
            "field": field,
            "problems": [{"field": f, "message": m} for f, m in problems],
        },
        status=400,
    )


async def run_backends(settings_list: Sequence[BackendSettings]) -> list[Backend]:
    """Start one backend per settings in the running loop; all or none are left running."""
    backends: list[Backend] = []
    try:
        for settings in settings_list:
            backend = Backend(settings)
            await backend.start()
            backends.append(backend)
    except BaseException:
        for backend in reversed(backends):
            await backend.stop()
        raise
    return backends


# -- CLI -----------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m balanceiq_lab.testbed.backend",
        description="Run sample testbed backends until SIGTERM/SIGINT.",
    )
    p.add_argument(
        "--spec",
        help="JSON list of backend settings objects (or @path to a file holding it); "
        "replaces the single-backend options",
    )
    p.add_argument("--name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--cloud")
    p.add_argument("--region")
    p.add_argument("--latency-ms", type=float, dest="base_latency_ms")
    p.add_argument("--jitter-ms", type=float, default=1.0)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--cost", type=float, default=0.0, dest="cost_per_million_requests")
    p.add_argument("--tail-prob", type=float, default=0.0)
    p.add_argument("--tail-ms", type=float, default=0.0)
    p.add_argument("--sigma", type=float, default=0.0, help="lognormal spread of the service time (0..3)")
    p.add_argument("--orca", action="store_true")
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    if args.spec is None:
        required = ("name", "port", "cloud", "region", "base_latency_ms", "concurrency")
        missing = [k for k in required if getattr(args, k) is None]
        if missing:
            flags = {"base_latency_ms": "latency-ms"}
            p.error("without --spec these are required: " + ", ".join("--" + flags.get(k, k) for k in missing))
    return args


def _settings_from_args(args: argparse.Namespace) -> list[BackendSettings]:
    if args.spec is not None:
        text = args.spec
        source = "--spec"
        if text.startswith("@"):
            source = text[1:]
            try:
                with open(source, encoding="utf-8") as fh:
                    text = fh.read()
            except OSError as exc:
                raise ConfigError([("", f"cannot read: {exc}")], source) from exc
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise ConfigError([("", f"not valid JSON: {exc}")], source) from exc
        if isinstance(spec, dict):
            spec = [spec]
        if not isinstance(spec, list) or not spec:
            raise ConfigError([("", "must be a non-empty list of backend objects")], source)
        return [BackendSettings.from_dict(item, source=f"{source}[{i}]") for i, item in enumerate(spec)]
    keys = (
        "name",
        "host",
        "port",
        "cloud",
        "region",
        "base_latency_ms",
        "jitter_ms",
        "concurrency",
        "error_rate",
        "cost_per_million_requests",
        "tail_prob",
        "tail_ms",
        "sigma",
        "orca",
        "seed",
    )
    return [BackendSettings(**{k: getattr(args, k) for k in keys})]


async def _serve(settings_list: list[BackendSettings]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        backends = await run_backends(settings_list)
        try:
            for backend in backends:
                print(f"ready {backend.url}", flush=True)
            await stop.wait()
        finally:
            for backend in backends:
                await backend.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry. Returns 0 after a clean signal-triggered shutdown, 2 on bad input/bind."""
    args = _parse_args(argv)
    try:
        settings_list = _settings_from_args(args)
        asyncio.run(_serve(settings_list))
    except (BackendError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
