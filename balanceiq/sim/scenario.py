"""Scenarios: a fleet, its demand and a timeline of events, as data: one YAML file each
(format: ``balanceiq/sim/scenarios/README.md``), shipped ones loaded by name, a user's by path.
Models are frozen and refuse unknown keys like :mod:`balanceiq.config`; :func:`load_scenario`
reports every problem of a file in one :class:`ConfigError` (fields named: ``events[2].target``)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from balanceiq.config import parse_yaml, validation_problems
from balanceiq.config.base import NonBlank, NonNegFloat, PosFloat, _cross_field_error, _Model, _not_blank
from balanceiq.config.loading import _read_text
from balanceiq.exceptions import ConfigError

SCENARIOS: tuple[str, ...] = (
    "steady",
    "heterogeneous",
    "degrade",
    "failure",
    "brownout",
    "cost_shift",
    "flash_crowd",
    "many_endpoints",
)
"""Names of the scenarios shipped in ``balanceiq/sim/scenarios/``."""

EventKind = Literal["capacity", "servers", "fail", "errors", "tail_latency", "cost", "demand", "burst"]

# Kinds that act on total demand rather than on endpoints.
_DEMAND_KINDS = ("demand", "burst")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")

Multiplier = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class EndpointSpec(_Model):
    """One simulated backend: where it runs, how much it takes, what it costs ($ per million)."""

    name: str
    """Unique name and address in observations; not ``all`` or ``cloud:...`` (event targets)."""
    cloud: str
    """Cloud provider; events can target a whole cloud with ``cloud:<name>``."""
    region: NonBlank
    """Region within the cloud; informational."""
    capacity_rps: PosFloat
    """Requests per second it completes when busy (``servers`` / mean service time); load above it is shed."""
    base_latency_ms: NonNegFloat
    """Fixed delay every request adds to its service and queueing (network round trip), in ms."""
    cost_per_million: NonNegFloat
    """Price of a million requests served here, in $."""
    weight: int = Field(default=1, ge=1, strict=True)
    """Static Envoy ``load_balancing_weight``: the split before anyone decides."""
    servers: int = Field(default=1, ge=1, le=4096, strict=True)
    """Requests it serves at once (a concurrency limit); more wait in its queue (M/G/c)."""
    service_cv: float = Field(default=1.0, gt=0, le=1, strict=True, allow_inf_nan=False)
    """Coefficient of variation of the service time outside the tail (1: exponential)."""
    tail_prob: float = Field(default=0.0, ge=0, lt=1, strict=True, allow_inf_nan=False)
    """Share of requests that hold their server ``tail_ms`` (ms) longer."""
    tail_ms: NonNegFloat = 0.0
    """Extra service time of a tail request, in ms."""

    @model_validator(mode="after")
    def _check_service(self) -> EndpointSpec:
        mean_ms = 1000.0 * self.servers / self.capacity_rps
        if self.tail_prob * self.tail_ms >= mean_ms:
            why = (
                f"tail_prob x tail_ms ({self.tail_prob * self.tail_ms:g} ms) must be below the mean "
                f"service time servers / capacity_rps ({mean_ms:g} ms)"
            )
            raise _cross_field_error([(("tail_ms",), why)])
        return self

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError(
                f"endpoint name {value!r} must start with a letter or digit and use only "
                "letters, digits, '_', '.', ':' and '-'"
            )
        if value == "all" or value.startswith("cloud:"):
            raise ValueError(f"endpoint name {value!r} is reserved for event targets")
        return value

    @field_validator("cloud")
    @classmethod
    def _check_cloud(cls, value: str) -> str:
        _not_blank(value, "cloud")
        if "/" in value or ":" in value:
            raise ValueError(f"cloud {value!r} must not contain '/' or ':'")
        return value


class DemandSpec(_Model):
    """Total request rate offered to the fleet, before events."""

    base_rps: PosFloat
    """Mean total demand in requests per second."""
    diurnal_amplitude: float = Field(default=0.3, ge=0, lt=1, strict=True, allow_inf_nan=False)
    """Relative swing of the daily cycle: demand is ``base_rps * (1 + a*sin(...))``."""
    diurnal_period_s: PosFloat = 600.0
    """Length of one simulated "day" in seconds."""
    noise: NonNegFloat = 0.05
    """Relative step-to-step noise: a mean-one lognormal factor with this sigma."""
    phase: Multiplier = 0.0
    """Phase of the daily cycle in radians; 0 puts the peak at a quarter period."""


class Event(_Model):
    """Something that happens to endpoints (or to demand) from ``at_s`` for ``duration_s``."""

    at_s: NonNegFloat
    """Simulated second at which the event starts (steps starting at or after it see it)."""
    duration_s: PosFloat | None = None
    """How long it lasts in seconds; omitted or null: until the end of the run."""
    target: str
    """An endpoint name, ``cloud:<name>`` or ``all`` (the only target of demand and burst)."""
    kind: EventKind
    """Multiply ``capacity``, ``servers`` (and capacity), ``cost`` or demand (``demand``, ``burst``); ``fail``
    (fast errors); fail a ``value`` share (``errors``); add ``value`` ms to ``fraction`` (``tail_latency``)."""
    value: Multiplier
    """Multiplier (> 0; cost >= 0), extra ms for tail_latency, error share; optional for fail."""
    fraction: float = Field(default=0.1, gt=0, le=1, strict=True, allow_inf_nan=False)
    """Share of requests a tail_latency event slows down."""

    @model_validator(mode="before")
    @classmethod
    def _fail_needs_no_value(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("kind") == "fail" and "value" not in data:
            return {**data, "value": 0.0}
        return data

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        _not_blank(value, "target")
        if value.startswith("cloud:") and not value[len("cloud:") :].strip():
            raise ValueError("target 'cloud:' needs a cloud name, e.g. 'cloud:aws'")
        return value

    @model_validator(mode="after")
    def _check_value(self) -> Event:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        v, kind = self.value, self.kind
        if kind in ("capacity", "servers", "demand", "burst") and v <= 0:
            why = f"a {kind} multiplier must be > 0 (got {v}); use kind 'fail' to take an endpoint down"
            problems.append((("value",), why))
        elif kind == "cost" and v < 0:
            problems.append((("value",), f"a cost multiplier must be >= 0 (got {v})"))
        elif kind == "tail_latency" and v < 0:
            problems.append((("value",), f"tail_latency adds milliseconds and must be >= 0 (got {v})"))
        elif kind == "errors" and not 0 <= v <= 1:
            problems.append((("value",), f"errors is the share of requests that fail, 0..1 (got {v})"))
        if kind in _DEMAND_KINDS and self.target != "all":
            why = f"{kind} events change total demand and must target 'all', not {self.target!r}"
            problems.append((("target",), why))
        if problems:
            raise _cross_field_error(problems)
        return self

    @property
    def end_s(self) -> float:
        """When the event stops; ``inf`` for one that lasts to the end."""
        return float("inf") if self.duration_s is None else self.at_s + self.duration_s


class Scenario(_Model):
    """A fleet, its demand and a timeline of events: everything one simulator run needs."""

    name: str
    """Short name (the file name without ``.yaml`` when the file does not set it)."""
    description: str = ""
    """What the scenario tests, in a sentence or two."""
    step_s: PosFloat = 1.0
    """Simulated seconds per step (one telemetry window)."""
    timeout_ms: PosFloat = 2000.0
    """Longest a request waits beyond its fixed delay before it counts as answered (the client's timeout), ms."""
    duration_s: PosFloat
    """Length of a run in simulated seconds (the simulator can run past it)."""
    endpoints: list[EndpointSpec] = Field(min_length=1)
    """The fleet; names must be unique."""
    demand: DemandSpec
    """Total demand over time, before demand/burst events."""
    events: list[Event] = Field(default_factory=list)
    """Timeline of events; overlapping ones compose (multipliers multiply, delays add)."""
    seed: int = Field(default=0, ge=0, strict=True)
    """Default random seed (demand noise); a simulator's own seed overrides it."""

    @model_validator(mode="after")
    def _check_references(self) -> Scenario:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.duration_s < self.step_s:
            why = f"duration_s {self.duration_s} is shorter than one step (step_s {self.step_s})"
            problems.append((("duration_s",), why))
        first_seen: dict[str, int] = {}
        for index, endpoint in enumerate(self.endpoints):
            first = first_seen.setdefault(endpoint.name, index)
            if first != index:
                why = f"duplicate name {endpoint.name!r}: endpoints[{first}] has it too"
                problems.append((("endpoints", index, "name"), why))
        names = set(first_seen)
        clouds = sorted({e.cloud for e in self.endpoints})
        for index, event in enumerate(self.events):
            target = event.target
            if target.startswith("cloud:") and target[len("cloud:") :] not in clouds:
                why = f"no endpoint runs in cloud {target[len('cloud:') :]!r}; clouds here: {', '.join(clouds)}"
                problems.append((("events", index, "target"), why))
            elif not target.startswith("cloud:") and target != "all" and target not in names:
                close = difflib.get_close_matches(target, sorted(names), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                why = f"unknown endpoint {target!r}{hint} (use a name from endpoints, 'cloud:<name>' or 'all')"
                problems.append((("events", index, "target"), why))
            if event.at_s >= self.duration_s:
                why = f"at_s {event.at_s} is not before the end of the run (duration_s {self.duration_s})"
                problems.append((("events", index, "at_s"), why))
        if problems:
            raise _cross_field_error(problems)
        return self

    @property
    def names(self) -> list[str]:
        """Endpoint names in order."""
        return [e.name for e in self.endpoints]

    def targets(self, target: str) -> list[int]:
        """Indices of the endpoints an event target names."""
        if target == "all":
            return list(range(len(self.endpoints)))
        if target.startswith("cloud:"):
            cloud = target[len("cloud:") :]
            return [i for i, e in enumerate(self.endpoints) if e.cloud == cloud]
        return [i for i, e in enumerate(self.endpoints) if e.name == target]


def scenario_from_dict(data: Any, source: str | None = None) -> Scenario:
    """Validate parsed YAML into a :class:`Scenario`; :class:`ConfigError` lists every problem."""
    if not isinstance(data, Mapping):
        kind = "list" if isinstance(data, list) else type(data).__name__
        raise ConfigError([("", f"the top level must be a mapping of scenario keys, not a {kind}")], source)
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(list(dict.fromkeys(validation_problems(exc, Scenario))), source) from exc


def _parse(text: str, source: str, default_name: str) -> Scenario:
    data = parse_yaml(text, source, "scenario")
    if isinstance(data, Mapping) and "name" not in data:
        data = {"name": default_name, **data}
    return scenario_from_dict(data, source)


def scenario_text(name: str) -> str:
    """The YAML text of a shipped scenario (comments included)."""
    if name not in SCENARIOS:
        raise ConfigError([("", f"unknown scenario {name!r}; shipped: {', '.join(SCENARIOS)}")])
    return resources.files("balanceiq.sim").joinpath("scenarios", f"{name}.yaml").read_text(encoding="utf-8")


def load_scenario(name_or_path: str | Path | Scenario) -> Scenario:
    """A shipped scenario by name (:data:`SCENARIOS`), a scenario YAML file by path, or a
    :class:`Scenario`; :class:`ConfigError` names every problem (YAML line and column, fields)."""
    if isinstance(name_or_path, Scenario):
        return name_or_path
    path = Path(name_or_path)
    if str(name_or_path) in SCENARIOS and not path.exists():
        return _parse(scenario_text(str(name_or_path)), f"scenario {name_or_path}", str(name_or_path))
    source = str(path)
    if not path.exists() and path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        raise ConfigError(
            [("", f"no shipped scenario or file named {source!r}; shipped: {', '.join(SCENARIOS)}")], source
        )
    return _parse(_read_text(path, source), source, path.stem)
