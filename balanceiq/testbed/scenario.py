"""Live scenarios: timelines of changes to the testbed's backends, as YAML a user writes.

The simulator has its own scenario format (``balanceiq/sim/scenarios``); this one acts on
real backends through their ``POST /control``. Each event picks backends by ``cloud``,
``region`` or ``endpoint`` (one of them) and either ``set``s behaviour fields (those
``POST /control`` accepts: ``extra_latency_ms``, ``concurrency``, ``error_rate``,
``healthy``, ``cost_per_million_requests``...), multiplies the configured price by
``cost_multiplier``, or ``reset``s them to how the config started them. A price change
also goes to the controller (``PUT /api/policy`` ``costs``), the way a billing feed
would tell it; a backend's own ``/metrics`` shows it too.

Example::

    name: my_scenario
    duration_s: 120
    events:
      - {at_s: 30, name: aws slows, cloud: aws, set: {extra_latency_ms: 100}}
      - {at_s: 60, name: aws back, cloud: aws, reset: true}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from balanceiq.config import EndpointConfig, parse_yaml, validation_problems
from balanceiq.exceptions import ConfigError
from balanceiq.testbed.backend import CONTROL_FIELDS

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
            ep for ep in endpoints
            if (self.cloud is not None and ep.cloud == self.cloud)
            or (self.region is not None and ep.region == self.region)
            or (self.endpoint is not None and ep.address == self.endpoint)
        ]  # fmt: skip


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
            for i, e in enumerate(self.events) if not e.targets(endpoints)
        ]  # fmt: skip
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
            raise ConfigError([("", f"no scenario file {ref!r} and no shipped scenario of that name (shipped: {known})")])
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
