"""Telemetry.observe(): source selection, fallback, retry pacing, and never raising."""

from __future__ import annotations

import pytest

from balanceiq.config import default_settings
from balanceiq.exceptions import EnvoyAdminError, PrometheusError
from balanceiq.telemetry.observation import MISSING, EndpointObservation, Observation
from balanceiq.telemetry.observe import Telemetry


class Scripted:
    """A source whose next answers are scripted: an Observation source name or an exception."""

    def __init__(self, source: str, script: list[object]) -> None:
        self.source = source
        self.script = script
        self.calls = 0

    def observe(self, cluster: str, addresses: list[str], costs: dict, weights=None, *a, **k) -> Observation:  # type: ignore[no-untyped-def]
        self.calls += 1
        step = self.script.pop(0) if self.script else "ok"
        if isinstance(step, BaseException):
            raise step
        return Observation(cluster, tuple(EndpointObservation(a, rps=1.0) for a in addresses), self.source)  # type: ignore[arg-type]

    def close(self) -> None:
        pass


@pytest.fixture
def telemetry(monkeypatch: pytest.MonkeyPatch) -> Telemetry:
    t = Telemetry(default_settings(), retry_s=10.0)
    t.prometheus.close()
    return t


def test_prometheus_first(telemetry: Telemetry) -> None:
    telemetry.prometheus = Scripted("prometheus", [])  # type: ignore[assignment]
    telemetry.fallback = Scripted("envoy-admin", [])  # type: ignore[assignment]
    o = telemetry.observe()
    assert o.source == "prometheus" and telemetry.fallback.calls == 0  # type: ignore[attr-defined]


def test_fallback_then_paced_retry_then_automatic_return(telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("balanceiq.telemetry.observe.time.monotonic", lambda: now[0])
    prom = Scripted("prometheus", [PrometheusError("connection refused")])
    telemetry.prometheus = prom  # type: ignore[assignment]
    telemetry.fallback = Scripted("envoy-admin", [])  # type: ignore[assignment]
    o = telemetry.observe()
    assert o.source == "envoy-admin" and o.errors[0] == "prometheus: connection refused"
    now[0] += 1.0  # within retry_s: Prometheus is not asked again
    o = telemetry.observe()
    assert o.source == "envoy-admin" and prom.calls == 1 and "next retry" in o.errors[0]
    now[0] += 10.0  # retry due, and Prometheus is back
    assert telemetry.observe().source == "prometheus" and prom.calls == 2


def test_both_down_gives_flagged_missing_not_an_exception(telemetry: Telemetry) -> None:
    telemetry.prometheus = Scripted("prometheus", [PrometheusError("down")])  # type: ignore[assignment]
    telemetry.fallback = Scripted("envoy-admin", [EnvoyAdminError("also down")])  # type: ignore[assignment]
    o = telemetry.observe()
    assert o.source == "none" and len(o.errors) == 2
    assert all(e.flags == {MISSING} for e in o.endpoints)
    assert [e.address for e in o.endpoints] == telemetry.addresses


def test_unexpected_bugs_in_sources_do_not_escape(telemetry: Telemetry) -> None:
    telemetry.prometheus = Scripted("prometheus", [ZeroDivisionError("bug")])  # type: ignore[assignment]
    telemetry.fallback = Scripted("envoy-admin", [KeyError("bug")])  # type: ignore[assignment]
    o = telemetry.observe()
    assert o.source == "none" and "unexpected ZeroDivisionError" in o.errors[0]
