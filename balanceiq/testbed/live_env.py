"""LiveEnv: the CFR-RL environment on a real Envoy, real backends and real telemetry.

Same contract as :class:`~balanceiq.sim.env.FleetEnv` — observation
``encode(obs, capacity, n_max, slo)`` of shape ``(n_max, N_FEATURES)``, action K endpoint
indices (``MultiDiscrete([n_max] * k)``) — so one checkpoint trains and runs on either.
One :meth:`LiveEnv.step` is one live control decision, the way the controller makes it
(:class:`~balanceiq.control.controller.Controller`, minus lease arbitration, the rollback
monitor and guardrails, which FleetEnv does not model either):

1-2. :func:`~balanceiq.policy.decide.decide`, the controller's own decision core, with
   the action's distinct in-range indices as the policy's order: breaching, congested
   and repriced endpoints join them (``force_breaching``), the LP re-splits the critical
   endpoints against the core's capacity estimate, non-critical ones keep their share;
3. the weights are pushed over xDS and Envoy's ACK awaited;
4. ``decision_interval_s`` later the interval since the push is observed through
   :class:`~balanceiq.telemetry.observe.Telemetry`, and the reward is
   :func:`~balanceiq.policy.reward.observed_reward` of it. When no endpoint carried
   measurable traffic (telemetry blind) the step holds the weights and the reward repeats
   the last measured one (``info["reward_measured"] = False``), since blindness is not the
   policy's doing. Episodes end by truncation after ``episode_steps`` decisions.

Configured only by ``env_config`` (RLlib builds one per env runner process), validated by
:class:`LiveEnvConfig`; ``balanceiq train --env live --live-config FILE`` takes the same
keys as YAML. Nothing starts in ``__init__``: the stack comes up on the first
:meth:`~LiveEnv.reset`, so RLlib can build an env just to read its spaces for free.

Modes
-----
``private`` (default)
    Owns a whole stack: the settings of ``config`` (a balanceiq YAML) or the built-in
    6-endpoint / 3-cloud layout (:data:`DEFAULT_LAYOUT`, the sample ``balanceiq.yaml``),
    with **every** port re-allocated free (backends, xDS, Envoy listener and admin,
    Prometheus, ALS; :func:`reallocate_ports`), an in-process
    :class:`~balanceiq.xds.server.XdsServer`, the :class:`~balanceiq.testbed.testbed.Testbed`
    (backends, ALS exporter, Envoy) and a bounded load generator thread through its Envoy
    (``load_rps``, default 60). Several run side by side on one machine.
``attach``
    Drives an existing staging stack named by ``config``: weights go through the named
    xDS actor (:func:`balanceiq.xds.actor.get_actor`, in the Ray cluster this process is
    connected to; a plain process connects to ``ray_address``, never starts a cluster),
    observations come from that config's Prometheus (Envoy admin as fallback). It takes
    the controller lease for every push, so it never fights a running controller: if
    another owner holds the lease, reset/step fail with a message naming it. It starts
    and stops nothing it did not start (no load unless ``load_rps`` > 0; a ``scenario``
    changes the staging backends only if asked, and is undone). ``reset()`` and
    ``close()`` restore the weights and health that were served when it attached, and
    ``close()`` releases the lease.

Prometheus or not, per private env
----------------------------------
No Prometheus by default (``prometheus: false``): telemetry comes from Envoy's admin and
the ALS exporter, which :class:`Telemetry` falls back to, and the observation window is
then exactly the decision interval. The admin source has no saturation gauge, so capacity
comes from the decision core's estimate, as for the controller whenever Prometheus is
down. ``prometheus: true`` gives each env its own Prometheus, for runs that must see the
production observation path. CPU cost of each and step timing: BENCHMARKS.md ("LiveEnv").

Cleanup
-------
:meth:`LiveEnv.close` stops, in order, the load thread, the testbed's processes (SIGTERM,
then SIGKILL) and the xDS server, and deletes its work directory (attach mode instead
restores what it found and releases the lease); it is idempotent. The same cleanup is a
:func:`weakref.finalize`, so it also runs at interpreter exit (a Ray worker exiting
normally) and when an unclosed env is garbage-collected. Neither runs when the env runner
is SIGKILLed (Ray killing a worker, the OOM killer): for that, each private env starts a
tiny *reaper* process in its own session that holds the read end of a pipe. The kernel
closes the write end when the owner dies, however it dies; the reaper then terminates the
recorded pids (each checked against its creation time, so a recycled pid is never hit)
and deletes the work directory. Best effort: a kill during the first ~3 s of start-up,
before the pids are registered, can still leak a process.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import gymnasium as gym
import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from balanceiq.config import Settings, load_config, settings_from_dict, validation_problems
from balanceiq.exceptions import BalanceIQError, ConfigError, TestbedError, XdsError
from balanceiq.policy.baselines import PolicyContext
from balanceiq.policy.decide import CoreDecision, CoreState, Knobs, decide, envoy_weights, observe_only
from balanceiq.policy.features import N_FEATURES, encode
from balanceiq.policy.lp import critical_indices, traffic_moved, weights_to_shares
from balanceiq.policy.reward import RewardWeights, observed_reward
from balanceiq.telemetry.observation import Observation
from balanceiq.telemetry.observe import Telemetry
from balanceiq.testbed.load import run_load_sync
from balanceiq.testbed.ports import free_ports
from balanceiq.testbed.scenario import LiveEvent, LiveScenario, ScenarioDriver, load_live_scenario
from balanceiq.testbed.testbed import Testbed

log = logging.getLogger(__name__)

ENTRY_POINT = "balanceiq.testbed.live_env:LiveEnv"

# The sample balanceiq.yaml's fleet: 6 endpoints in 3 clouds, different latency, capacity
# and price, one degraded azure backend. Ports here are placeholders: private mode
# re-allocates every one of them.
DEFAULT_LAYOUT: dict[str, Any] = {
    "clusters": [
        {
            "name": "my_service",
            "endpoints": [
                {
                    "address": "127.0.0.1:18001",
                    "cloud": "aws",
                    "region": "us-east-1",
                    "zone": "us-east-1a",
                    "cost_per_million_requests": 0.40,
                    "capacity_rps": 400,
                },
                {
                    "address": "127.0.0.1:18002",
                    "cloud": "aws",
                    "region": "us-east-1",
                    "zone": "us-east-1b",
                    "cost_per_million_requests": 0.12,
                    "capacity_rps": 150,
                },
                {
                    "address": "127.0.0.1:18003",
                    "cloud": "gcp",
                    "region": "us-central1",
                    "zone": "us-central1-a",
                    "cost_per_million_requests": 0.35,
                    "capacity_rps": 350,
                },
                {
                    "address": "127.0.0.1:18004",
                    "cloud": "gcp",
                    "region": "europe-west1",
                    "zone": "europe-west1-b",
                    "cost_per_million_requests": 0.35,
                    "capacity_rps": 300,
                },
                {
                    "address": "127.0.0.1:18005",
                    "cloud": "azure",
                    "region": "eastus",
                    "zone": "eastus-1",
                    "cost_per_million_requests": 0.55,
                    "capacity_rps": 300,
                },
                {
                    "address": "127.0.0.1:18006",
                    "cloud": "azure",
                    "region": "eastus",
                    "zone": "eastus-2",
                    "cost_per_million_requests": 0.55,
                    "capacity_rps": 300,
                },
            ],
        }
    ],
    "testbed": {
        "base_latency_ms": {"aws": 15, "gcp": 25, "gcp/europe-west1": 90, "azure": 35},
        "default_latency_ms": 20,
        "concurrency": 8,
        "overrides": {"127.0.0.1:18006": {"base_latency_ms": 120, "concurrency": 4, "error_rate": 0.02}},
    },
}


# -- configuration (pure) -----------------------------------------------------------------------


class RewardConfig(BaseModel):
    """:class:`~balanceiq.policy.reward.RewardWeights` fields (defaults: the simulator's)."""

    model_config = ConfigDict(extra="forbid")

    slo_ms: float = Field(default=150.0, gt=0)
    latency: float = Field(default=1.0, ge=0)
    tail: float = Field(default=1.0, ge=0)
    errors: float = Field(default=10.0, ge=0)
    cost: float = Field(default=0.5, ge=0)
    ref_cost: float = Field(default=0.4, gt=0)

    def weights(self) -> RewardWeights:
        return RewardWeights(**self.model_dump())


class LiveEnvConfig(BaseModel):
    """Everything :class:`LiveEnv` reads from ``env_config`` (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    mode: Literal["private", "attach"] = Field(default="private", description="Own a stack, or drive a staging one.")
    config: Path | None = Field(
        default=None, description="balanceiq YAML: the private layout, or the stack to attach to."
    )
    settings: Settings | None = Field(
        default=None, description="Settings object instead of `config` (programmatic use)."
    )
    n_max: int = Field(default=16, ge=1, le=4096, description="Endpoints the observation is padded to (FleetEnv's).")
    k: int | None = Field(default=None, ge=1, description="Critical endpoints per decision (default: the config's K).")
    decision_interval_s: float = Field(default=2.0, gt=0, le=600, description="Seconds between push and observation.")
    reset_settle_s: float | None = Field(
        default=None, ge=0, le=600, description="Wait after reset (default: the interval)."
    )
    episode_steps: int = Field(default=15, ge=1, le=100000, description="Decisions per episode (then truncated).")
    load_rps: float | None = Field(
        default=None, ge=0, le=10000, description="Load through Envoy (default 60 private, 0 attach)."
    )
    load_concurrency: int = Field(default=8, ge=1, le=256)
    load_max_s: float = Field(default=86400.0, gt=0, description="The load generator's lifetime bound.")
    prometheus: bool = Field(
        default=False, description="Private mode: run a Prometheus per env (see module docstring)."
    )
    scenario: str | None = Field(default=None, description="Live scenario (name or YAML) replayed across episodes.")
    scenario_offset_s: float | None = Field(default=None, ge=0, description="Scenario time at reset (default: random).")
    scenario_speed: float = Field(default=1.0, gt=0, le=1000, description="Scenario seconds per wall-clock second.")
    cost_weight: float | None = Field(default=None, ge=0, le=100, description="LP cost term (default: the config's).")
    util_target: float | None = Field(default=None, ge=0, le=1, description="LP headroom knee (default: the config's).")
    latency_weight: float | None = Field(
        default=None, ge=0, le=100, description="LP latency term (default: the config's)."
    )
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
    from balanceiq.config import parse_yaml

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
    """``settings`` with every port taken from ``ports`` (endpoints keep host, cloud, price,
    capacity...; per-endpoint testbed overrides follow their endpoint). Also returns the
    old -> new address map, for scenario events that name an endpoint. Pure."""
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


def fast_windows(settings: Settings, interval_s: float) -> Settings:
    """Telemetry windows matched to a decision interval of ``interval_s`` seconds."""
    window = max(1.0, float(interval_s))
    return settings.model_copy(
        update={
            "prometheus": settings.prometheus.model_copy(update={"scrape_interval_s": min(0.5, window / 4)}),
            "telemetry": settings.telemetry.model_copy(update={"window_s": window, "stale_after_s": 2 * window}),
            "control": settings.control.model_copy(update={"interval_s": float(interval_s)}),
        }
    )


def live_rllib_overrides(
    base_env_config: Mapping[str, Any], live: Mapping[str, Any] | None, num_env_runners: int
) -> dict[str, dict[str, Any]]:
    """What ``balanceiq train --env live`` changes in the RLlib config.

    ``env_config``: the live file's keys, with ``n_max``, ``k``, ``cost_weight`` and
    ``reward`` taken from the simulator's env_config unless the file sets them (same spaces,
    so one checkpoint serves both). Sizes: a live step takes seconds, so fragments of 16
    steps per runner and a batch of 16 per runner: an iteration is ~16 decisions per
    runner (about 35 s at the default 2 s interval, runners in parallel)."""
    cfg = dict(live or {})
    for key in ("n_max", "k", "cost_weight", "reward"):
        if key in base_env_config and key not in cfg:
            cfg[key] = base_env_config[key]
    if "seed" in base_env_config and "seed" not in cfg:
        cfg["seed"] = base_env_config["seed"]
    LiveEnvConfig.from_env_config(cfg)  # fail early, in the driver, with field names
    runners = max(1, int(num_env_runners))
    fragment = 16
    return {
        "env_config": cfg,
        "training": {"train_batch_size_per_learner": fragment * runners, "minibatch_size": fragment, "num_epochs": 4},
        "env_runners": {"rollout_fragment_length": fragment, "num_envs_per_env_runner": 1, "sample_timeout_s": 600.0},
    }


# -- owned resources and their cleanup ------------------------------------------------------

_REAPER = r"""
import os, signal, sys, time
import psutil
procs = []
for line in sys.stdin:
    try:
        pid, created = line.split()
        procs.append(psutil.Process(int(pid)))
        if abs(procs[-1].create_time() - float(created)) > 0.01:
            procs.pop()
    except (ValueError, psutil.Error):
        pass
