"""Fallback telemetry: Envoy's admin ``/stats/prometheus`` read directly.

When Prometheus is unreachable or answers garbage, the controller still needs numbers.
Envoy itself keeps per-endpoint counters (with ``per_endpoint_stats`` on); two scrapes a
moment apart give rates. Per-endpoint latency is not among Envoy's per-endpoint stats, so
it comes, when configured, from the ALS exporter's ``balanceiq_upstream_rq_time_seconds``
histogram on its own ``/metrics``.

Three layers, so the arithmetic is testable without a network:

* :func:`parse_exposition` — text to an immutable :class:`Scrape` (pure);
* :func:`derive` — two scrapes to an :class:`~balanceiq.telemetry.observation.Observation`
  (pure);
* :class:`EnvoyAdminSource` — HTTP GETs, and the previous scrape kept between calls.

What Envoy 1.40's exposition looks like, and what this module relies on:

* per-endpoint series carry ``envoy_cluster_name`` and ``envoy_endpoint_address``
  ("127.0.0.1:18001"); every counter is declared ``# TYPE ... counter`` but only some
  names end in ``_total`` (``envoy_cluster_endpoint_rq_total`` does,
  ``envoy_cluster_endpoint_rq_error`` does not). prometheus_client's parser then renames
  the samples of the latter to ``..._rq_error_total`` and strips ``_total`` from the
  family name of the former, so matching is done on sample names with one ``_total``
  suffix removed: the same key whichever way a parser version treats it;
* ``rq_total`` is counted when a request is attached to an upstream connection, but
  ``rq_error`` when a response (or failure) is charged — including connection failures,
  which never reach ``rq_total``. An endpoint that refuses every connection shows
  ``rq_total`` flat and ``rq_error`` rising. Error rate is therefore taken over completed
  outcomes (``rq_success + rq_error``), never over ``rq_total``;
* ``rq_timeout`` is *not* added to errors: Envoy charges a timed-out request as a 504,
  which already increments ``rq_error``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TypedDict

import httpx
from prometheus_client.parser import text_string_to_metric_families

from balanceiq.exceptions import EnvoyAdminError
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

ENVOY_PREFIX = "envoy_cluster_endpoint_"
CLUSTER_LABEL = "envoy_cluster_name"
ADDRESS_LABEL = "envoy_endpoint_address"

ALS_HISTOGRAM = "balanceiq_upstream_rq_time_seconds"
ALS_CLUSTER_LABEL = "cluster"
ALS_ADDRESS_LABEL = "endpoint"

# Envoy stat (after the prefix, one ``_total`` removed) -> EndpointStats field.
ENVOY_FIELDS = {
    "rq": "rq_total",
    "rq_success": "rq_success",
    "rq_error": "rq_error",
    "rq_timeout": "rq_timeout",
    "rq_active": "rq_active",
    "healthy": "healthy",
    "cx_connect_fail": "cx_connect_fail",
}
COUNTERS = ("rq_total", "rq_success", "rq_error")  # the ones rates are taken from

# A baseline older than this would average over a period the controller no longer cares
# about; the next observation re-warms with a fresh pair of scrapes instead.
MAX_BASELINE_AGE_S = 60.0
MAX_BODY_BYTES = 32 * 1024 * 1024  # far above any real admin page; bounds a runaway answer
MAX_REPORTED_PROBLEMS = 10

Key = tuple[str, str]  # (cluster, endpoint address)
Buckets = tuple[tuple[float, float], ...]  # cumulative (le, count), le ascending


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """One endpoint's raw series in one scrape. ``nan``: absent or rejected (see ``bad``)."""

    rq_total: float = NAN
    rq_success: float = NAN
    rq_error: float = NAN
    rq_timeout: float = NAN
    rq_active: float = NAN  # gauge: requests in flight
    healthy: float = NAN  # gauge: 1 healthy, 0 not
    cx_connect_fail: float = NAN
    bad: frozenset[str] = frozenset()  # fields whose sample was NaN/Inf/negative/duplicated


