"""Fallback telemetry when Prometheus cannot answer: rates from two scrapes of Envoy's admin
(:func:`derive`), latency from the ALS exporter's ``/snapshot``; parsing in :mod:`.scrape`."""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import httpx

from balanceiq.exceptions import EnvoyAdminError
from balanceiq.telemetry import jsonbody
from balanceiq.telemetry.observation import (
    INVALID,
    MISSING,
    NAN,
    NO_LATENCY_SOURCE,
    NO_TRAFFIC,
    WARMING,
    EndpointObservation,
    Observation,
    finite_or_nan,
    quantile_from_buckets,
)
from balanceiq.telemetry.scrape import (
    ENVOY_FIELDS,
    Buckets,
    EndpointStats,
    Key,
    Scrape,
    as_float,
    clip,
    parse_als_snapshot,
    parse_clusters_json,
    parse_exposition,
)

COUNTERS = ("rq_total", "rq_success", "rq_error")  # rates come from these (a timeout is a 504: in rq_error)
# An older baseline would average over a period the controller no longer cares about.
MAX_BASELINE_AGE_S = 60.0
MAX_BODY_BYTES = 32 * 1024 * 1024  # far above any real admin page; bounds a runaway answer
MAX_REPORTED_PROBLEMS = 10


def _value(stats: EndpointStats, name: str) -> float:
    # Scrapes built by hand (tests, other callers) bypass parse_exposition's checks.
    return finite_or_nan(getattr(stats, name))[0]


def _bad_fields(stats: EndpointStats) -> set[str]:
    """Fields rejected at parse time, plus any a hand-built scrape holds that are not valid."""
    bad = set(stats.bad)
    for f in ENVOY_FIELDS.values():
        try:
            x = float(getattr(stats, f))
        except (TypeError, ValueError):
            bad.add(f)
            continue
        if not math.isnan(x) and not finite_or_nan(x)[1]:
            bad.add(f)
    h = as_float(stats.healthy)
    if not math.isnan(h) and h not in (0.0, 1.0):
        bad.add("healthy")
    return bad


def _bucket_delta(prev: Buckets, cur: Buckets) -> Buckets | None:
    """Per-bucket increase, or None if the histogram was reset or its layout changed."""
    before = dict(prev)
    if prev and any(le not in before for le, _ in cur):
        return None
    delta = tuple((le, c - before.get(le, 0.0)) for le, c in cur)
    return delta if all(math.isfinite(d) and d >= 0 for _, d in delta) else None


def derive(
    prev: Scrape | None,
    cur: Scrape,
    cluster: str,
    addresses: Sequence[str],
    costs: Mapping[str, float],
    weights: Mapping[str, float] | None = None,
    *,
    now: float | None = None,
) -> Observation:
    """Rates and quantiles between two scrapes, one row per address, in order; never raises.
    ``now`` (the scrapes' clock) sets ``age_s``; without it age is 0."""
    dt = cur.timestamp - prev.timestamp if prev is not None else NAN
    rates_ok = prev is not None and math.isfinite(dt) and dt > 0
    age = now - cur.timestamp if now is not None else 0.0
    age = age if math.isfinite(age) and age > 0 else 0.0
    base = prev if rates_ok else None
    rows = []
    for a in addresses:
        weight = as_float(weights.get(a, NAN)) if weights is not None else NAN
        row = EndpointObservation(a, cost_per_million=as_float(costs.get(a, NAN)), weight=weight, age_s=age)
        rows.append(_derive_one(base, cur, (cluster, a), dt, row))
    errors = [f"envoy-admin: {p}" for p in cur.problems[:MAX_REPORTED_PROBLEMS]]
    if len(cur.problems) > MAX_REPORTED_PROBLEMS:
        errors.append(f"envoy-admin: and {len(cur.problems) - MAX_REPORTED_PROBLEMS} more problem(s)")
    return Observation(cluster, tuple(rows), "envoy-admin", window_s=dt if rates_ok else NAN, errors=tuple(errors))