alive = []
for p in procs:
    try:
        p.terminate()
        alive.append(p)
    except psutil.Error:
        pass
gone, alive = psutil.wait_procs(alive, timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
psutil.wait_procs(alive, timeout=5)
if len(sys.argv) > 1:  # the owner's work directory (logs, xDS state)
    import shutil
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class Reaper:
    """Kills registered pids when this process dies, however it dies (see module docstring)."""

    def __init__(self, workdir: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _REAPER, *([str(workdir)] if workdir else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    def add(self, pid: int | None) -> None:
        if pid is None or self.proc.stdin is None or self.proc.stdin.closed:
            return
        import psutil

        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self.proc.stdin.write(f"{pid} {created}\n")
        self.proc.stdin.flush()

    def close(self, timeout: float = 10.0) -> None:
        """Closing the pipe is the signal: anything registered and still alive is stopped."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class LoadThread:
    """Bounded open-loop load through Envoy, in chunks, until stopped or ``max_s`` is up."""

    def __init__(self, url: str, rate_rps: float, concurrency: int, max_s: float, chunk_s: float = 60.0) -> None:
        self.url, self.rate, self.concurrency, self.max_s, self.chunk_s = url, rate_rps, concurrency, max_s, chunk_s
        self._stop = threading.Event()
        self.sent = 0
        self.failed = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="liveenv-load", daemon=True)

    def start(self) -> LoadThread:
        self.thread.start()
        return self

    def _run(self) -> None:
        end = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < end:
            span = min(self.chunk_s, end - time.monotonic())
            try:
                res = run_load_sync(
                    self.url,
                    total=int(self.rate * span) + self.concurrency,
                    concurrency=self.concurrency,
                    max_seconds=span,
                    rate_rps=self.rate,
                    stop=self._stop,
                    timeout_s=3.0,
                )
            except Exception as exc:  # keep trying: a live env without load sees nothing
                self.error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(1.0)
                continue
            self.sent += res.sent
            self.failed += res.failed

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout)


class LocalXds:
    """Private mode: the in-process XdsServer this env owns."""

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        from balanceiq.xds.server import XdsServer

        self.server = XdsServer(settings, state_dir=state_dir)
        self.server.start()

    def push(self, cluster: str, weights: Mapping[str, int], health: Mapping[str, str], timeout: float) -> bool:
        version = self.server.set_assignment(cluster, weights, health)
        return bool(self.server.wait_for_ack(version, None, timeout))

    def close(self) -> None:
        self.server.stop()


class ActorXds:
    """Attach mode: the named xDS actor, every push under the controller lease."""

    def __init__(self, ray_address: str, lease_ttl_s: float, timeout_s: float = 10.0) -> None:
        import ray

        from balanceiq.xds.actor import get_actor

        self.connected_here = False
        if not ray.is_initialized():
            try:
                ray.init(address=ray_address, log_to_driver=False)  # connect only: never start a cluster
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise TestbedError(f"attach mode: cannot connect to Ray at {ray_address!r}: {exc}") from exc
            self.connected_here = True
        try:
            self.handle = get_actor()
        except ValueError as exc:
            raise TestbedError(
                "attach mode: no xDS actor in this Ray cluster (start the stack with `balanceiq testbed up`, "
                f"and train on that cluster: `balanceiq train --address ...`): {exc}"
            ) from exc
        self.timeout_s = timeout_s
        self.ttl = lease_ttl_s
        self.owner = f"liveenv:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._leased: set[str] = set()  # clusters whose lease this env took

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        import ray

        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=timeout or self.timeout_s)
        except ray.exceptions.RayError as exc:
            raise XdsError(
                f"xDS actor {method}: {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"
            ) from exc

    def served(self, cluster: str) -> tuple[dict[str, int], dict[str, str]]:
        eps = self._call("status")["clusters"][cluster]["endpoints"]
        return (
            {e["address"]: int(e["weight"]) for e in eps},
            {e["address"]: ("DRAINING" if e.get("health") == "DRAINING" else "HEALTHY") for e in eps},
        )

    def push(self, cluster: str, weights: Mapping[str, int], health: Mapping[str, str], timeout: float) -> bool:
        lease = self._call("acquire_lease", self.owner, self.ttl, cluster)
        self._leased.add(cluster)
        if not lease.get("granted"):
            raise XdsError(
                f"the controller lease is held by {lease.get('holder')!r}: LiveEnv (attach) does not fight a running "
                "controller; stop it (or its loop) while training against this stack"
            )
        version = self._call("set_assignment", cluster, dict(weights), dict(health), self.owner)
        return bool(self._call("wait_for_ack", version, None, timeout, timeout=timeout + self.timeout_s))

    def close(self) -> None:
        try:
            for cluster in sorted(self._leased):
                self._call("release_lease", self.owner, cluster)
        except XdsError as exc:
            log.info("lease release failed (it expires by itself): %s", exc)
        if self.connected_here:
            import ray

            ray.shutdown()


def restore_backends(driver: ScenarioDriver) -> None:
    """Every backend back to how the driver found it (a ``reset`` event for each)."""
    for ep in driver.endpoints:
        driver.apply(LiveEvent(at_s=0, name="restore", endpoint=ep.address, reset=True))


class Owned:
    """Everything one LiveEnv started; :meth:`cleanup` stops it all, once.

    Holds no reference to the env, so it can be the env's ``weakref.finalize`` callback.
    """

    def __init__(self) -> None:
        self.workdir: Path | None = None
        self.reaper: Reaper | None = None
        self.xds: LocalXds | ActorXds | None = None
        self.testbed: Testbed | None = None
        self.load: LoadThread | None = None
        self.telemetry: Telemetry | None = None
        self.driver: ScenarioDriver | None = None  # only with a scenario
        self.restore_weights: tuple[str, dict[str, int], dict[str, str]] | None = None  # attach: what we found
        self.pids: list[int] = []
        self._lock = threading.Lock()
        self.done = False

    def cleanup(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
        steps: list[tuple[str, Any]] = [
            ("load", lambda: self.load.stop() if self.load else None),
            ("backends", lambda: restore_backends(self.driver) if self.driver else None),
            ("weights", self._restore_weights),
            ("telemetry", lambda: self.telemetry.close() if self.telemetry else None),
            ("testbed", lambda: self.testbed.stop() if self.testbed else None),
            ("xds", lambda: self.xds.close() if self.xds else None),
            ("http", lambda: self.driver.close() if self.driver else None),
            ("reaper", lambda: self.reaper.close() if self.reaper else None),
            ("workdir", lambda: shutil.rmtree(self.workdir, ignore_errors=True) if self.workdir else None),
        ]
        for what, fn in steps:
            try:
                fn()
            except Exception as exc:  # cleanup goes on: the next part must still be stopped
                log.warning("LiveEnv cleanup of %s failed: %s: %s", what, type(exc).__name__, exc)

    def _restore_weights(self) -> None:
        if self.restore_weights is not None and isinstance(self.xds, ActorXds):
            cluster, weights, health = self.restore_weights
            self.xds.push(cluster, weights, health, 2.0)


# -- the environment ---------------------------------------------------------------------------


class LiveEnv(gym.Env):
    """CFR-RL against a real Envoy; see the module docstring."""

    # gymnasium.Env declares metadata as an instance attribute; it is class-wide here.
    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}  # type: ignore[misc]

    def __init__(self, env_config: Mapping[str, Any] | None = None) -> None:
        self.cfg = LiveEnvConfig.from_env_config(env_config)
        self.worker_index = int(getattr(env_config, "worker_index", 0) or 0)
        base = self.cfg.load_settings()
        self.base_settings = base
        self.cluster_name = base.clusters[0].name
        n = len(base.clusters[0].endpoints)
        self.n_max = int(self.cfg.n_max)
        if n > self.n_max:
            raise ConfigError(
                [("n_max", f"the cluster has {n} endpoints, more than n_max={self.n_max}")], "LiveEnv env_config"
            )
        self.k = int(self.cfg.k or base.control.critical_count(n))
        self.weights_cfg = self.cfg.reward.weights()
        self.cost_weight = float(self.cfg.cost_weight if self.cfg.cost_weight is not None else base.control.cost_weight)
        self.util_target = float(self.cfg.util_target if self.cfg.util_target is not None else base.control.util_target)
        self.latency_weight = float(
            self.cfg.latency_weight if self.cfg.latency_weight is not None else base.control.latency_weight
        )
        self.scenario: LiveScenario | None = load_live_scenario(self.cfg.scenario) if self.cfg.scenario else None
        if self.scenario is not None:
            self.scenario.check_targets(list(base.clusters[0].endpoints))
        self.observation_space = gym.spaces.Box(-3.0, float(max(20, self.n_max)), (self.n_max, N_FEATURES), np.float32)
        self.action_space = gym.spaces.MultiDiscrete([self.n_max] * self.k)
        # Live traffic is not reproducible from a seed: say so (gymnasium's checker reads it).
        self.spec = gym.envs.registration.EnvSpec(
            "balanceiq/LiveEnv-v0",
            entry_point=ENTRY_POINT,
            nondeterministic=True,
            kwargs={"env_config": dict(env_config or {})},
        )
        self.settings: Settings | None = None
        self._owned = Owned()
        self._finalizer = weakref.finalize(self, Owned.cleanup, self._owned)
        self.started = False
        self.closed = False
        self.core_state = CoreState()
        self.decisions = 0
        self.total_steps = 0
        self.episodes = 0
        self._scenario_t = 0.0
        self._applied: set[int] = set()
        self._last_reward = 0.0
        self.last_obs: Observation | None = None

    # -- start-up -----------------------------------------------------------------------------

    def _start(self) -> None:
        if self.closed:
            raise TestbedError("LiveEnv is closed")
        if self.cfg.mode == "private":
            self._start_private()
        else:
            self._start_attach()
        s = self.settings
        assert s is not None
        ep = s.clusters[0].endpoints
        self.addresses = [e.address for e in ep]
        self.costs = {e.address: float(e.cost_per_million_requests) for e in ep}
        self.hint = np.array([e.capacity_rps or math.nan for e in ep], dtype=np.float64)
        self.static_weights = np.array([e.weight for e in ep], dtype=np.float64)
        self.started = True

    def _start_private(self) -> None:
        own = self._owned
        own.workdir = Path(tempfile.mkdtemp(prefix=f"balanceiq-liveenv-{self.worker_index}-"))
        own.reaper = Reaper(own.workdir)
        self._address_map: dict[str, str] = {}
        last: Exception | None = None
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            settings, mapping = reallocate_ports(self.base_settings, free_ports(ports_needed(self.base_settings)))
            settings = fast_windows(settings, self.cfg.decision_interval_s)
            settings = settings.model_copy(update={"state_dir": own.workdir / f"state{attempt}"})
            try:
                own.xds = LocalXds(settings, own.workdir / f"state{attempt}")
                tb = Testbed(
                    settings,
                    own.workdir / f"tb{attempt}",
                    prometheus=self.cfg.prometheus,
                    health_check_interval_s=self.cfg.health_check_interval_s,
                )
                own.testbed = tb
                tb.start()
            except (BalanceIQError, OSError) as exc:
                last = exc
                log.warning("LiveEnv start attempt %d failed (%s); retrying on other ports", attempt + 1, exc)
                if own.testbed is not None:
                    own.testbed.stop()
                    own.testbed = None
                if own.xds is not None:
                    own.xds.close()
                    own.xds = None
                continue
            for part in (tb.backends, tb.als, tb.envoy, tb.prometheus):
                pid = part.pid if part is not None else None
                if pid is not None:
                    own.pids.append(pid)
                    own.reaper.add(pid)
            self.settings = settings
            self._address_map = mapping
            break
        else:
            raise TestbedError(f"LiveEnv: could not start a private testbed: {last}")
        assert own.testbed is not None
        # No Prometheus: it is asked once (connection refused, ~1 ms), then never again.
        own.telemetry = Telemetry(self.settings, retry_s=5.0 if self.cfg.prometheus else 1e9)
        if self.scenario is not None:
            urls = dict(zip([b["name"] for b in own.testbed.backends.specs], own.testbed.backends.urls))
            own.driver = ScenarioDriver(
                list(self.settings.clusters[0].endpoints), urls, on_prices=self._prices_callback()
            )
        if self.cfg.rps > 0:
            own.load = LoadThread(
                own.testbed.envoy.listen_url, self.cfg.rps, self.cfg.load_concurrency, self.cfg.load_max_s
            ).start()

    def _start_attach(self) -> None:
        own = self._owned
        s = self.base_settings
        own.xds = ActorXds(self.cfg.ray_address, lease_ttl_s=max(3 * self.cfg.decision_interval_s, 10.0))
        weights, health = own.xds.served(self.cluster_name)
        own.restore_weights = (self.cluster_name, weights, health)
        self.settings = s
        self._address_map = {}
        # The stack's Prometheus scrapes at its own pace; the rate window follows the
        # decision interval but spans at least 4 of its scrapes.
        tel = s.telemetry.model_copy(
            update={
                "window_s": max(self.cfg.decision_interval_s, 4 * s.prometheus.scrape_interval_s),
                "stale_after_s": max(2 * self.cfg.decision_interval_s, s.telemetry.stale_after_s),
            }
        )
        own.telemetry = Telemetry(s.model_copy(update={"telemetry": tel}))
        if self.scenario is not None:
            own.driver = ScenarioDriver(
                list(s.clusters[0].endpoints),
                {e.address: f"http://{e.address}" for e in s.clusters[0].endpoints},
                on_prices=self._prices_callback(),
            )
        if self.cfg.rps > 0:
            own.load = LoadThread(
                f"http://{s.envoy.listen_host}:{s.envoy.listen_port}",
                self.cfg.rps,
                self.cfg.load_concurrency,
                self.cfg.load_max_s,
            ).start()

    # -- pieces --------------------------------------------------------------------------------

    @property
    def owned_pids(self) -> list[int]:
        """Processes this env started (private mode), for leak checks."""
        pids = list(self._owned.pids)
        if self._owned.reaper is not None:
            pids.append(self._owned.reaper.proc.pid)
        return pids

    def describe(self) -> dict[str, Any]:
        """Where this env's stack is (JSON-friendly)."""
        s = self.settings
        out: dict[str, Any] = {
            "mode": self.cfg.mode,
            "worker_index": self.worker_index,
            "pid": os.getpid(),
            "steps": self.total_steps,
            "episodes": self.episodes,
        }
        if s is not None:
            out.update(
                envoy_admin=s.envoy.admin_url,
                listen_port=s.envoy.listen_port,
                xds_port=s.xds.port,
                endpoints=[e.address for e in s.clusters[0].endpoints],
            )
        if self._owned.load is not None:
            out["load_sent"] = self._owned.load.sent  # requests of finished (60 s) load chunks
        return out

    def _observe(self, weights: Mapping[str, int]) -> Observation:
        tel = self._owned.telemetry
        assert tel is not None
        obs = tel.observe({a: float(w) for a, w in weights.items()})
        eps = tuple(replace(e, cost_per_million=self.costs.get(e.address, e.cost_per_million)) for e in obs.endpoints)
        return replace(obs, endpoints=eps)

    def _knobs(self, k: int | None = None) -> Knobs:
        return Knobs(
            k=self.k if k is None else k,
            slo_ms=self.weights_cfg.slo_ms,
            cost_weight=self.cost_weight,
            util_target=self.util_target,
            latency_weight=self.latency_weight,
            force_breaching=self.cfg.force_breaching,
        )

    def _context(self, obs: Observation) -> PolicyContext:
        rps = np.array([e.rps for e in obs.endpoints], dtype=np.float64)
        demand = float(np.nansum(np.where(np.isfinite(rps), rps, 0.0)))
        return PolicyContext(self.shares, self.hint, self.static_weights, demand, self.k)

    def _capacity(self, obs: Observation) -> np.ndarray:
        est, _ = observe_only(obs, self._context(obs), self._knobs(), self.core_state)
        return est.capacity

    def _decide(self, picked: list[int], obs: Observation) -> CoreDecision:
        """The decision core (the controller's) with the agent's picks as the policy's order."""
        scores = np.full(len(obs.endpoints), -np.inf)
        scores[picked] = len(picked) - np.arange(len(picked), dtype=np.float64)
        return decide(obs, self._context(obs), scores, self._knobs(max(1, len(picked))), self.core_state)

    def _encode(self, obs: Observation) -> np.ndarray:
        return encode(obs, self._capacity(obs), self.n_max, self.weights_cfg.slo_ms)

    @property
    def shares(self) -> np.ndarray:
        return weights_to_shares(
            [self.weights[a] for a in self.addresses], [self.health[a] != "DRAINING" for a in self.addresses]
        )

    def _push(self, weights: Mapping[str, int], health: Mapping[str, str]) -> bool:
        xds = self._owned.xds
        assert xds is not None
        acked = xds.push(self.cluster_name, weights, health, timeout=min(2.0, self.cfg.decision_interval_s))
        self.weights, self.health = dict(weights), dict(health)
        return acked

    def critical_from_action(self, action: Any) -> list[int]:
        return critical_indices(action, len(self.addresses) if self.started else self.n_max)

    def _critical(self, action: Any, obs: Observation) -> tuple[list[int], list[int]]:
        core = self._decide(self.critical_from_action(action), obs)
        return list(core.critical), list(core.forced)

    def _prices_callback(self) -> Any:
        # Weak: the driver belongs to Owned, which must not keep the env alive (finalizer).
        ref = weakref.WeakMethod(self.costs_changed)

        def on_prices(prices: dict[str, float]) -> None:
            method = ref()
            if method is not None:
                method(prices)

        return on_prices

    def costs_changed(self, prices: Mapping[str, float]) -> None:
        """Price events reach the observation's cost column (a billing feed, for the controller)."""
        self.costs.update({a: float(p) for a, p in prices.items()})

    def _advance_scenario(self, t: float) -> list[str]:
        """Apply scenario events with ``at_s <= t`` not applied yet; returns their names."""
        driver = self._owned.driver
        if self.scenario is None or driver is None:
            return []
        done = []
        for i, ev in enumerate(self.scenario.events):
            if i in self._applied or ev.at_s > t:
                continue
            self._applied.add(i)
            if ev.endpoint is not None:  # private mode moved every endpoint to a free port
                ev = ev.model_copy(update={"endpoint": self._address_map.get(ev.endpoint, ev.endpoint)})
            driver.apply(ev)
            done.append(ev.name)
        return done

    def _info(self, obs: Observation, r: float | None) -> dict[str, Any]:
        rows = [e for e in obs.endpoints if math.isfinite(e.rps) and e.rps > 0 and math.isfinite(e.p95_ms)]
        rps = float(sum(e.rps for e in rows))
        agg = lambda f: float(sum(e.rps * f(e) for e in rows) / rps) if rps > 0 else float("nan")  # noqa: E731
        return {
            "reward_measured": r is not None,
            "source": obs.source,
            "rps": float(np.nansum([e.rps for e in obs.endpoints])),
            "p95_ms": agg(lambda e: e.p95_ms),
            "error_rate": agg(lambda e: e.error_rate if math.isfinite(e.error_rate) else 0.0),
            "cost_per_million": agg(lambda e: self.costs.get(e.address, 0.0)),
            "weights": [int(self.weights[a]) for a in self.addresses],
            "worker_index": self.worker_index,
            "listen_port": self.settings.envoy.listen_port if self.settings else None,
        }

    # -- gymnasium API --------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is None and not self.episodes:
            seed = self.cfg.seed + 1000 * self.worker_index  # env runners differ, runs repeat
        super().reset(seed=seed)
        first = not self.started
        if first:
            try:
                self._start()
            except BaseException:
                self.close()
                raise
        own = self._owned
        t0 = time.monotonic()
        assert self.settings is not None
        if own.driver is not None:
            restore_backends(own.driver)
        self.costs = {e.address: float(e.cost_per_million_requests) for e in self.settings.clusters[0].endpoints}
        if own.restore_weights is not None:
            _, weights, health = own.restore_weights
        else:
            weights = {a: int(w) for a, w in zip(self.addresses, self.static_weights)}
            health = dict.fromkeys(self.addresses, "HEALTHY")
        acked = self._push(weights, health)
        self._applied = set()
        events: list[str] = []
        if self.scenario is not None:
            off = self.cfg.scenario_offset_s
            self._scenario_t = float(off if off is not None else self.np_random.uniform(0, self.scenario.duration_s))
            events = self._advance_scenario(self._scenario_t)
        self._observe(self.weights)  # the window of the first observation starts here
        settle = self.cfg.reset_settle_s if self.cfg.reset_settle_s is not None else self.cfg.decision_interval_s
        time.sleep(max(0.0, settle - (time.monotonic() - t0)))
        obs = self._observe(self.weights)
        if first:
            deadline = time.monotonic() + self.cfg.warmup_timeout_s
            while not any(e.usable for e in obs.endpoints) and self.cfg.rps > 0 and time.monotonic() < deadline:
                time.sleep(min(1.0, self.cfg.decision_interval_s))
                obs = self._observe(self.weights)
        self.last_obs = obs
        r = observed_reward(obs, self.weights_cfg)
        self._last_reward = float(r) if r is not None else self._last_reward
        self.core_state = CoreState()
        self.decisions = 0
        self.episodes += 1
        info = self._info(obs, r)
        info.update(
            acked=acked,
            reset_s=round(time.monotonic() - t0, 3),
            scenario_t=self._scenario_t,
            scenario_events=events,
            phase=self.scenario.phase_at(self._scenario_t) if self.scenario else None,
        )
        return self._encode(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.started or self.last_obs is None:
            raise RuntimeError("LiveEnv: reset() first")
        t0 = time.monotonic()
        obs = self.last_obs
        core = self._decide(self.critical_from_action(action), obs)
        critical, forced = list(core.critical), list(core.forced)
        before = self.shares
        held = obs.source == "none" or not any(e.usable for e in obs.endpoints)
        lp_status: str | None = None
        if held or not critical:
            acked: bool | None = None
        else:
            self.core_state = core.state
            decision = core
            lp_status = core.lp_status
            # Realised under the testbed's balancer as the controller does (LEAST_REQUEST:
            # weights that make up for Envoy's weight / (active + 1)).
            assert self.settings is not None
            demand = float(np.nansum([e.rps for e in obs.endpoints if math.isfinite(e.rps)]))
            weights = envoy_weights(
                core.shares,
                self.addresses,
                core.state,
                demand,
                self.settings.envoy.lb_policy,
                available=np.array([e.healthy is not False for e in obs.endpoints]),
            )
            decision = replace(core, weights=weights)
            new = {a: int(w) for a, w in zip(self.addresses, decision.weights)}
            acked = self._push(new, self.health)
        t_push = time.monotonic()
        events: list[str] = []
        if self.scenario is not None:
            self._scenario_t += self.cfg.decision_interval_s * self.cfg.scenario_speed
            events = self._advance_scenario(self._scenario_t)
        self._observe(self.weights)  # the window starts at the push
        time.sleep(max(0.0, self.cfg.decision_interval_s - (time.monotonic() - t_push)))
        obs = self._observe(self.weights)
        self.last_obs = obs
        r = observed_reward(obs, self.weights_cfg)
        if r is not None:
            self._last_reward = float(r)
        self.decisions += 1
        self.total_steps += 1
        truncated = self.decisions >= self.cfg.episode_steps
        info = self._info(obs, r)
        info.update(
            critical=critical,
            forced=forced,
            held=held,
            lp_status=lp_status,
            acked=acked,
            moved=float(traffic_moved(before, self.shares)),
            step_s=round(time.monotonic() - t0, 3),
            scenario_t=self._scenario_t,
            scenario_events=events,
            phase=self.scenario.phase_at(self._scenario_t) if self.scenario else None,
        )
        return self._encode(obs), float(self._last_reward), False, bool(truncated), info

    def close(self) -> None:
        """Stop everything this env started (idempotent); attach mode restores and lets go."""
        self.closed = True
        self._finalizer()
