"""LiveEnv's configuration: the ``env_config`` keys, the built-in layout, port re-allocation."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from balanceiq.config import Settings, load_config, parse_yaml, settings_from_dict, validation_problems
from balanceiq.exceptions import ConfigError
from balanceiq.testbed.fleet import ENV_VAR

# The sample fleet (6 endpoints, 3 clouds); private mode re-allocates its ports.
DEFAULT_LAYOUT: dict[str, Any] = yaml.safe_load(
    resources.files("balanceiq").joinpath("data", "live_layout.yaml").read_text(encoding="utf-8")
)


class RewardConfig(BaseModel):
    """:class:`~balanceiq.policy.reward.RewardWeights` fields (defaults: the simulator's)."""

    model_config = ConfigDict(extra="forbid")

    slo_ms: float = Field(default=150.0, gt=0)
    latency: float = Field(default=1.0, ge=0)
    tail: float = Field(default=1.0, ge=0)
    errors: float = Field(default=10.0, ge=0)
    cost: float = Field(default=0.5, ge=0)
    ref_cost: float = Field(default=0.4, gt=0)


class LiveEnvConfig(BaseModel):
    """Everything :class:`LiveEnv` reads from ``env_config`` (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    mode: Literal["private", "attach"] = Field(default="private", description="Own a stack, or drive a staging one.")
    config: Path | None = Field(default=None, description="balanceiq YAML: the private layout, or the stack to drive.")
    settings: Settings | None = Field(default=None, description="Settings object instead of `config` (programmatic).")
    n_max: int = Field(default=16, ge=1, le=4096, description="Endpoints the observation is padded to (FleetEnv's).")
    k: int | None = Field(default=None, ge=1, description="Critical endpoints per decision (default: the config's K).")
    decision_interval_s: float = Field(default=2.0, gt=0, le=600, description="Seconds between push and observation.")
    reset_settle_s: float | None = Field(default=None, ge=0, le=600, description="Wait after reset (default: interval)")
    episode_steps: int = Field(default=15, ge=1, le=100000, description="Decisions per episode (then truncated).")
    load_rps: float | None = Field(default=None, ge=0, le=10000, description="Load via Envoy (60 private, 0 attach).")
    load_concurrency: int = Field(default=8, ge=1, le=256)
    load_max_s: float = Field(default=86400.0, gt=0, description="The load generator's lifetime bound.")
    prometheus: bool = Field(default=False, description="Private mode: a Prometheus per env (else Envoy admin + ALS).")
    scenario: str | None = Field(default=None, description="Live scenario (name or YAML) replayed across episodes.")
    fleet: Any = Field(default=None, description="Sample fleet provider, module:callable (default: $BALANCEIQ_FLEET).")
    scenario_offset_s: float | None = Field(default=None, ge=0, description="Scenario time at reset (default: random).")
    scenario_speed: float = Field(default=1.0, gt=0, le=1000, description="Scenario seconds per wall-clock second.")
    cost_weight: float | None = Field(default=None, ge=0, le=100, description="LP cost term (default: the config's).")
    util_target: float | None = Field(default=None, ge=0, le=1, description="LP headroom knee (default: the config's).")
    latency_weight: float | None = Field(default=None, ge=0, le=100, description="LP latency term (default: config's).")
    force_breaching: bool = Field(default=True, description="SLO breachers are always critical, as in the controller.")
    reward: RewardConfig = Field(default_factory=RewardConfig)
    warmup_timeout_s: float = Field(default=30.0, gt=0, le=600, description="First reset: wait this long for traffic.")
    health_check_interval_s: float = Field(default=5.0, gt=0, le=600)
    ray_address: str = Field(default="auto", description="Attach mode, outside Ray: the cluster to connect to.")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> LiveEnvConfig:
        if self.config is not None and self.settings is not None:
            raise ValueError("give config or settings, not both")
        if self.mode == "attach" and self.config is None and self.settings is None:
            raise ValueError("attach mode needs config: the balanceiq YAML of the stack to drive")
        return self

    @classmethod
    def from_env_config(cls, env_config: Mapping[str, Any] | None) -> LiveEnvConfig:
        data = dict(env_config or {})
        data.pop("num_envs", None)  # RLlib adds it for vectorised entry points
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(validation_problems(exc, cls), source="LiveEnv env_config") from exc

    def load_settings(self) -> Settings:
        if self.settings is not None:
            return self.settings
        if self.config is not None:
            return load_config(self.config)
        return settings_from_dict(DEFAULT_LAYOUT, "LiveEnv built-in layout")

    @property
    def rps(self) -> float:
        return self.load_rps if self.load_rps is not None else (60.0 if self.mode == "private" else 0.0)


def load_live_env_config(path: str | Path) -> dict[str, Any]:
    """A ``--live-config`` YAML -> the env_config dict (validated; ConfigError names fields)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror or exc}")], source=str(path)) from exc
    data = parse_yaml(text, str(path), "LiveEnv config") or {}
    if not isinstance(data, dict):
        raise ConfigError([("", "the top level must be a mapping of LiveEnv settings")], source=str(path))
    if "settings" in data:
        raise ConfigError([("settings", "not allowed in a file; name a balanceiq YAML with config")], source=str(path))
    if isinstance(data.get("config"), str) and not Path(data["config"]).is_absolute():
        data["config"] = str((path.absolute().parent / data["config"]).resolve())
    try:
        LiveEnvConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, LiveEnvConfig), source=str(path)) from exc
    return data


