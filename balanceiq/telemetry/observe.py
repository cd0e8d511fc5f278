"""`Telemetry.observe()`: Prometheus first, Envoy's admin when it cannot answer; never raises (when
both fail every endpoint is flagged missing, ``source == "none"``, never zeros). A down Prometheus is
retried at most every ``retry_s``: a dead one must not add a connect timeout to every step."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from balanceiq.config import ClusterConfig, Settings
from balanceiq.exceptions import TelemetryError
from balanceiq.telemetry.envoy_admin import EnvoyAdminSource
from balanceiq.telemetry.observation import Observation, empty_observation
from balanceiq.telemetry.prometheus import PrometheusSource

log = logging.getLogger(__name__)


class Telemetry:
    """Observations of one cluster, from Prometheus with a direct-Envoy fallback."""

    def __init__(
        self,
        settings: Settings,
        cluster: str | None = None,
        *,
        als_metrics_url: str | None = None,
        retry_s: float = 5.0,
    ) -> None:
        self.cluster: ClusterConfig = settings.cluster(cluster) if cluster else settings.clusters[0]
        self.addresses = [ep.address for ep in self.cluster.endpoints]
        self.costs = {ep.address: ep.cost_per_million_requests for ep in self.cluster.endpoints}
        self.prometheus = PrometheusSource(settings.prometheus.url, settings.telemetry)
        if als_metrics_url is None and settings.telemetry.als_enabled:
            als_metrics_url = f"http://127.0.0.1:{settings.telemetry.als_metrics_port}/metrics"
        self.fallback = EnvoyAdminSource(
            settings.envoy.admin_url, als_metrics_url=als_metrics_url, timeout_s=settings.telemetry.timeout_s
        )
        self.retry_s = retry_s
        # Failed reads by source ("<source>-bug": not a TelemetryError), for the API's /metrics.
        self.failures: Counter[str] = Counter()
        self._prometheus_down_since: float | None = None
        self._last_prometheus_try = 0.0
        self._blind = False

    def close(self) -> None:
        self.prometheus.close()
        self.fallback.close()

    def _read(self, name: str, errors: list[str], read: Callable[..., Observation], *args: Any) -> Observation | None:
        """``read`` of this cluster, or None with the failure counted and told in ``errors``."""
        try:
            return read(self.cluster.name, self.addresses, self.costs, *args)
        except TelemetryError as exc:
            self.failures[name] += 1
            errors.append(f"{name}: {exc}")
        except Exception as exc:  # a bug in a source must not stop the control loop
            self.failures[f"{name}-bug"] += 1
            log.exception("%s source failed unexpectedly", name)
            errors.append(f"{name}: unexpected {type(exc).__name__}: {exc}")
        return None

    def observe(self, weights: Mapping[str, float] | None = None) -> Observation:
        errors: list[str] = []
        now = time.monotonic()
        if self._prometheus_down_since is None or now - self._last_prometheus_try >= self.retry_s:
            self._last_prometheus_try = now
            obs = self._read("prometheus", errors, self.prometheus.observe, weights)
            if obs is not None:
                if self._prometheus_down_since is not None:
                    log.info("Prometheus is back; leaving the Envoy admin fallback")
                self._prometheus_down_since = None
                return obs
            if self._prometheus_down_since is None:
                log.warning("Prometheus unusable (%s); trying Envoy's admin instead", errors[-1])
                self._prometheus_down_since = now
        else:
            errors.append(f"prometheus: down, next retry in {self.retry_s - (now - self._last_prometheus_try):.1f}s")
        obs = self._read("envoy-admin", errors, self.fallback.observe, dict(weights or {}) or None)
        if obs is not None:
            if self._blind:
                log.info("telemetry back from Envoy's admin")
                self._blind = False
            return replace(obs, errors=tuple(errors) + obs.errors)
        if not self._blind:
            # Said once per episode, so "trying Envoy's admin" is never the last word.
            log.warning("telemetry blind: %s", "; ".join(errors))
            self._blind = True
        return empty_observation(self.cluster.name, self.addresses, self.costs, "none", errors)