@dataclass(frozen=True, slots=True)
class Scrape:
    """What one read of the admin page (plus the ALS page) said, and when.

    ``timestamp`` is on the caller's clock (``time.monotonic()`` by default); only
    differences between two scrapes are used. Mappings are read-only views.
    """

    timestamp: float
    endpoints: Mapping[Key, EndpointStats] = field(default_factory=dict)
    latency: Mapping[Key, Buckets] = field(default_factory=dict)  # seconds
    latency_source: bool = False  # the ALS histogram was declared or had samples
    bad_latency: frozenset[Key] = frozenset()
    problems: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", MappingProxyType(dict(self.endpoints)))
        object.__setattr__(self, "latency", MappingProxyType(dict(self.latency)))

    def endpoint(self, cluster: str, address: str) -> EndpointStats | None:
        return self.endpoints.get((cluster, address))

    def clusters(self) -> list[str]:
        return sorted({c for c, _ in self.endpoints})


# -- parsing -------------------------------------------------------------------------------


def _wanted(name: str) -> bool:
    return name.startswith((ENVOY_PREFIX, ALS_HISTOGRAM))


_NAME_END = re.compile(r"[{\s]")
_LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"([^"\\]*)"')


def _relevant_lines(text: str) -> list[str]:
    """Our TYPE lines and samples only.

    Envoy's page is mostly series we do not use (about 1,100 samples for 3 endpoints);
    never handing them to the parser means junk in an unrelated series cannot cost us
    the ones we need. HELP lines are dropped too: one more escaping rule to trip on, for
    nothing we read.
    """
    kept: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE" and _wanted(parts[2]):
                kept.append(line)
            continue
        m = _NAME_END.search(line)
        name = line[: m.start()] if m else line
        if _wanted(name):
            kept.append(line)
    return kept


def _parse_samples(
    lines: list[str], on_bad_line: Callable[[str, str], None]
) -> Iterable[tuple[str, dict[str, str], float]]:
    """``(sample name, labels, value)`` for every line that parses; the rest to ``on_bad_line``."""
    # Fast path: one parser pass over everything we kept. The parser is a generator that
    # gives up at the first bad line, so on any failure we go line by line to keep the rest.
    try:
        families = list(text_string_to_metric_families("\n".join(lines)))
    except Exception:
        families = None
    if families is not None:
        for fam in families:
            for s in fam.samples:
                yield s.name, dict(s.labels), s.value
        return
    type_line = ""
    for line in lines:
        if line.startswith("#"):
            try:
                list(text_string_to_metric_families(line))
            except Exception as exc:
                # A broken TYPE line would fail every sample parsed under it; the
                # samples are still readable as untyped.
                on_bad_line(line, str(exc) or type(exc).__name__)
                type_line = ""
            else:
                type_line = line
            continue
        text = f"{type_line}\n{line}" if type_line else line
        try:
            fams = list(text_string_to_metric_families(text))
        except Exception as exc:
            on_bad_line(line, str(exc) or type(exc).__name__)
            continue
        for fam in fams:
            for s in fam.samples:
                yield s.name, dict(s.labels), s.value