def _derive_one(prev: Scrape | None, cur: Scrape, key: Key, dt: float, row: EndpointObservation) -> EndpointObservation:
    flags: set[str] = set() if cur.latency_source else {NO_LATENCY_SOURCE}
    c = cur.endpoints.get(key)
    if c is None:
        return replace(row, flags=frozenset(flags | {MISSING}))
    bad = _bad_fields(c)
    if bad:
        flags.add(INVALID)
    if any(math.isnan(_value(c, f)) and f not in bad for f in ("rq_total", "rq_error")):
        flags.add(MISSING)  # the endpoint is there, but not the series rates come from
    inflight = _value(c, "rq_active")
    healthy = None if "healthy" in bad or math.isnan(as_float(c.healthy)) else as_float(c.healthy) == 1.0

    rps = error_rate = p50 = p95 = NAN
    p = prev.endpoints.get(key) if prev is not None else None
    if prev is None or p is None:
        flags.add(WARMING)
    else:
        if _bad_fields(p) & set(COUNTERS):
            flags.add(INVALID)
        d = {f: _value(c, f) - _value(p, f) for f in COUNTERS}
        if math.isnan(d["rq_total"]) or math.isnan(d["rq_error"]):
            if not flags & {INVALID, MISSING}:
                flags.add(WARMING)  # the series just appeared: no baseline for it yet
        elif any(v < 0 for v in d.values()):
            # A counter went backwards: Envoy restarted, or the host was removed and
            # re-added (per-endpoint stats live with the host object).
            flags.add(WARMING)
        else:
            rps = d["rq_total"] / dt
            # Outcomes, not rq_total: connection failures reach rq_error but never
            # rq_total, and rq_total also counts requests still in flight at the edge.
            if math.isnan(d["rq_success"]):
                done = max(d["rq_total"], d["rq_error"])
            else:
                done = d["rq_success"] + d["rq_error"]
            if done <= 0:
                flags.add(NO_TRAFFIC)  # nothing completed: error rate and latency unknown
            else:
                p50, p95, lat_flag = _latency(prev, cur, key)
                if lat_flag:
                    flags.add(lat_flag)
                # A warming row is not a measurement: its error rate stays unknown too.
                if lat_flag != WARMING:
                    error_rate = min(1.0, d["rq_error"] / done)
    return replace(
        row,
        p50_ms=p50,
        p95_ms=p95,
        error_rate=error_rate,
        inflight=inflight,
        rps=rps,
        healthy=healthy,
        flags=frozenset(flags),
    )


def _latency(prev: Scrape, cur: Scrape, key: Key) -> tuple[float, float, str | None]:
    """``(p50_ms, p95_ms, flag or None)`` from the increase of the ALS histogram."""
    if not cur.latency_source:
        return NAN, NAN, None  # NO_LATENCY_SOURCE is already on the row
    if key in cur.bad_latency or key in prev.bad_latency:
        return NAN, NAN, INVALID
    cb = cur.latency.get(key)
    if cb is None:
        return NAN, NAN, None  # the exporter has seen no request for this endpoint yet
    if not prev.latency_source:
        return NAN, NAN, WARMING  # the exporter just came (back): no baseline
    # The exporter was up and had no series for this endpoint: it had counted nothing.
    delta = _bucket_delta(prev.latency.get(key, ()), cb)
    if delta is None:
        return NAN, NAN, WARMING  # exporter restarted, or changed its buckets
    return quantile_from_buckets(delta, 0.5) * 1000.0, quantile_from_buckets(delta, 0.95) * 1000.0, None


def _check_url(url: str, what: str) -> str:
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise EnvoyAdminError(f"{what} URL {url!r} is invalid: {exc}") from exc
    if u.scheme not in ("http", "https") or not u.host:
        raise EnvoyAdminError(f"{what} URL {url!r} must be http(s)://host[:port]")
    return str(u).rstrip("/")


_TEXT_TYPES = ("text/plain", "application/openmetrics-text")
_JSON = ("application/json",)


def _close_quietly(client: httpx.Client, pool: ThreadPoolExecutor) -> None:
    client.close()
    pool.shutdown(wait=False)


def _json_loads(body: str, what: str = "ALS snapshot") -> object:
    try:
        return jsonbody.loads(body)
    except (ValueError, RecursionError) as exc:
        raise EnvoyAdminError(f"{what} is not JSON: {clip(str(exc))}") from exc


def _says(exc: Exception, *markers: str) -> bool:
    return any(m in str(exc) for m in markers)


