"""The settings a benchmark starts from: a config on free loopback ports, with faster loops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from balanceiq.config import Settings
from balanceiq.testbed.ports import settings_on_free_ports

# The sample config's three clouds (cloud, region, $ per million requests), for synthetic fleets.
CLOUDS = [("aws", "us-east-1", 0.40), ("gcp", "us-central1", 0.35), ("azure", "eastus", 0.55)]


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
    free right now (:func:`~balanceiq.testbed.ports.settings_on_free_ports`); each option
    given replaces that setting."""
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
