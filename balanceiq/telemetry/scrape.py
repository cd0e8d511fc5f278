"""Envoy's admin output (and the ALS exporter's snapshot) parsed into an immutable :class:`Scrape`;
:func:`derive`: rates and quantiles between two scrapes, as an Observation. Only some Envoy counter names
end in ``_total`` and prometheus_client renames samples differently by version, so samples are matched
by name with one ``_total`` removed."""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

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
    as_float,
    finite_or_nan,
    quantile_from_buckets,
)

ENVOY_PREFIX = "envoy_cluster_endpoint_"
CLUSTER_LABEL = "envoy_cluster_name"
ADDRESS_LABEL = "envoy_endpoint_address"

# Envoy stat (after the prefix, one ``_total`` removed) -> EndpointStats field.
ENVOY_FIELDS = {
    "rq": "rq_total",
    **{f: f for f in ("rq_success", "rq_error", "rq_timeout", "rq_active", "healthy", "cx_connect_fail")},
}
# /clusters?format=json stat name -> field (``healthy`` comes from the host's health flags).
CLUSTERS_JSON_FIELDS = {f: f for f in ENVOY_FIELDS.values() if f != "healthy"}

Key = tuple[str, str]  # (cluster, endpoint address)
Buckets = tuple[tuple[float, float], ...]  # cumulative (le, count), le ascending
Sample = tuple[str, dict[str, str], float]  # (sample name, labels, value)


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
    """One read of the admin page (plus the ALS snapshot) at ``timestamp`` (caller's clock)."""

    timestamp: float
    endpoints: Mapping[Key, EndpointStats] = field(default_factory=dict)
    latency: Mapping[Key, Buckets] = field(default_factory=dict)  # seconds
    latency_source: bool = False  # the ALS exporter answered
    bad_latency: frozenset[Key] = frozenset()
    problems: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", MappingProxyType(dict(self.endpoints)))
        object.__setattr__(self, "latency", MappingProxyType(dict(self.latency)))


_NAME_END = re.compile(r"[{\s]")
_LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"([^"\\]*)"')


def _name(line: str) -> str:
    m = _NAME_END.search(line)
    return line[: m.start()] if m else line


def _envoy_field(name: str) -> str | None:
    return ENVOY_FIELDS.get(name[len(ENVOY_PREFIX) :].removesuffix("_total"))


def _relevant_lines(text: str) -> list[str]:
    """Our TYPE lines and samples only: junk in a series we do not use cannot cost us ours."""
    kept: list[str] = []
    for line in map(str.strip, text.split("\n")):
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE" and parts[2].startswith(ENVOY_PREFIX):
                kept.append(line)
        elif _name(line).startswith(ENVOY_PREFIX):
            kept.append(line)
    return kept


def _samples(text: str) -> list[Sample]:
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def _parse_samples(lines: list[str], on_bad_line: Callable[[str, str], None]) -> list[Sample]:
    """Every sample of the lines that parse; the rest to ``on_bad_line``."""
    # The parser gives up at the first bad line: on any failure, go line by line.
    try:
        return _samples("\n".join(lines))
    except Exception:
        pass
    parsed: list[Sample] = []
    type_line = ""
    for line in lines:
        is_type = line.startswith("#")
        try:
            samples = _samples(line if is_type or not type_line else f"{type_line}\n{line}")
        except Exception as exc:
            on_bad_line(line, str(exc) or type(exc).__name__)
            # A broken TYPE line would fail every sample under it; they still read as untyped.
            type_line = "" if is_type else type_line
            continue
        if is_type:
            type_line = line
        else:
            parsed.extend(samples)
    return parsed


