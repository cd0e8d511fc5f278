"""Observations from Prometheus, one PromQL query per signal (see ``telemetry.queries``). NaN, Inf and
negatives become flagged fields, a missing endpoint is ``missing``; a failed or malformed query raises
:class:`~balanceiq.exceptions.PrometheusError` (the caller falls back)."""

from __future__ import annotations

import math
import string
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from balanceiq.config import SIGNALS, TelemetryConfig
from balanceiq.exceptions import PrometheusError
from balanceiq.telemetry import jsonbody
from balanceiq.telemetry.observation import (
    INVALID,
    MISSING,
    NAN,
    NO_LATENCY_SOURCE,
    NO_TRAFFIC,
    STALE,
    EndpointObservation,
    Observation,
    finite_or_nan,
)

LATENCY = ("p50_ms", "p95_ms")
_SIGNAL = "balanceiq_signal"
_ENDPOINT = "balanceiq_endpoint"


def render(promql: str, cluster: str, window: str) -> str:
    return string.Template(promql).substitute(cluster=cluster, window=window)


def parse_vector(result: Any, endpoint_label: str) -> tuple[dict[str, float], list[str]]:
    """``{endpoint: value}`` from an instant-vector result, plus problems found (bad samples: ``nan``).
    Raises PrometheusError if the result is not an instant vector at all."""
    if not isinstance(result, list):
        raise PrometheusError(f"expected an instant vector, got {type(result).__name__}")
    values: dict[str, float] = {}
    problems: list[str] = []
    for item in result:
        if not isinstance(item, Mapping) or not isinstance(item.get("metric"), Mapping):
            raise PrometheusError(f"malformed sample {str(item)[:80]!r}")
        endpoint = item["metric"].get(endpoint_label)
        if not endpoint:
            problems.append(f"sample without label {endpoint_label!r}: {dict(item['metric'])}")
            continue
        pair = item.get("value")
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise PrometheusError(f"malformed value for {endpoint}: {pair!r}")
        try:
            values[str(endpoint)] = float(pair[1])
        except (TypeError, ValueError):
            problems.append(f"{endpoint}: unparsable value {pair[1]!r}")
            values[str(endpoint)] = NAN
    return values, problems


