"""The settings a benchmark starts from: a config on free loopback ports, with faster loops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from balanceiq.config import Settings, default_settings
from balanceiq.testbed.ports import free_ports

# The sample config's three clouds (cloud, region, $ per million requests), for synthetic fleets.
CLOUDS = [("aws", "us-east-1", 0.40), ("gcp", "us-central1", 0.35), ("azure", "eastus", 0.55)]


def settings_on_free_ports(n_endpoints: int = 3, base: Settings | None = None) -> Settings:
    """``base`` (default settings) with ``n_endpoints`` endpoints in three clouds and every
    port (backends, xDS, Envoy admin and listener, Prometheus, ALS, API) free right now, so
    several stacks (tests, benchmarks) run side by side on one machine."""
    s = base or default_settings()
    ports = iter(free_ports(n_endpoints + 8))
    clouds = [("aws", "us-east-1"), ("gcp", "us-central1"), ("azure", "eastus")]
    template = s.clusters[0].endpoints[0]
    endpoints = [
        template.model_copy(
            update={
                "address": f"127.0.0.1:{next(ports)}",
                "cloud": clouds[i % 3][0],
                "region": clouds[i % 3][1],
                "zone": None,
            }
        )
        for i in range(n_endpoints)
    ]
    cluster = s.clusters[0].model_copy(update={"endpoints": endpoints})
    return s.model_copy(
        update={
            "clusters": [cluster],
            "xds": s.xds.model_copy(update={"port": next(ports)}),
            "envoy": s.envoy.model_copy(
                update={"admin_url": f"http://127.0.0.1:{next(ports)}", "listen_port": next(ports)}
            ),
            "prometheus": s.prometheus.model_copy(update={"url": f"http://127.0.0.1:{next(ports)}"}),
            "telemetry": s.telemetry.model_copy(update={"als_grpc_port": next(ports), "als_metrics_port": next(ports)}),
            "api": s.api.model_copy(update={"port": next(ports)}),
        }
    )


def bench_settings(
    n_endpoints: int,
    base: Settings | None = None,
    *,
    state_dir: Path | None = None,
    scrape_interval_s: float | None = None,
    window_s: float | None = None,
    stale_after_s: float | None = None,
    control_interval_s: float | None = None,
) -> Settings:
    """``base`` (default: the sample config) with ``n_endpoints`` endpoints and every port
    free right now (:func:`settings_on_free_ports`); each option given replaces that setting."""
    s = settings_on_free_ports(n_endpoints, base)
    update: dict[str, Any] = {}
    if state_dir is not None:
        update["state_dir"] = Path(state_dir)
    if scrape_interval_s is not None:
        update["prometheus"] = s.prometheus.model_copy(update={"scrape_interval_s": scrape_interval_s})
    telemetry = {k: v for k, v in (("window_s", window_s), ("stale_after_s", stale_after_s)) if v is not None}
    if telemetry:
        update["telemetry"] = s.telemetry.model_copy(update=telemetry)
    if control_interval_s is not None:
        update["control"] = s.control.model_copy(update={"interval_s": control_interval_s})
    return s.model_copy(update=update)
