"""Live scenarios: timelines of changes to the testbed's backends, as YAML a user writes.

The simulator has its own scenario format (``balanceiq/sim/scenarios``); this one acts on
real backends through their ``POST /control``. Each event picks backends by ``cloud``,
``region`` or ``endpoint`` (one of them) and either ``set``s behaviour fields (those
``POST /control`` accepts: ``extra_latency_ms``, ``concurrency``, ``error_rate``,
``healthy``, ``cost_per_million_requests``...), multiplies the configured price by
``cost_multiplier``, or ``reset``s them to how the config started them. A price change
also goes to the controller (``PUT /api/policy`` ``costs``), the way a billing feed
would tell it; a backend's own ``/metrics`` shows it too. :class:`ScenarioDriver`
applies events (the demo and ``balanceiq bench live`` share it); who hears about prices
is the caller's ``on_prices`` callback.

Example::

    name: my_scenario
    duration_s: 120
    events:
      - {at_s: 30, name: aws slows, cloud: aws, set: {extra_latency_ms: 100}}
      - {at_s: 60, name: aws back, cloud: aws, reset: true}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from balanceiq.config import EndpointConfig, Settings, parse_yaml, validation_problems
from balanceiq.exceptions import ConfigError
from balanceiq_lab.testbed.backend import CONTROL_FIELDS, BackendSettings, mean_service_ms, true_capacity_rps
from balanceiq_lab.testbed.profiles import behaviour_for

SHIPPED_DIR = Path(__file__).resolve().parent / "scenarios"
DEFAULT = "degrade_and_dearer"


class LiveEvent(BaseModel):
    """One change at one time to a set of backends."""

    model_config = ConfigDict(extra="forbid")

    at_s: float = Field(ge=0, le=86400, description="Seconds from the start of the replay.")
    name: str = Field(min_length=1, max_length=100, description="Shown in the output and plots.")
    cloud: str | None = Field(default=None, description="Every backend in this cloud.")
    region: str | None = Field(default=None, description="Every backend in this region.")
    endpoint: str | None = Field(default=None, description="One backend, host:port.")
    set: dict[str, Any] = Field(default_factory=dict, description="POST /control fields to change.")
    cost_multiplier: float | None = Field(default=None, gt=0, le=1000, description="Times the configured price.")
    reset: bool = Field(default=False, description="Back to the configured behaviour and price.")

    @model_validator(mode="after")
    def _one_target_one_action(self) -> LiveEvent:
        targets = [t for t in (self.cloud, self.region, self.endpoint) if t is not None]
        if len(targets) != 1:
            raise ValueError("name exactly one of cloud, region or endpoint")
        actions = sum([bool(self.set), self.cost_multiplier is not None, self.reset])
        if actions == 0:
            raise ValueError("give set, cost_multiplier or reset")
        unknown = sorted(set(self.set) - set(CONTROL_FIELDS))
        if unknown:
            raise ValueError(f"unknown set field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(CONTROL_FIELDS))}")
        for key, value in self.set.items():
            problem = CONTROL_FIELDS[key](value)
            if problem:
                raise ValueError(f"set.{key}: {problem}")
        return self

    def targets(self, endpoints: list[EndpointConfig]) -> list[EndpointConfig]:
        return [
            ep
            for ep in endpoints
            if (self.cloud is not None and ep.cloud == self.cloud)
            or (self.region is not None and ep.region == self.region)
            or (self.endpoint is not None and ep.address == self.endpoint)
        ]


class LiveScenario(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    description: str = ""
    duration_s: float = Field(gt=0, le=86400, description="Length of the replay in seconds.")
    events: list[LiveEvent] = Field(default_factory=list)

    @model_validator(mode="after")
    def _events_inside(self) -> LiveScenario:
        late = [e.name for e in self.events if e.at_s >= self.duration_s]
        if late:
            raise ValueError(f"event(s) at or after duration_s={self.duration_s}: {', '.join(late)}")
        self.events.sort(key=lambda e: e.at_s)
        return self

    def check_targets(self, endpoints: list[EndpointConfig]) -> None:
        """Every event must hit at least one configured backend (a typo would do nothing)."""
        problems = [
            (f"events.{i}", f"{e.name!r} matches no endpoint (clouds: {sorted({ep.cloud for ep in endpoints})})")
            for i, e in enumerate(self.events)
            if not e.targets(endpoints)
        ]
        if problems:
            raise ConfigError(problems, source=self.name)

    def phase_at(self, t: float) -> str:
        name = "start"
        for e in self.events:
            if e.at_s <= t:
                name = e.name
        return name


def load_live_scenario(name_or_path: str | Path | None = None) -> LiveScenario:
    """A shipped scenario by name, or a YAML file; ConfigError names every problem."""
    ref = str(name_or_path or DEFAULT)
    path = Path(ref)
    if not path.exists():
        shipped = SHIPPED_DIR / f"{ref}.yaml"
        if not shipped.exists():
            known = ", ".join(sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")))
            raise ConfigError(
                [("", f"no scenario file {ref!r} and no shipped scenario of that name (shipped: {known})")]
            )
        path = shipped
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror or exc}")], source=str(path)) from exc
    data = parse_yaml(text, str(path), "scenario")
    try:
        return LiveScenario.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, LiveScenario), source=str(path)) from exc


# What ``reset`` restores from each backend's state at the driver's start (not ``orca``:
# how a backend reports load is the harness's choice, not part of the scenario).
RESETTABLE = (
    "base_latency_ms",
    "jitter_ms",
    "extra_latency_ms",
    "concurrency",
    "error_rate",
    "cost_per_million_requests",
    "tail_prob",
    "tail_ms",
    "sigma",
    "healthy",
)


class ScenarioDriver:
    """Applies a live scenario's events to the backends through their ``POST /control``.

    ``endpoints`` are the configured endpoints (their ``address`` keys ``backend_urls``
    and their ``cost_per_million_requests`` is the configured price); ``on_prices`` is
    called with ``{address: new price}`` whenever an event changes prices (the demo sends
    them to the controller's API; the benchmark also books them for cost accounting).
    """

    def __init__(
        self,
        endpoints: list[EndpointConfig],
        backend_urls: dict[str, str],
        *,
        on_prices: Callable[[dict[str, float]], None] | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.endpoints = list(endpoints)
        self.backend_urls = backend_urls
        self.on_prices = on_prices
        self.http = httpx.Client(timeout=timeout_s, trust_env=False)
        self.initial: dict[str, dict[str, Any]] = {}
        try:
            for ep in self.endpoints:
                r = self.http.get(backend_urls[ep.address] + "/control")
                r.raise_for_status()
                self.initial[ep.address] = r.json()
        except BaseException:
            self.http.close()
            raise

    def apply(self, event: LiveEvent) -> list[str]:
        """Apply one event; returns the addresses it changed."""
        done = []
        prices: dict[str, float] = {}
        for ep in event.targets(self.endpoints):
            url = self.backend_urls[ep.address] + "/control"
            if event.reset:
                keep = {k: v for k, v in self.initial[ep.address].items() if k in RESETTABLE}
                self.http.post(url, json=keep).raise_for_status()
                prices[ep.address] = ep.cost_per_million_requests
            if event.set:
                self.http.post(url, json=event.set).raise_for_status()
                if "cost_per_million_requests" in event.set:
                    prices[ep.address] = float(event.set["cost_per_million_requests"])
            if event.cost_multiplier is not None:
                price = ep.cost_per_million_requests * event.cost_multiplier
                self.http.post(url, json={"cost_per_million_requests": price}).raise_for_status()
                prices[ep.address] = price
            done.append(ep.address)
        if prices and self.on_prices is not None:
            self.on_prices(prices)
        return done

    def restore(self) -> None:
        """Every backend back to how the driver found it (a ``reset`` event for each)."""
        for ep in self.endpoints:
            self.apply(LiveEvent(at_s=0, name="restore", endpoint=ep.address, reset=True))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ScenarioDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- what a scenario makes each backend be (the benchmark's oracle reads it) ---------------------


def initial_states(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each backend's behaviour and price as the testbed starts it (the first cluster's
    endpoints, keyed by address): :class:`~balanceiq_lab.testbed.backend.BackendSettings`
    defaults overlaid with the testbed profile and the configured price."""
    defaults = {f.name: f.default for f in dataclasses.fields(BackendSettings) if f.name in RESETTABLE}
    out: dict[str, dict[str, Any]] = {}
    for ep in settings.clusters[0].endpoints:
        state = {
            **defaults,
            "healthy": True,
            **behaviour_for(settings.testbed, ep),
            "cost_per_million_requests": ep.cost_per_million_requests,
        }
        out[ep.address] = state
    return out


def states_after(settings: Settings, events: list[LiveEvent]) -> dict[str, dict[str, Any]]:
    """Each backend's behaviour and price once ``events`` (in order) have been applied the
    way :class:`ScenarioDriver` applies them; keys as in :func:`initial_states`."""
    initial = initial_states(settings)
    endpoints = list(settings.clusters[0].endpoints)
    states = {a: dict(s) for a, s in initial.items()}
    for ev in events:
        for ep in ev.targets(endpoints):
            st = states[ep.address]
            if ev.reset:
                st.update(initial[ep.address])
            st.update(ev.set)
            if ev.cost_multiplier is not None:
                st["cost_per_million_requests"] = ep.cost_per_million_requests * ev.cost_multiplier
    return states


def state_truth(state: dict[str, Any]) -> dict[str, Any]:
    """True mean service time (ms, no queueing), capacity (req/s), price, error rate and
    health of one backend state (see :func:`~balanceiq_lab.testbed.backend.mean_service_ms`)."""
    mean = mean_service_ms(
        float(state["base_latency_ms"]),
        extra_latency_ms=float(state.get("extra_latency_ms", 0.0)),
        sigma=float(state.get("sigma", 0.0)),
        jitter_ms=float(state.get("jitter_ms", 1.0)),
        tail_prob=float(state.get("tail_prob", 0.0)),
        tail_ms=float(state.get("tail_ms", 0.0)),
    )
    healthy = bool(state.get("healthy", True))
    return {
        "mean_service_ms": mean,
        "capacity_rps": true_capacity_rps(int(state["concurrency"]), mean) if healthy else 0.0,
        "price": float(state["cost_per_million_requests"]),
        "error_rate": float(state.get("error_rate", 0.0)),
        "healthy": healthy,
    }


def truth_at(settings: Settings, scenario: LiveScenario, t: float) -> dict[str, dict[str, Any]]:
    """:func:`state_truth` of every backend at ``t`` seconds of the scenario's own timeline
    (every event with ``at_s <= t`` applied)."""
    states = states_after(settings, [e for e in scenario.events if e.at_s <= t])
    return {a: state_truth(s) for a, s in states.items()}
