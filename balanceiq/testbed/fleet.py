"""The sample backends (behind their own Envoy) that LiveEnv's private mode, scenarios and load,
live evaluation and ``balanceiq record`` need: the product ships none, so the caller passes a
:class:`FleetProvider` or names a ``module:callable`` returning one (``fleet``, else
``$BALANCEIQ_FLEET``, which the repo's lab sets when its commands load)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from balanceiq.config import EndpointConfig, Settings
from balanceiq.exceptions import ConfigError

ENV_VAR = "BALANCEIQ_FLEET"


class Fleet(Protocol):
    """Started backends, ALS exporter, Envoy (``listen_url``) and, if asked, Prometheus."""

    listen_url: str
    backend_urls: dict[str, str]  # endpoint address -> the backend's base URL
    pids: list[int]

    def stop(self) -> None: ...


class Load(Protocol):
    """Bounded background load, started."""

    def stop(self, timeout: float = 10.0) -> None: ...


class Scenario(Protocol):
    """A timeline of events acting on the backends."""

    duration_s: float
    events: list[Any]

    def check_targets(self, endpoints: list[EndpointConfig]) -> None: ...
    def phase_at(self, t: float) -> str: ...


class Driver(Protocol):
    """Applies scenario events to the backends; ``restore`` undoes them all."""

    def apply(self, event: Any) -> list[str]: ...
    def restore(self) -> None: ...
    def close(self) -> None: ...


class FleetProvider(Protocol):
    def start(
        self,
        settings: Settings,
        workdir: Path,
        *,
        prometheus: bool,
        health_check_interval_s: float,
        lb_policy: str | None = None,
    ) -> Fleet: ...

    def background_load(self, url: str, rate_rps: float, concurrency: int, max_s: float) -> Load: ...

    def run_load(self, url: str, **kw: Any) -> dict[str, Any]:
        """Load until done (``total``, ``concurrency``, ``max_seconds``, ``rate_rps``, ``stop``,
        ``timeout_s``); the result's JSON (``sent``, ``ok``, ``failed``, ``rps``...)."""

    def scenario(self, ref: str) -> Scenario: ...

    def driver(
        self,
        endpoints: list[EndpointConfig],
        backend_urls: Mapping[str, str],
        on_prices: Callable[[dict[str, float]], None] | None,
    ) -> Driver: ...

    def truth(self, settings: Settings) -> dict[str, dict[str, float]]: ...


def resolve_fleet(fleet: FleetProvider | str | None, feature: str) -> FleetProvider:
    """``fleet`` itself, or what its ``module:callable`` (default ``$BALANCEIQ_FLEET``) returns."""
    ref = fleet if fleet is not None else os.environ.get(ENV_VAR) or None
    if ref is None:
        msg = (
            f"{feature} needs a fleet of sample backends: install the repo's lab (`pip install -e lab`) "
            f"and set {ENV_VAR}=balanceiq_lab.testbed.fleet:provider (or pass fleet=module:callable)"
        )
        raise ConfigError([("fleet", msg)])
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError([("fleet", f"cannot load the fleet provider {ref!r}: {exc}")]) from exc
    return factory()