def _clip(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


class _Accumulator:
    """Mutable state while parsing; frozen into a Scrape at the end."""

    def __init__(self) -> None:
        self.stats: dict[Key, dict[str, float]] = {}
        self.bad: dict[Key, set[str]] = {}
        self.buckets: dict[Key, dict[float, float]] = {}
        self.counts: dict[Key, float] = {}
        self.bad_latency: set[Key] = set()
        self.latency_source = False
        self.problems: list[str] = []
        self.envoy_lines = 0

    def add_text(self, text: str) -> None:
        lines = _relevant_lines(text)
        self.envoy_lines += sum(1 for ln in lines if ln.startswith(ENVOY_PREFIX))
        # A labelled histogram has no samples until its first observation, but the
        # exporter still declares it: that makes it a source whose counts are all zero,
        # so the first window with traffic already has a baseline.
        if any(ln.split()[2:3] == [ALS_HISTOGRAM] for ln in lines if ln.startswith("#")):
            self.latency_source = True
        for name, labels, value in _parse_samples(lines, self._bad_line):
            if name.startswith(ENVOY_PREFIX):
                self._envoy_sample(name, labels, value)
            elif name.startswith(ALS_HISTOGRAM):
                self._als_sample(name, labels, value)

    def _bad_line(self, line: str, why: str) -> None:
        self.problems.append(f"unparsable line {_clip(line)!r}: {_clip(why)}")
        # Best effort to say whose sample it was, so that endpoint is flagged invalid
        # rather than looking as if Envoy had simply not exported the series.
        m = _NAME_END.search(line)
        name = line[: m.start()] if m else line
        labels = dict(_LABEL_RE.findall(line))
        if name.startswith(ENVOY_PREFIX):
            fname = ENVOY_FIELDS.get(name[len(ENVOY_PREFIX) :].removesuffix("_total"))
            key = (labels.get(CLUSTER_LABEL, ""), labels.get(ADDRESS_LABEL, ""))
            if fname and all(key):
                self.stats.setdefault(key, {}).pop(fname, None)
                self.bad.setdefault(key, set()).add(fname)
        elif name.startswith(ALS_HISTOGRAM):
            key = (labels.get(ALS_CLUSTER_LABEL, ""), labels.get(ALS_ADDRESS_LABEL, ""))
            if all(key):
                self.bad_latency.add(key)

    def _envoy_sample(self, name: str, labels: dict[str, str], value: float) -> None:
        stat = name[len(ENVOY_PREFIX) :].removesuffix("_total")
        fname = ENVOY_FIELDS.get(stat)
        if fname is None:  # cx_total, cx_active, rq_pending_active...: not used
            return
        cluster, address = labels.get(CLUSTER_LABEL, ""), labels.get(ADDRESS_LABEL, "")
        if not cluster or not address:
            self.problems.append(f"{name}{_fmt_labels(labels)}: no {CLUSTER_LABEL}/{ADDRESS_LABEL} label")
            return
        key = (cluster, address)
        stats = self.stats.setdefault(key, {})
        x, ok = finite_or_nan(value)
        if ok and fname == "healthy" and x not in (0.0, 1.0):
            ok = False
        if not ok:
            self.problems.append(f"{name}{_fmt_labels(labels)} = {value!r}: not a valid {fname}")
        elif fname in stats or fname in self.bad.get(key, ()):
            # Two series for one endpoint's stat: neither can be trusted to be "the" one.
            self.problems.append(f"{name}{_fmt_labels(labels)}: duplicate series")
            ok = False
        if ok:
            stats[fname] = x
        else:
            stats.pop(fname, None)
            self.bad.setdefault(key, set()).add(fname)

    def _als_sample(self, name: str, labels: dict[str, str], value: float) -> None:
        suffix = name[len(ALS_HISTOGRAM) :]
        if suffix not in ("_bucket", "_count"):
            return  # _sum, _created: not needed for quantiles
        self.latency_source = True
        cluster, address = labels.get(ALS_CLUSTER_LABEL, ""), labels.get(ALS_ADDRESS_LABEL, "")
        if not cluster or not address:
            self.problems.append(f"{name}{_fmt_labels(labels)}: no {ALS_CLUSTER_LABEL}/{ALS_ADDRESS_LABEL} label")
            return
        key = (cluster, address)
        x, ok = finite_or_nan(value)
        if not ok:
            self.problems.append(f"{name}{_fmt_labels(labels)} = {value!r}: not a valid count")
            self.bad_latency.add(key)
            return
        if suffix == "_count":
            self.counts[key] = x
            return
        try:
            le = float(labels.get("le", ""))
        except ValueError:
            le = NAN
        if math.isnan(le) or le < 0:
            self.problems.append(f"{name}{_fmt_labels(labels)}: bad or missing le")
            self.bad_latency.add(key)
            return
        bucket = self.buckets.setdefault(key, {})
        if le in bucket:
            self.problems.append(f"{name}{_fmt_labels(labels)}: duplicate bucket")
            self.bad_latency.add(key)
            return
        bucket[le] = x

    def scrape(self, timestamp: float) -> Scrape:
        keys = set(self.stats) | set(self.bad)
        endpoints = {k: EndpointStats(**self.stats.get(k, {}), bad=frozenset(self.bad.get(k, ()))) for k in keys}
        latency: dict[Key, Buckets] = {}
        for k, b in self.buckets.items():
            if k in self.bad_latency:
                continue
            if math.inf not in b and k in self.counts:
                b = {**b, math.inf: self.counts[k]}  # _count is the +Inf bucket by definition
            latency[k] = tuple(sorted(b.items()))
        return Scrape(
            timestamp=timestamp,
            endpoints=endpoints,
            latency=latency,
            latency_source=self.latency_source,
            bad_latency=frozenset(self.bad_latency),
            problems=tuple(self.problems),
        )


def _fmt_labels(labels: Mapping[str, str]) -> str:
    return _clip("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}", 160)


def _why_unusable(text: str, acc: _Accumulator) -> str:
    head = text.lstrip()[:1024].lower()
    if not head:
        return "empty response"
    if head.startswith("<") or "<html" in head:
        return "answered an HTML/XML page, not the Prometheus text format"
    if acc.envoy_lines == 0:
        return (
            f"no {ENVOY_PREFIX}* series: not Envoy's /stats/prometheus, or the cluster "
            "lacks track_cluster_stats.per_endpoint_stats"
        )
    shown = "; ".join(acc.problems[:3])
    return f"no usable per-endpoint sample ({len(acc.problems)} problem(s): {shown})"


def parse_exposition(text: str, timestamp: float | None = None, *, als_text: str | None = None) -> Scrape:
    """Parse Envoy's ``/stats/prometheus`` (and optionally the ALS exporter's ``/metrics``).

    Individual bad samples (NaN/Inf/negative values, missing labels, unparsable lines)
    are skipped and listed in ``Scrape.problems``; the endpoint's field is marked bad.
    Raises :class:`EnvoyAdminError` when ``text`` yields no usable per-endpoint sample at
    all. ``als_text`` never raises: without it latency is simply unknown.
    """
    ts = time.monotonic() if timestamp is None else timestamp
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise EnvoyAdminError(f"expected exposition text, got {type(text).__name__}")
    acc = _Accumulator()
    acc.add_text(text)
    usable = any(len(s) > 0 for s in acc.stats.values())
    if not usable:
        raise EnvoyAdminError(_why_unusable(text, acc))
    if als_text is not None:
        n = len(acc.problems)
        acc.add_text(als_text if isinstance(als_text, str) else str(als_text))
        acc.problems[n:] = [f"als: {p}" for p in acc.problems[n:]]
    return acc.scrape(ts)


# /clusters?format=json stat name -> EndpointStats field (counters and the in-flight gauge;
# ``healthy`` comes from the host's health flags).
CLUSTERS_JSON_FIELDS = {
    "rq_total": "rq_total",
    "rq_success": "rq_success",
    "rq_error": "rq_error",
    "rq_timeout": "rq_timeout",
    "rq_active": "rq_active",
    "cx_connect_fail": "cx_connect_fail",
}


def _host_address(host: Mapping[str, object]) -> str | None:
    address = host.get("address")
    sock = address.get("socket_address", {}) if isinstance(address, dict) else {}
    addr, port = sock.get("address"), sock.get("port_value")
    if not isinstance(addr, str) or not addr or not isinstance(port, int):
        return None
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _host_healthy(health: object) -> float:
    """1 as Envoy's per-endpoint ``healthy`` gauge would say it: no failed check and EDS
    HEALTHY (or UNKNOWN); 0 otherwise (DEGRADED included, as in Envoy)."""
    if not isinstance(health, dict):
        return NAN
    if any(v is True for k, v in health.items() if k.startswith("failed") or k == "pending_dynamic_removal"):
        return 0.0
    return 1.0 if health.get("eds_health_status", "HEALTHY") in ("HEALTHY", "UNKNOWN") else 0.0


def parse_clusters_json(data: object, timestamp: float | None = None) -> Scrape:
    """Envoy's ``/clusters?format=json`` -> :class:`Scrape`: per-endpoint counters, the
    in-flight gauge and health, as :func:`parse_exposition` gets them from the text
    stats, for a fiftieth of the parsing (a stat Envoy leaves out is zero: proto3 JSON
    omits zeros). Raises :class:`EnvoyAdminError` when nothing usable is in it."""
    ts = time.monotonic() if timestamp is None else timestamp
    if not isinstance(data, dict) or not isinstance(data.get("cluster_statuses"), list):
        raise EnvoyAdminError("not Envoy's /clusters?format=json (no cluster_statuses)")
    endpoints: dict[Key, EndpointStats] = {}
    problems: list[str] = []
    for cs in data["cluster_statuses"]:
        if not isinstance(cs, dict) or not isinstance(cs.get("name"), str):
            continue
        for host in cs.get("host_statuses") or []:
            if not isinstance(host, dict):
                continue
            address = _host_address(host)
            if address is None:
                problems.append(f"{cs['name']}: a host without a socket address")
                continue
            key = (cs["name"], address)
            values: dict[str, float] = {}
            bad: set[str] = set()
            for stat in host.get("stats") or []:
                fname = CLUSTERS_JSON_FIELDS.get(stat.get("name", "")) if isinstance(stat, dict) else None
                if fname is None:
                    continue
                x, ok = finite_or_nan(_num(stat.get("value", 0)))
                if ok and fname not in values:
                    values[fname] = x
                else:
                    problems.append(f"{key[0]}/{address} {stat.get('name')} = {stat.get('value')!r}: not a valid count")
                    bad.add(fname)
            for fname in CLUSTERS_JSON_FIELDS.values():
                if fname not in values and fname not in bad:
                    values[fname] = 0.0
            values["healthy"] = _host_healthy(host.get("health_status"))
            if key in endpoints:
                problems.append(f"{key[0]}/{address}: listed twice")
                bad |= set(CLUSTERS_JSON_FIELDS.values())
                values = {}
            endpoints[key] = EndpointStats(**{k: v for k, v in values.items() if k not in bad}, bad=frozenset(bad))
    if not endpoints:
        raise EnvoyAdminError("no endpoint in /clusters?format=json")
    return Scrape(timestamp=ts, endpoints=endpoints, problems=tuple(problems))


def parse_als_snapshot(data: object) -> tuple[dict[Key, Buckets], frozenset[Key], tuple[str, ...]]:
    """The ALS exporter's ``/snapshot`` JSON -> ``(latency buckets, bad keys, problems)``.

    Each series' ``buckets`` are cumulative counts at ``bounds`` then +Inf; a series with
    the wrong length, a negative or non-integer count, or counts going down is bad (its
    latency unknown), never guessed. Raises :class:`EnvoyAdminError` when ``data`` is not
    a snapshot at all, so the caller can read ``/metrics`` instead.
    """
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("series"), list)
        or not isinstance(data.get("bounds"), list)
    ):
        raise EnvoyAdminError("not an ALS snapshot (no bounds/series)")
    try:
        bounds = [float(b) for b in data["bounds"]]
    except (TypeError, ValueError) as exc:
        raise EnvoyAdminError(f"ALS snapshot bounds are not numbers: {exc}") from exc
    if any(not math.isfinite(b) or b < 0 for b in bounds) or bounds != sorted(set(bounds)):
        raise EnvoyAdminError("ALS snapshot bounds must be finite, >= 0 and strictly ascending")
    les = [*bounds, math.inf]
    latency: dict[Key, Buckets] = {}
    bad: set[Key] = set()
    problems: list[str] = []
    for item in data["series"]:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("cluster"), str)
            or not isinstance(item.get("endpoint"), str)
        ):
            problems.append(f"als snapshot: series without cluster/endpoint: {_clip(repr(item))}")
            continue
        key = (item["cluster"], item["endpoint"])
        counts = item.get("buckets")
        ok = (
            isinstance(counts, list)
            and len(counts) == len(les)
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            and all(a <= b for a, b in itertools.pairwise(counts))
        )
        if not ok or key in latency or key in bad:
            problems.append(f"als snapshot: bad or duplicate buckets for {key[0]}/{key[1]}")
            bad.add(key)
            latency.pop(key, None)
            continue
        assert counts is not None  # ok: a list
        latency[key] = tuple(zip(les, (float(c) for c in counts)))
    return latency, frozenset(bad), tuple(problems)


