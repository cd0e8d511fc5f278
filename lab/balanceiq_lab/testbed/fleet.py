"""The lab's sample fleet, for the product features that take one (:mod:`balanceiq.testbed.fleet`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from balanceiq.config import EndpointConfig, Settings
from balanceiq_lab.stack import Stack
from balanceiq_lab.testbed.backend import BackendSettings
from balanceiq_lab.testbed.load import LoadThread, run_load_sync
from balanceiq_lab.testbed.scenario import LiveScenario, ScenarioDriver, load_live_scenario
from balanceiq_lab.testbed.testbed import backend_specs

PROVIDER = "balanceiq_lab.testbed.fleet:provider"


class SampleFleet:
    """Sample backends, ALS exporter, Envoy and Prometheus: a :class:`~balanceiq_lab.stack.Stack`
    without its xDS server (the product feature serves xDS itself), which is the
    :class:`balanceiq.testbed.fleet.Fleet` returned."""

    def start(
        self,
        settings: Settings,
        workdir: Path,
        *,
        prometheus: bool,
        health_check_interval_s: float,
        lb_policy: str | None = None,
    ) -> Stack:
        stack = Stack(
            settings,
            workdir,
            xds=False,
            prometheus=prometheus,
            health_check_interval_s=health_check_interval_s,
            lb_policy=lb_policy,
        )
        return stack.start()

    def background_load(self, url: str, rate_rps: float, concurrency: int, max_s: float) -> LoadThread:
        return LoadThread(url, rate_rps, concurrency, max_s).start()

    def run_load(self, url: str, **kwargs: Any) -> dict[str, Any]:
        return run_load_sync(url, **kwargs).to_json()

    def scenario(self, ref: str) -> LiveScenario:
        return load_live_scenario(ref)

    def driver(
        self,
        endpoints: list[EndpointConfig],
        backend_urls: Mapping[str, str],
        on_prices: Callable[[dict[str, float]], None] | None,
    ) -> ScenarioDriver:
        return ScenarioDriver(list(endpoints), dict(backend_urls), on_prices=on_prices)

    def truth(self, settings: Settings) -> dict[str, dict[str, float]]:
        return truth_from_specs(backend_specs(settings))


def provider() -> SampleFleet:
    return SampleFleet()


def truth_from_specs(specs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The backends' configured parameters, keyed by name (= endpoint address), with the
    :class:`BackendSettings` defaults for keys a spec leaves out (the testbed does not set
    ``jitter_ms``: every backend adds U(0, 1 ms))."""
    keys = ("base_latency_ms", "concurrency", "error_rate", "jitter_ms", "extra_latency_ms", "tail_prob", "tail_ms")
    defaults = {f.name: f.default for f in dataclasses.fields(BackendSettings) if f.name in keys}
    return {str(s["name"]): {k: float(s.get(k, defaults.get(k, 0.0))) for k in keys} for s in specs}