def clip(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _fmt_labels(labels: Mapping[str, str]) -> str:
    return clip("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}", 160)


def _key(labels: Mapping[str, str]) -> Key | None:
    key = (labels.get(CLUSTER_LABEL, ""), labels.get(ADDRESS_LABEL, ""))
    return key if all(key) else None


class _Accumulator:
    """Mutable state while parsing ``text``; frozen into a Scrape at the end."""

    def __init__(self, text: str) -> None:
        self.stats: dict[Key, dict[str, float]] = {}
        self.bad: dict[Key, set[str]] = {}
        self.problems: list[str] = []
        lines = _relevant_lines(text)
        self.envoy_lines = sum(1 for ln in lines if ln.startswith(ENVOY_PREFIX))
        for name, labels, value in _parse_samples(lines, self._bad_line):
            self._envoy_sample(name, labels, value)

    def _mark_bad(self, key: Key, fname: str) -> None:
        self.stats.setdefault(key, {}).pop(fname, None)
        self.bad.setdefault(key, set()).add(fname)

    def _bad_line(self, line: str, why: str) -> None:
        self.problems.append(f"unparsable line {clip(line)!r}: {clip(why)}")
        # Flag whose sample it was, so the endpoint reads invalid rather than unexported.
        fname, key = _envoy_field(_name(line)), _key(dict(_LABEL_RE.findall(line)))
        if fname and key:
            self._mark_bad(key, fname)

    def _envoy_sample(self, name: str, labels: dict[str, str], value: float) -> None:
        fname = _envoy_field(name)
        if fname is None:  # cx_total, cx_active, rq_pending_active...: not used
            return
        key = _key(labels)
        if key is None:
            self.problems.append(f"{name}{_fmt_labels(labels)}: no {CLUSTER_LABEL}/{ADDRESS_LABEL} label")
            return
        x, ok = finite_or_nan(value)
        if not ok or (fname == "healthy" and x not in (0.0, 1.0)):
            self.problems.append(f"{name}{_fmt_labels(labels)} = {value!r}: not a valid {fname}")
        elif fname in self.stats.get(key, {}) or fname in self.bad.get(key, ()):
            # Two series for one endpoint's stat: neither can be trusted to be "the" one.
            self.problems.append(f"{name}{_fmt_labels(labels)}: duplicate series")
        else:
            self.stats.setdefault(key, {})[fname] = x
            return
        self._mark_bad(key, fname)

    def scrape(self, timestamp: float) -> Scrape:
        keys = set(self.stats) | set(self.bad)
        endpoints = {k: EndpointStats(**self.stats.get(k, {}), bad=frozenset(self.bad.get(k, ()))) for k in keys}
        return Scrape(timestamp, endpoints, problems=tuple(self.problems))


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


def parse_exposition(text: str, timestamp: float | None = None) -> Scrape:
    """Envoy's ``/stats/prometheus``: bad samples are skipped, listed in ``problems`` and their field
    marked bad. Raises :class:`EnvoyAdminError` when there is no usable per-endpoint sample at all."""
    ts = time.monotonic() if timestamp is None else timestamp
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise EnvoyAdminError(f"expected exposition text, got {type(text).__name__}")
    acc = _Accumulator(text)
    if not any(acc.stats.values()):
        raise EnvoyAdminError(_why_unusable(text, acc))
    return acc.scrape(ts)


def _host_address(host: Mapping[str, object]) -> str | None:
    address = host.get("address")
    sock = address.get("socket_address", {}) if isinstance(address, dict) else {}
    addr, port = sock.get("address"), sock.get("port_value")
    if not isinstance(addr, str) or not addr or not isinstance(port, int):
        return None
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _host_healthy(health: object) -> float:
    """Envoy's per-endpoint ``healthy`` gauge: 1 with no failed check and EDS HEALTHY or UNKNOWN."""
    if not isinstance(health, dict):
        return NAN
    if any(v is True for k, v in health.items() if k.startswith("failed") or k == "pending_dynamic_removal"):
        return 0.0
    return 1.0 if health.get("eds_health_status", "HEALTHY") in ("HEALTHY", "UNKNOWN") else 0.0


def _host_stats(key: Key, host: dict[str, Any], problems: list[str]) -> EndpointStats:
    values: dict[str, float] = {}
    bad: set[str] = set()
    for stat in host.get("stats") or []:
        fname = CLUSTERS_JSON_FIELDS.get(stat.get("name", "")) if isinstance(stat, dict) else None
        if fname is None:
            continue
        x, ok = finite_or_nan(stat.get("value", 0))
        if ok and fname not in values:
            values[fname] = x
        else:
            problems.append(f"{key[0]}/{key[1]} {stat.get('name')} = {stat.get('value')!r}: not a valid count")
            bad.add(fname)
    for fname in CLUSTERS_JSON_FIELDS.values():
        if fname not in values and fname not in bad:
            values[fname] = 0.0  # proto3 JSON omits zeros
    values["healthy"] = _host_healthy(host.get("health_status"))
    return EndpointStats(**{k: v for k, v in values.items() if k not in bad}, bad=frozenset(bad))


def parse_clusters_json(data: object, timestamp: float | None = None) -> Scrape:
    """Envoy's ``/clusters?format=json`` -> :class:`Scrape`, as :func:`parse_exposition` reads
    the text stats but far cheaper. Raises :class:`EnvoyAdminError` when nothing usable is in it."""
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
            stats = _host_stats(key, host, problems)
            if key in endpoints:
                problems.append(f"{key[0]}/{address}: listed twice")
                stats = EndpointStats(bad=frozenset(CLUSTERS_JSON_FIELDS.values()))
            endpoints[key] = stats
    if not endpoints:
        raise EnvoyAdminError("no endpoint in /clusters?format=json")
    return Scrape(timestamp=ts, endpoints=endpoints, problems=tuple(problems))


def parse_als_snapshot(data: object) -> tuple[dict[Key, Buckets], frozenset[Key], tuple[str, ...]]:
    """The ALS exporter's ``/snapshot`` JSON -> ``(latency buckets, bad keys, problems)``. A series of the
    wrong length, a negative or non-integer count, or counts going down is bad (latency unknown, never
    guessed). Raises :class:`EnvoyAdminError` when ``data`` is not a snapshot."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("series", "bounds")):
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
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("cluster", "endpoint"))):
            problems.append(f"als snapshot: series without cluster/endpoint: {clip(repr(item))}")
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


COUNTERS = ("rq_total", "rq_success", "rq_error")  # rates come from these (a timeout is a 504: in rq_error)
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
    if bad := _bad_fields(c):
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
            # A counter went backwards: Envoy restarted, or the host was re-added (its stats live with it).
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
