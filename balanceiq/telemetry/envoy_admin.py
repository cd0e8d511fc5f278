"""Fallback telemetry when Prometheus cannot answer: rates from two scrapes of Envoy's admin, latency
from the ALS exporter's ``/snapshot``; parsing and :func:`~.scrape.derive` in :mod:`.scrape`."""

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
from balanceiq.telemetry.observation import Observation
from balanceiq.telemetry.scrape import Scrape, clip, derive, parse_als_snapshot, parse_clusters_json, parse_exposition

# An older baseline would average over a period the controller no longer cares about.
MAX_BASELINE_AGE_S = 60.0
MAX_BODY_BYTES = 32 * 1024 * 1024  # far above any real admin page; bounds a runaway answer


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
        self.als_snapshot_url: str | None = None
        if als_metrics_url:
            self.als_snapshot_url = _check_url(als_metrics_url, "ALS metrics").removesuffix("/metrics") + "/snapshot"
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="als-scrape")
        # One client for every scrape (no new SSL context and connections each time); no proxies
        # from the environment: a proxy answering for the admin port would be read as Envoy's numbers.
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
                if not any(m in str(exc) for m in ("content-type", "not JSON", "cluster_statuses", "HTTP 404")):
                    raise
                self.clusters_url = None  # not JSON here: the text stats from now on
                t0 = time.monotonic()
        text = self._get(self.stats_url)
        # The counters were read somewhere during the request: the midpoint halves the error.
        try:
            return parse_exposition(text, (t0 + time.monotonic()) / 2)
        except EnvoyAdminError as exc:
            raise EnvoyAdminError(f"GET {self.stats_url}: {exc}") from exc

    def _with_als(self, s: Scrape, als: Future[str]) -> Scrape:
        """``s`` with the ALS exporter's latency, or only the problem reading it."""
        try:
            latency, bad, problems = parse_als_snapshot(_json_loads(als.result()))
        except EnvoyAdminError as exc:
            return replace(s, problems=(*s.problems, f"als: {exc}"))
        return replace(s, latency=latency, latency_source=True, bad_latency=bad, problems=(*s.problems, *problems))

    def scrape(self) -> Scrape:
        """One read of the admin page (and the ALS page, whose failure is only a problem)."""
        # Both pages at once: the ALS exporter renders thousands of bucket lines.
        als = self._pool.submit(self._get, self.als_snapshot_url, _JSON) if self.als_snapshot_url else None
        s = self._read_envoy()
        return s if als is None else self._with_als(s, als)

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
        with self._lock:
            prev = self._baseline.get(cluster)
            if prev is None or time.monotonic() - prev.timestamp > MAX_BASELINE_AGE_S:
                prev = self._baseline[cluster] = self.scrape()
            time.sleep(max(0.0, prev.timestamp + min_window_s - time.monotonic()))
            cur = self._baseline[cluster] = self.scrape()
        return derive(prev, cur, cluster, addresses, costs, weights, now=time.monotonic())