# -- two scrapes to an Observation -----------------------------------------------------------


def _num(x: object) -> float:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return NAN


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
    h = _num(stats.healthy)
    if not math.isnan(h) and h not in (0.0, 1.0):
        bad.add("healthy")
    return bad


def _bucket_delta(prev: Buckets, cur: Buckets) -> Buckets | None:
    """Per-bucket increase, or None if the histogram was reset or its layout changed."""
    before = dict(prev)
    out = []
    for le, c in cur:
        p = before.get(le, 0.0 if not prev else None)
        if p is None:
            return None
        d = c - p
        if not math.isfinite(d) or d < 0:
            return None
        out.append((le, d))
    return tuple(out)


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
    """Rates and quantiles between two scrapes, one row per entry of ``addresses``, in order.

    ``now`` (same clock as the scrapes' timestamps) sets ``age_s``; without it age is 0,
    as it is when deriving right after scraping. Never raises for any pair of scrapes.
    """
    dt = cur.timestamp - prev.timestamp if prev is not None else NAN
    rates_ok = prev is not None and math.isfinite(dt) and dt > 0
    age = now - cur.timestamp if now is not None else 0.0
    age = age if math.isfinite(age) and age > 0 else 0.0
    base = prev if rates_ok else None
    rows = [_derive_one(base, cur, cluster, a, dt, age, costs, weights) for a in addresses]
    problems = list(cur.problems)
    errors = [f"envoy-admin: {p}" for p in problems[:MAX_REPORTED_PROBLEMS]]
    if len(problems) > MAX_REPORTED_PROBLEMS:
        errors.append(f"envoy-admin: and {len(problems) - MAX_REPORTED_PROBLEMS} more problem(s)")
    return Observation(
        cluster=cluster,
        endpoints=tuple(rows),
        source="envoy-admin",
        window_s=dt if rates_ok else NAN,
        errors=tuple(errors),
    )