class EnvoyAdminSource:
    """Reads Envoy's admin stats (and the ALS exporter) into Observations; only ever sends GETs.
    Thread-safe: one lock guards the kept scrapes, so observers of one cluster never interleave windows."""

    def __init__(self, admin_url: str, als_metrics_url: str | None = None, timeout_s: float = 1.0) -> None:
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
            raise EnvoyAdminError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        self.admin_url = _check_url(admin_url, "Envoy admin")
        # Only per-endpoint stats, so Envoy renders and we parse less (a regex on dotted names).
        self.stats_url = f"{self.admin_url}/stats/prometheus?filter=%5Ecluster%5C..%2B%5C.endpoint%5C."
        # The same numbers as JSON, far cheaper to parse; an admin without it is read as text.
        self.clusters_url: str | None = f"{self.admin_url}/clusters?format=json"
        # The exporter's compact JSON beside its /metrics (for Prometheus), which we never parse.
        self.als_snapshot_url = (
            _check_url(als_metrics_url, "ALS metrics").removesuffix("/metrics") + "/snapshot"
            if als_metrics_url
            else None
        )
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="als-scrape")
        # One client for every scrape (no new SSL context and connections each time). No
        # proxies from the environment: a proxy answering for the admin port would be read
        # as Envoy's numbers.
        self._client = httpx.Client(timeout=self.timeout_s, follow_redirects=False, trust_env=False)
        self._finalizer = weakref.finalize(self, _close_quietly, self._client, self._pool)
        # Per cluster, so observing cluster A then B does not hand B a window of milliseconds.
        self._baseline: dict[str, Scrape] = {}

    def close(self) -> None:
        self._finalizer()

    def _get(self, url: str, types: tuple[str, ...] = ()) -> str:
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise EnvoyAdminError(f"GET {url}: HTTP {r.status_code} {r.reason_phrase}".rstrip())
                ctype = r.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if ctype and not ctype.startswith(types or _TEXT_TYPES):
                    wanted = "JSON" if types else "the Prometheus text format"
                    raise EnvoyAdminError(f"GET {url}: content-type {ctype!r}, not {wanted}")
                body = bytearray()
                # httpx's timeout is per read: a peer trickling bytes must not outlast our budget.
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise EnvoyAdminError(f"GET {url}: answer larger than {MAX_BODY_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise EnvoyAdminError(f"GET {url}: timed out after {self.timeout_s:g}s reading the answer")
                return body.decode(r.encoding or "utf-8", errors="replace")
        except httpx.TimeoutException as exc:
            raise EnvoyAdminError(f"GET {url}: timed out after {self.timeout_s:g}s ({type(exc).__name__})") from exc
        except httpx.ConnectError as exc:
            raise EnvoyAdminError(f"GET {url}: cannot connect: {exc}") from exc
        except (httpx.HTTPError, httpx.InvalidURL, LookupError) as exc:  # LookupError: an unknown charset
            raise EnvoyAdminError(f"GET {url}: {type(exc).__name__}: {exc}") from exc

    def _read_envoy(self) -> Scrape:
        """The JSON page if Envoy serves it, else the text stats; timestamped mid-request."""
        t0 = time.monotonic()
        if self.clusters_url is not None:
            try:
                body = self._get(self.clusters_url, _JSON)
                ts = (t0 + time.monotonic()) / 2
                return parse_clusters_json(_json_loads(body, "Envoy /clusters"), ts)
            except EnvoyAdminError as exc:
                if not _says(exc, "content-type", "not JSON", "cluster_statuses", "HTTP 404"):
                    raise
                self.clusters_url = None  # not JSON here: the text stats from now on
                t0 = time.monotonic()
        text = self._get(self.stats_url)
        # The counters were read somewhere during the request: the midpoint halves the error.
        try:
            return parse_exposition(text, (t0 + time.monotonic()) / 2)
        except EnvoyAdminError as exc:
            raise EnvoyAdminError(f"GET {self.stats_url}: {exc}") from exc

    def _read_als(self, als: Future[str], ts: float) -> Scrape:
        """The ALS exporter's latency, or only the problem reading it."""
        try:
            latency, bad, problems = parse_als_snapshot(_json_loads(als.result()))
        except EnvoyAdminError as exc:
            return Scrape(ts, problems=(f"als: {exc}",))
        return Scrape(ts, latency=latency, latency_source=True, bad_latency=bad, problems=problems)

    def scrape(self) -> Scrape:
        """One read of the admin page (and the ALS page, whose failure is only a problem)."""
        # Both pages at once: the ALS exporter renders thousands of bucket lines.
        als = self._pool.submit(self._get, self.als_snapshot_url, _JSON) if self.als_snapshot_url else None
        s = self._read_envoy()
        if als is None:
            return s
        lat = self._read_als(als, s.timestamp)
        return replace(
            s,
            latency=lat.latency,
            latency_source=lat.latency_source,
            bad_latency=lat.bad_latency,
            problems=(*s.problems, *lat.problems),
        )

    def observe(
        self,
        cluster: str,
        addresses: Sequence[str],
        costs: Mapping[str, float],
        weights: Mapping[str, float] | None = None,
        min_window_s: float = 0.25,
    ) -> Observation:
        """Rates since this cluster's previous observation (at least ``min_window_s``). Without a usable
        previous scrape it takes two, so even the first has real rates. Raises :class:`EnvoyAdminError`."""
        min_window_s = max(0.0, float(min_window_s))
        with self._lock:
            prev = self._baseline.get(cluster)
            if prev is None or time.monotonic() - prev.timestamp > MAX_BASELINE_AGE_S:
                prev = self._baseline[cluster] = self.scrape()
            wait = prev.timestamp + min_window_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            cur = self._baseline[cluster] = self.scrape()
        return derive(prev, cur, cluster, addresses, costs, weights, now=time.monotonic())
