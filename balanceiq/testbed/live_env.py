"""LiveEnv: the CFR-RL environment on a real Envoy, real backends and real telemetry.

Same spaces as :class:`~balanceiq.sim.env.FleetEnv`, so one checkpoint trains and runs on
either. A step is one live control decision made by the controller's decision core
(:func:`~balanceiq.policy.decide.decide`, the action's picks as the policy's order); the
weights are pushed over xDS and the reward is observed one ``decision_interval_s`` later.
When telemetry is blind the step holds the weights and repeats the last reward
(``info["reward_measured"] = False``): blindness is not the policy's doing.

Modes: ``private`` owns a whole stack on free ports (backends, ALS, Envoy, optionally
Prometheus, an in-process xDS server and a load thread); ``attach`` drives an existing
stack through the named xDS actor under the controller lease, and restores the weights
and health it found on reset and close. Nothing starts before the first :meth:`~LiveEnv.reset`,
so RLlib can build an env just to read its spaces. :meth:`LiveEnv.close` (also a
:func:`weakref.finalize`) stops everything; a :class:`~balanceiq.testbed.reaper.Reaper`
covers an env runner that is SIGKILLed. CPU cost and step timing: BENCHMARKS.md ("LiveEnv").
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from balanceiq.config import Settings
from balanceiq.exceptions import BalanceIQError, ConfigError, TestbedError
from balanceiq.policy.baselines import PolicyContext
from balanceiq.policy.decide import CoreDecision, decide, envoy_weights, observe_only
from balanceiq.policy.features import N_FEATURES, encode
from balanceiq.policy.knobs import Knobs
from balanceiq.policy.lp import critical_indices, traffic_moved, weights_to_shares
from balanceiq.policy.memory import CoreState
from balanceiq.policy.reward import observed_reward
from balanceiq.telemetry.observation import Observation
from balanceiq.telemetry.observe import Telemetry
from balanceiq.testbed.fleet import Driver, Fleet, FleetProvider, Load, Scenario, resolve_fleet
from balanceiq.testbed.live_config import (  # the config's names stay importable from here
    DEFAULT_LAYOUT,
    LiveEnvConfig,
    RewardConfig,
    fast_windows,
    live_rllib_overrides,
    load_live_env_config,
    ports_needed,
    reallocate_ports,
)
from balanceiq.testbed.live_xds import ActorXds, LocalXds
from balanceiq.testbed.ports import free_ports
from balanceiq.testbed.reaper import Reaper

__all__ = ["DEFAULT_LAYOUT", "LiveEnv", "LiveEnvConfig", "RewardConfig", "fast_windows", "live_rllib_overrides"]
__all__ += ["ActorXds", "LocalXds", "Reaper", "load_live_env_config", "ports_needed", "reallocate_ports"]

log = logging.getLogger(__name__)

ENTRY_POINT = "balanceiq.testbed.live_env:LiveEnv"


class Owned:
    """Everything one LiveEnv started; :meth:`cleanup` stops it all, once. Holds no
    reference to the env, so it can be the env's ``weakref.finalize`` callback."""

    def __init__(self) -> None:
        self.workdir: Path | None = None
        self.reaper: Reaper | None = None
        self.xds: LocalXds | ActorXds | None = None
        self.fleet: Fleet | None = None
        self.load: Load | None = None
        self.telemetry: Telemetry | None = None
        self.driver: Driver | None = None  # only with a scenario
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
            ("backends", lambda: self.driver.restore() if self.driver else None),
            ("weights", self._restore_weights),
            ("telemetry", lambda: self.telemetry.close() if self.telemetry else None),
            ("testbed", lambda: self.fleet.stop() if self.fleet else None),
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
        self._fleet: FleetProvider | None = None
        self.scenario: Scenario | None = self.fleet.scenario(self.cfg.scenario) if self.cfg.scenario else None
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
                own.fleet = self.fleet.start(
                    settings,
                    own.workdir / f"tb{attempt}",
                    prometheus=self.cfg.prometheus,
                    health_check_interval_s=self.cfg.health_check_interval_s,
                )
            except (BalanceIQError, OSError) as exc:
                last = exc
                log.warning("LiveEnv start attempt %d failed (%s); retrying on other ports", attempt + 1, exc)
                if own.xds is not None:
                    own.xds.close()
                    own.xds = None
                continue
            for pid in own.fleet.pids:
                own.pids.append(pid)
                own.reaper.add(pid)
            self.settings = settings
            self._address_map = mapping
            break
        else:
            raise TestbedError(f"LiveEnv: could not start a private testbed: {last}")
        assert own.fleet is not None
        # No Prometheus: it is asked once (connection refused, ~1 ms), then never again.
        own.telemetry = Telemetry(self.settings, retry_s=5.0 if self.cfg.prometheus else 1e9)
        if self.scenario is not None:
            endpoints = list(self.settings.clusters[0].endpoints)
            own.driver = self.fleet.driver(endpoints, own.fleet.backend_urls, self._prices_callback())
        if self.cfg.rps > 0:
            own.load = self.fleet.background_load(
                own.fleet.listen_url, self.cfg.rps, self.cfg.load_concurrency, self.cfg.load_max_s
            )

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
            endpoints = list(s.clusters[0].endpoints)
            urls = {e.address: f"http://{e.address}" for e in endpoints}
            own.driver = self.fleet.driver(endpoints, urls, self._prices_callback())
        if self.cfg.rps > 0:
            url = f"http://{s.envoy.listen_host}:{s.envoy.listen_port}"
            own.load = self.fleet.background_load(url, self.cfg.rps, self.cfg.load_concurrency, self.cfg.load_max_s)

    # -- pieces --------------------------------------------------------------------------------

    @property
    def fleet(self) -> FleetProvider:
        """The sample fleet (private mode, scenarios, load), resolved on first use."""
        if self._fleet is None:
            self._fleet = resolve_fleet(self.cfg.fleet, "LiveEnv (private mode, a scenario or load)")
        return self._fleet

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
            own.driver.restore()
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
            lp_status = core.lp_status
            # Realised under the testbed's balancer as the controller does (LEAST_REQUEST:
            # weights that make up for Envoy's weight / (active + 1)).
            assert self.settings is not None
            demand = float(np.nansum([e.rps for e in obs.endpoints if math.isfinite(e.rps)]))
            available = np.array([e.healthy is not False for e in obs.endpoints])
            lb = self.settings.envoy.lb_policy
            weights = envoy_weights(core.shares, self.addresses, core.state, demand, lb, available=available)
            acked = self._push({a: int(w) for a, w in zip(self.addresses, weights)}, self.health)
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