def _refuse_deep_json(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    # prometheus_api_client decodes the body itself: this is the last point before it.
    jsonbody.check_depth(response.content)


class PrometheusSource:
    """Runs the configured PromQL and assembles an :class:`Observation`."""

    def __init__(self, url: str, config: TelemetryConfig) -> None:
        self.config = config
        # No client-side retries: a down Prometheus must fail fast, so the same step can use Envoy's admin.
        session = requests.Session()
        session.hooks["response"].append(_refuse_deep_json)
        self._prom = PrometheusConnect(
            url=url, timeout=config.timeout_s, retry=Retry(total=0, connect=0, read=0), session=session
        )
        self._pool = ThreadPoolExecutor(max_workers=len(SIGNALS), thread_name_prefix="promql")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._prom.close()

    def _run(self, what: str, expr: str) -> Any:
        try:
            return self._prom.custom_query(expr, params={"timeout": f"{self.config.timeout_s:g}s"})
        except (requests.exceptions.RequestException, PrometheusApiClientException) as exc:
            raise PrometheusError(f"{what}: {type(exc).__name__}: {str(exc)[:200]}") from exc
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise PrometheusError(f"{what}: malformed response: {type(exc).__name__}: {str(exc)[:200]}") from exc
        except RecursionError as exc:  # json's recursive decoder on "[[[[...": garbage, not a bug of ours
            raise PrometheusError(f"{what}: malformed response: JSON nested too deeply") from exc

    def _query(self, signal: str, cluster: str) -> tuple[dict[str, float], list[str]]:
        q = self.config.queries[signal]
        return parse_vector(self._run(signal, render(q.promql, cluster, self.config.window)), q.endpoint_label)

    def combined_query(self, cluster: str) -> str:
        """Every signal in one PromQL expression: each series tagged with its signal and
        endpoint under common labels, joined with ``or`` (a plain union: the tags differ)."""
        parts = []
        for signal in SIGNALS:
            q = self.config.queries[signal]
            expr = render(q.promql, cluster, self.config.window)
            tagged = f'label_replace(({expr}), "{_ENDPOINT}", "$1", "{q.endpoint_label}", "(.+)")'
            parts.append(f'label_replace({tagged}, "{_SIGNAL}", "{signal}", "", "")')
        return " or ".join(parts)

    def query_all(self, cluster: str) -> dict[str, tuple[dict[str, float], list[str]]]:
        try:
            result = self._run("combined query", self.combined_query(cluster))
        except PrometheusError as exc:
            if "HTTP Status Code 400" not in str(exc):
                raise
            # A bad template fails the whole expression; ask per signal to name the culprit.
            futures = {s: self._pool.submit(self._query, s, cluster) for s in SIGNALS}
            return {s: f.result() for s, f in futures.items()}
        if not isinstance(result, list):
            raise PrometheusError(f"expected an instant vector, got {type(result).__name__}")
        by_signal: dict[str, list[Any]] = {s: [] for s in SIGNALS}
        for item in result:
            metric = item.get("metric") if isinstance(item, Mapping) else None
            if not isinstance(metric, Mapping):
                raise PrometheusError(f"malformed sample {str(item)[:80]!r}")
            signal = metric.get(_SIGNAL)
            if isinstance(signal, str) and signal in by_signal:
                by_signal[signal].append(item)
        return {s: parse_vector(items, _ENDPOINT) for s, items in by_signal.items()}

    def observe(
        self,
        cluster: str,
        addresses: Sequence[str],
        costs: Mapping[str, float],
        weights: Mapping[str, float] | None = None,
    ) -> Observation:
        t0 = time.time()
        results = self.query_all(cluster)
        rps = results["rps"][0]
        if not any(a in rps for a in addresses):
            # Prometheus knows nothing of this cluster (not scraping Envoy, or the wrong one): fall back.
            raise PrometheusError(f"no rps series for any endpoint of cluster {cluster!r}")
        problems = [p for _, probs in results.values() for p in probs]
        latency_known = any(results[s][0] for s in LATENCY)
        endpoints = [self._endpoint(a, results, costs, weights, t0, latency_known) for a in addresses]
        window = self.config.window_s
        return Observation(
            cluster, tuple(endpoints), "prometheus", timestamp=t0, window_s=window, errors=tuple(problems[:20])
        )

    def _endpoint(
        self,
        address: str,
        results: Mapping[str, tuple[dict[str, float], list[str]]],
        costs: Mapping[str, float],
        weights: Mapping[str, float] | None,
        now: float,
        latency_known: bool,
    ) -> EndpointObservation:
        flags: set[str] = set() if latency_known else {NO_LATENCY_SOURCE}
        values = dict.fromkeys(SIGNALS, NAN)
        for signal in SIGNALS:
            raw = results[signal][0].get(address)
            if raw is not None:
                values[signal], ok = finite_or_nan(raw)
                # An idle endpoint's histogram_quantile is NaN: "no traffic" (decided below), not invalid.
                if not ok and not (signal in LATENCY and math.isnan(raw)):
                    flags.add(INVALID)
        if address not in results["rps"][0]:
            flags.add(MISSING)
        error_rate = NAN
        completed = values["success"] + values["errors"]  # nan if either is unknown
        if math.isfinite(completed):
            if completed <= 0:
                flags.add(NO_TRAFFIC)
                values["p50_ms"] = values["p95_ms"] = NAN
            else:
                error_rate = min(1.0, values["errors"] / completed)
        last = values["last_sample"]
        age = max(0.0, now - last) if math.isfinite(last) else NAN
        if age > self.config.stale_after_s:  # never for nan
            flags.add(STALE)
        healthy = None if math.isnan(values["healthy"]) else values["healthy"] >= 1
        return EndpointObservation(
            address=address,
            **{s: values[s] for s in (*LATENCY, "saturation", "inflight", "rps")},  # signals named as the fields
            error_rate=error_rate,
            cost_per_million=costs.get(address, NAN),
            weight=float(weights[address]) if weights and address in weights else NAN,
            healthy=healthy,
            age_s=age,
            flags=frozenset(flags),
        )