def ports_needed(settings: Settings) -> int:
    """Ports :func:`reallocate_ports` consumes: every endpoint, xDS, Envoy x2, Prometheus, ALS x2."""
    return sum(len(c.endpoints) for c in settings.clusters) + 6


def reallocate_ports(settings: Settings, ports: Iterable[int]) -> tuple[Settings, dict[str, str]]:
    """``settings`` with every port taken from ``ports`` (testbed overrides follow their
    endpoint), and the old -> new address map for scenario events that name an endpoint."""
    it: Iterator[int] = iter(ports)

    def take() -> int:
        try:
            return int(next(it))
        except StopIteration:
            raise ValueError(f"reallocate_ports needs {ports_needed(settings)} ports") from None

    mapping: dict[str, str] = {}
    clusters = []
    for c in settings.clusters:
        eps = []
        for ep in c.endpoints:
            host = f"[{ep.host}]" if ":" in ep.host else ep.host
            new = f"{host}:{take()}"
            mapping[ep.address] = new
            eps.append(ep.model_copy(update={"address": new}))
        clusters.append(c.model_copy(update={"endpoints": eps}))
    overrides = {mapping.get(a, a): p for a, p in settings.testbed.overrides.items()}
    admin = httpx.URL(settings.envoy.admin_url)
    prom = httpx.URL(settings.prometheus.url)
    out = settings.model_copy(
        update={
            "clusters": clusters,
            "testbed": settings.testbed.model_copy(update={"overrides": overrides}),
            "xds": settings.xds.model_copy(update={"port": take()}),
            "envoy": settings.envoy.model_copy(
                update={"admin_url": str(admin.copy_with(port=take())).rstrip("/"), "listen_port": take()}
            ),
            "prometheus": settings.prometheus.model_copy(update={"url": str(prom.copy_with(port=take())).rstrip("/")}),
            "telemetry": settings.telemetry.model_copy(update={"als_grpc_port": take(), "als_metrics_port": take()}),
        }
    )
    # Re-validate: a clash (two endpoints on one port) must fail here, not in Envoy.
    return settings_from_dict(out.model_dump(), "LiveEnv re-allocated ports"), mapping


def with_windows(settings: Settings, window_s: float, stale_after_s: float, scrape_s: float | None = None) -> Settings:
    """``settings`` with this telemetry window and staleness (and Prometheus scrape interval)."""
    update: dict[str, Any] = {
        "telemetry": settings.telemetry.model_copy(update={"window_s": window_s, "stale_after_s": stale_after_s})
    }
    if scrape_s is not None:
        update["prometheus"] = settings.prometheus.model_copy(update={"scrape_interval_s": scrape_s})
    return settings.model_copy(update=update)


def fast_windows(settings: Settings, interval_s: float) -> Settings:
    """Telemetry windows matched to a decision interval of ``interval_s`` seconds."""
    window = max(1.0, float(interval_s))
    out = with_windows(settings, window, 2 * window, min(0.5, window / 4))
    return out.model_copy(update={"control": settings.control.model_copy(update={"interval_s": float(interval_s)})})


def live_rllib_overrides(
    base_env_config: Mapping[str, Any], live: Mapping[str, Any] | None, num_env_runners: int
) -> dict[str, dict[str, Any]]:
    """``balanceiq train --env live``'s RLlib changes: the live file as ``env_config`` (``n_max``,
    ``k``, ``cost_weight``, ``reward``, ``seed`` from the simulator's unless set: one checkpoint
    serves both), and small batches (16 steps per runner: a live step takes seconds)."""
    cfg = dict(live or {})
    for key in ("n_max", "k", "cost_weight", "reward", "seed"):
        if key in base_env_config and key not in cfg:
            cfg[key] = base_env_config[key]
    if "fleet" not in cfg and os.environ.get(ENV_VAR):
        cfg["fleet"] = os.environ[ENV_VAR]  # env runners on a running cluster do not inherit it
    LiveEnvConfig.from_env_config(cfg)  # fail early, in the driver, with field names
    runners = max(1, int(num_env_runners))
    fragment = 16
    return {
        "env_config": cfg,
        "training": {"train_batch_size_per_learner": fragment * runners, "minibatch_size": fragment, "num_epochs": 4},
        "env_runners": {"rollout_fragment_length": fragment, "num_envs_per_env_runner": 1, "sample_timeout_s": 600.0},
    }