class _CommonFields(TypedDict):
    """The EndpointObservation fields every row of :func:`_derive_one` has, found or not."""

    address: str
    cost_per_million: float
    weight: float
    age_s: float


def _derive_one(
    prev: Scrape | None,
    cur: Scrape,
    cluster: str,
    address: str,
    dt: float,
    age: float,
    costs: Mapping[str, float],
    weights: Mapping[str, float] | None,
) -> EndpointObservation:
    key = (cluster, address)
    flags: set[str] = set()
    if not cur.latency_source:
        flags.add(NO_LATENCY_SOURCE)
    common: _CommonFields = {
        "address": address,
        "cost_per_million": _num(costs.get(address, NAN)),
        "weight": _num(weights.get(address, NAN)) if weights is not None else NAN,
        "age_s": age,
    }
    c = cur.endpoints.get(key)
    if c is None:
        return EndpointObservation(**common, flags=frozenset(flags | {MISSING}))

    bad = _bad_fields(c)
    if bad:
        flags.add(INVALID)
    if any(math.isnan(_value(c, f)) and f not in bad for f in ("rq_total", "rq_error")):
        flags.add(MISSING)  # the endpoint is there, but not the series rates come from
    inflight = _value(c, "rq_active")
    healthy = None if "healthy" in bad or math.isnan(_num(c.healthy)) else _num(c.healthy) == 1.0

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
                # A warming row is not a measurement (Observation.usable): its error rate
                # is left unknown with its latency, never half a window's worth.
                if lat_flag != WARMING:
                    error_rate = min(1.0, d["rq_error"] / done)
    return EndpointObservation(
        **common,
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
    p50 = quantile_from_buckets(delta, 0.5) * 1000.0
    p95 = quantile_from_buckets(delta, 0.95) * 1000.0
    return p50, p95, None


# -- HTTP -------------------------------------------------------------------------------------


def _check_url(url: str, what: str) -> str:
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise EnvoyAdminError(f"{what} URL {url!r} is invalid: {exc}") from exc
    if u.scheme not in ("http", "https") or not u.host:
        raise EnvoyAdminError(f"{what} URL {url!r} must be http(s)://host[:port]")
    return str(u).rstrip("/")


_TEXT_TYPES = ("text/plain", "application/openmetrics-text")


def _close_quietly(client: httpx.Client, pool: ThreadPoolExecutor) -> None:
    client.close()
    pool.shutdown(wait=False)


def _json_loads(body: str, what: str = "ALS snapshot") -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
        raise EnvoyAdminError(f"{what} is not JSON: {_clip(str(exc))}") from exc


class EnvoyAdminSource:
    """Reads Envoy's admin stats (and the ALS exporter) and turns them into Observations.

    Only ever sends GETs. Thread-safe: one lock guards the kept scrapes, so concurrent
    observers of one cluster do not interleave their windows.
    """

    def __init__(self, admin_url: str, als_metrics_url: str | None = None, timeout_s: float = 1.0) -> None:
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
            raise EnvoyAdminError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        self.admin_url = _check_url(admin_url, "Envoy admin")
        # Only per-endpoint stats: Envoy renders and we parse half as much (measured: 242 KB
        # -> 111 KB at 100 endpoints). The regex runs on Envoy's dotted stat names.
        self.stats_url = f"{self.admin_url}/stats/prometheus?filter=%5Ecluster%5C..%2B%5C.endpoint%5C."
        # The same per-endpoint numbers as JSON: ~0.6 ms to parse at 100 endpoints where
        # the text takes ~20 ms. An admin that does not answer JSON there is read as text.
        self.clusters_url: str | None = f"{self.admin_url}/clusters?format=json"
        self.als_metrics_url = _check_url(als_metrics_url, "ALS metrics") if als_metrics_url else None
        # The exporter's compact JSON beside /metrics (tens of ms cheaper to render and
        # parse); an exporter without it (404, or not a snapshot) is read as text after.
        self.als_snapshot_url = (
            self.als_metrics_url.removesuffix("/metrics") + "/snapshot"
            if self.als_metrics_url and self.als_metrics_url.endswith("/metrics")
            else None
        )
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="als-scrape")
        # One client for every scrape: a new httpx.Client builds an SSL context (~10-20 ms)
        # and new connections each time. No proxies from the environment: the admin port
        # is an internal endpoint, and a proxy answering in its place would be read as
        # Envoy's numbers.
        self._client = httpx.Client(timeout=self.timeout_s, follow_redirects=False, trust_env=False)
        # Closed by close(), or when this source is collected: never a leaked socket.
        self._finalizer = weakref.finalize(self, _close_quietly, self._client, self._pool)
        # Per cluster: each cluster's window runs from its own previous observation, so
        # observing cluster A then B does not hand B a window of a few milliseconds.
        self._baseline: dict[str, Scrape] = {}

    def close(self) -> None:
        self._finalizer()

    def _get(self, client: httpx.Client, url: str, types: tuple[str, ...] = ()) -> str:
        deadline = time.monotonic() + self.timeout_s
        try:
            with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise EnvoyAdminError(f"GET {url}: HTTP {r.status_code} {r.reason_phrase}".rstrip())
                ctype = r.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if ctype and not ctype.startswith(types or _TEXT_TYPES):
                    raise EnvoyAdminError(
                        f"GET {url}: content-type {ctype!r}, not {'JSON' if types else 'the Prometheus text format'}"
                    )
                body = bytearray()
                # httpx's timeout is per read; a peer trickling bytes must not hold us past
                # the caller's budget.
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
        except (httpx.HTTPError, httpx.InvalidURL, LookupError) as exc:
            # LookupError: a charset Python does not know.
            raise EnvoyAdminError(f"GET {url}: {type(exc).__name__}: {exc}") from exc

    def scrape(self) -> Scrape:
        """One read of the admin page (and the ALS page, whose failure is only a problem)."""
        client = self._client
        als_text, als_problem = None, None
        snapshot: tuple[dict[Key, Buckets], frozenset[Key], tuple[str, ...]] | None = None
        als: Future[str] | None = None
        if self.als_snapshot_url:
            als = self._pool.submit(self._get, client, self.als_snapshot_url, ("application/json",))
        elif self.als_metrics_url:
            # Both pages at once: the ALS exporter renders thousands of bucket lines.
            als = self._pool.submit(self._get, client, self.als_metrics_url)
        t0 = time.monotonic()
        envoy: Scrape | None = None
        text = ""
        if self.clusters_url is not None:
            try:
                body = self._get(client, self.clusters_url, ("application/json",))
                ts = (t0 + time.monotonic()) / 2
                envoy = parse_clusters_json(_json_loads(body, "Envoy /clusters"), ts)
            except EnvoyAdminError as exc:
                if not any(m in str(exc) for m in ("content-type", "not JSON", "cluster_statuses", "HTTP 404")):
                    raise
                self.clusters_url = None  # not JSON here: the text stats from now on
                t0 = time.monotonic()
        if envoy is None:
            text = self._get(client, self.stats_url)
        # The counters were read somewhere during the request; the midpoint halves the
        # worst-case error in the window length.
        ts = (t0 + time.monotonic()) / 2
        if als is not None:
            try:
                body = als.result()
                if self.als_snapshot_url:
                    snapshot = parse_als_snapshot(_json_loads(body))
                else:
                    als_text = body
            except EnvoyAdminError as exc:
                missing = any(m in str(exc) for m in ("HTTP 404", "content-type", "snapshot"))
                if missing and self.als_snapshot_url and self.als_metrics_url:
                    # No snapshot here (an older exporter): the text page from now on.
                    self.als_snapshot_url = None
                    try:
                        als_text = self._get(client, self.als_metrics_url)
                    except EnvoyAdminError as exc2:
                        als_problem = f"als: {exc2}"
                else:
                    als_problem = f"als: {exc}"
        if envoy is not None:
            s = envoy
            if als_text is not None:
                acc = _Accumulator()
                acc.add_text(als_text)
                lat = acc.scrape(ts)
                s = replace(
                    s,
                    latency=lat.latency,
                    latency_source=lat.latency_source,
                    bad_latency=lat.bad_latency,
                    problems=(*s.problems, *(f"als: {p}" for p in lat.problems)),
                )
        else:
            try:
                s = parse_exposition(text, ts, als_text=als_text)
            except EnvoyAdminError as exc:
                raise EnvoyAdminError(f"GET {self.stats_url}: {exc}") from exc
        if snapshot is not None:
            latency, bad, problems = snapshot
            s = replace(s, latency=latency, latency_source=True, bad_latency=bad, problems=(*s.problems, *problems))
        if als_problem:
            s = replace(s, problems=(*s.problems, als_problem))
        return s

    def observe(
        self,
        cluster: str,
        addresses: Sequence[str],
        costs: Mapping[str, float],
        weights: Mapping[str, float] | None = None,
        min_window_s: float = 0.25,
    ) -> Observation:
        """Rates since this cluster's previous observation (at least ``min_window_s``).

        Without a usable previous scrape it takes two, ``min_window_s`` apart, so even the
        first fallback observation has real rates. Raises :class:`EnvoyAdminError`.
        """
        min_window_s = max(0.0, float(min_window_s))
        with self._lock:
            prev = self._baseline.get(cluster)
            if prev is None or time.monotonic() - prev.timestamp > MAX_BASELINE_AGE_S:
                prev = self.scrape()
                self._baseline[cluster] = prev
            wait = prev.timestamp + min_window_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            cur = self.scrape()
            self._baseline[cluster] = cur
        return derive(prev, cur, cluster, addresses, costs, weights, now=time.monotonic())
