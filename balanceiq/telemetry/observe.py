"""`Telemetry.observe()`: Prometheus first, Envoy's admin when it cannot answer; never raises.

Every call asks Prometheus first (at most every ``retry_s`` while it is down, so a dead
Prometheus does not add a connect timeout to every step), so the fallback ends by itself.
The observation's ``source`` and ``errors`` say what happened; when both fail every
endpoint is flagged missing (``source == "none"``): never an exception, never zeros.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace

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
        # Failed reads by source ("prometheus", "envoy-admin"; "<source>-bug" for an
        # exception that is not a TelemetryError). Read by the API's /metrics.
        self.failures: Counter[str] = Counter()
        self._prometheus_down_since: float | None = None
        self._last_prometheus_try = 0.0
        self._blind = False

    def close(self) -> None:
        self.prometheus.close()
        self.fallback.close()

    def observe(self, weights: Mapping[str, float] | None = None) -> Observation:
        errors: list[str] = []
        now = time.monotonic()
        if self._prometheus_down_since is None or now - self._last_prometheus_try >= self.retry_s:
            self._last_prometheus_try = now
            try:
                obs = self.prometheus.observe(self.cluster.name, self.addresses, self.costs, weights)
                if self._prometheus_down_since is not None:
                    log.info("Prometheus is back; leaving the Envoy admin fallback")
                self._prometheus_down_since = None
                return obs
            except TelemetryError as exc:
                self.failures["prometheus"] += 1
                errors.append(f"prometheus: {exc}")
            except Exception as exc:  # a bug in a source must not stop the control loop
                self.failures["prometheus-bug"] += 1
                log.exception("prometheus source failed unexpectedly")
                errors.append(f"prometheus: unexpected {type(exc).__name__}: {exc}")
            if self._prometheus_down_since is None:
                log.warning("Prometheus unusable (%s); trying Envoy's admin instead", errors[-1])
                self._prometheus_down_since = now
        else:
            errors.append(f"prometheus: down, next retry in {self.retry_s - (now - self._last_prometheus_try):.1f}s")
        try:
            obs = self.fallback.observe(self.cluster.name, self.addresses, self.costs, dict(weights or {}) or None)
        except TelemetryError as exc:
            self.failures["envoy-admin"] += 1
            errors.append(f"envoy-admin: {exc}")
        except Exception as exc:
            self.failures["envoy-admin-bug"] += 1
            log.exception("envoy admin source failed unexpectedly")
            errors.append(f"envoy-admin: unexpected {type(exc).__name__}: {exc}")
        else:
            if self._blind:
                log.info("telemetry back from Envoy's admin")
                self._blind = False
            return replace(obs, errors=tuple(errors) + obs.errors)
        if not self._blind:
            # Said once per episode, so "trying Envoy's admin" is never the last word.
            log.warning("telemetry blind: %s", "; ".join(errors))
            self._blind = True
        return empty_observation(self.cluster.name, self.addresses, self.costs, "none", errors)
