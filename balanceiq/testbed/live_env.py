"""LiveEnv: the CFR-RL environment on a real Envoy, backends and telemetry, with :class:`~balanceiq.sim.env.FleetEnv`'s
spaces (one checkpoint trains and runs on either). A step is one decision of the controller's core (the action's picks
as the policy's order), pushed over xDS; its reward is observed one ``decision_interval_s`` later, or repeated when
telemetry is blind (``info["reward_measured"]``). ``private`` mode owns a whole stack on free ports; ``attach`` drives
an existing one through the xDS actor under the controller lease and restores the weights it found. Nothing starts
before the first reset (RLlib builds envs to read their spaces). CPU cost and timing: BENCHMARKS.md."""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import gymnasium as gym
import numpy as np

from balanceiq.config import Settings
from balanceiq.exceptions import BalanceIQError, ConfigError, TestbedError, XdsError
from balanceiq.policy.baselines import PolicyContext
from balanceiq.policy.decide import decide, envoy_weights, observe_only
from balanceiq.policy.features import N_FEATURES, encode
from balanceiq.policy.knobs import Knobs
from balanceiq.policy.lp import critical_indices, traffic_moved, weights_to_shares
from balanceiq.policy.memory import CoreState
from balanceiq.policy.reward import RewardWeights, observed_reward
from balanceiq.telemetry.observation import Observation
from balanceiq.telemetry.observe import Telemetry
from balanceiq.testbed.fleet import Driver, Fleet, FleetProvider, Load, Scenario, resolve_fleet
from balanceiq.testbed.live_config import LiveEnvConfig, fast_windows, ports_needed, reallocate_ports, with_windows
from balanceiq.testbed.ports import free_ports
from balanceiq.testbed.reaper import Reaper
from balanceiq.xds.client import ActorXdsClient, LocalXdsClient, served

if TYPE_CHECKING:
    from balanceiq.xds.server import XdsServer

log = logging.getLogger(__name__)


class Owned:
    """Everything one LiveEnv started; :meth:`cleanup` stops it all, once. Holds no
    reference to the env, so it can be the env's ``weakref.finalize`` callback."""

    def __init__(self) -> None:
        self.workdir: Path | None = None
        self.reaper: Reaper | None = None  # covers an env runner that is SIGKILLed
        self.xds: LocalXdsClient | ActorXdsClient | None = None
        self.server: XdsServer | None = None  # private mode's own xDS server
        self.ray_connected = False  # attach mode connected this process to Ray: shut it down
        self.owner = f"liveenv:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_ttl_s = 10.0
        self.leased: set[str] = set()  # clusters whose lease this env took
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
            ("weights", lambda: self.push(*self.restore_weights, 2.0) if self.xds and self.restore_weights else None),
            ("telemetry", lambda: self.telemetry.close() if self.telemetry else None),
            ("testbed", lambda: self.fleet.stop() if self.fleet else None),
            ("xds", self._close_xds),
            ("http", lambda: self.driver.close() if self.driver else None),
            ("reaper", lambda: self.reaper.close() if self.reaper else None),
            ("workdir", lambda: shutil.rmtree(self.workdir, ignore_errors=True) if self.workdir else None),
        ]
        for what, fn in steps:
            try:
                fn()
            except Exception as exc:  # cleanup goes on: the next part must still be stopped
                log.warning("LiveEnv cleanup of %s failed: %s: %s", what, type(exc).__name__, exc)

    def push(self, cluster: str, weights: Mapping[str, int], health: Mapping[str, str], timeout: float) -> bool:
        """Push under the cluster's lease (attach mode: a running controller's lease is not fought)."""
        assert self.xds is not None
        lease = self.xds.acquire_lease(self.owner, self.lease_ttl_s, cluster)
        self.leased.add(cluster)
        if not lease.get("granted"):
            raise XdsError(
                f"the controller lease is held by {lease.get('holder')!r}: LiveEnv (attach) does not fight a running "
                "controller; stop it (or its loop) while training against this stack"
            )
        return self.xds.wait_for_ack(self.xds.set_assignment(cluster, weights, health, self.owner), timeout)

    def _close_xds(self) -> None:
        try:
            for cluster in sorted(self.leased):
                if self.xds is not None:
                    self.xds.release_lease(self.owner, cluster)
        except XdsError as exc:
            log.info("lease release failed (it expires by itself): %s", exc)
        if self.server is not None:
            self.server.stop()
        if self.ray_connected:
            import ray

            ray.shutdown()


class LiveEnv(gym.Env):
    """CFR-RL against a real Envoy; see the module docstring."""

    # gymnasium.Env declares metadata as an instance attribute; it is class-wide here.
    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}  # type: ignore[misc]

    def __init__(self, env_config: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg = LiveEnvConfig.from_env_config(env_config)
        self.worker_index = int(getattr(env_config, "worker_index", 0) or 0)
        self.base_settings = base = cfg.load_settings()
        self.cluster_name = base.clusters[0].name
        n = len(base.clusters[0].endpoints)
        self.n_max = int(cfg.n_max)
        if n > self.n_max:
            raise ConfigError(
                [("n_max", f"the cluster has {n} endpoints, more than n_max={self.n_max}")], "LiveEnv env_config"
            )
        self.k = int(cfg.k or base.control.critical_count(n))
        self.weights_cfg = RewardWeights(**cfg.reward.model_dump())
        ctl = base.control
        self.knobs = Knobs(
            k=self.k,
            slo_ms=self.weights_cfg.slo_ms,
            cost_weight=float(ctl.cost_weight if cfg.cost_weight is None else cfg.cost_weight),
            util_target=float(ctl.util_target if cfg.util_target is None else cfg.util_target),
            latency_weight=float(ctl.latency_weight if cfg.latency_weight is None else cfg.latency_weight),
            force_breaching=cfg.force_breaching,
        )
        self.scenario: Scenario | None = self.fleet.scenario(cfg.scenario) if cfg.scenario else None
        if self.scenario is not None:
            self.scenario.check_targets(list(base.clusters[0].endpoints))
        self.observation_space = gym.spaces.Box(-3.0, float(max(20, self.n_max)), (self.n_max, N_FEATURES), np.float32)
        self.action_space = gym.spaces.MultiDiscrete([self.n_max] * self.k)
        # Live traffic is not reproducible from a seed: say so (gymnasium's checker reads it).
        self.spec = gym.envs.registration.EnvSpec(
            "balanceiq/LiveEnv-v0",
            entry_point="balanceiq.testbed.live_env:LiveEnv",
            nondeterministic=True,
            kwargs={"env_config": dict(env_config or {})},
        )
        self.settings: Settings | None = None
        self._owned = Owned()
        self._finalizer = weakref.finalize(self, Owned.cleanup, self._owned)
        self.started = self.closed = False
        self.core_state = CoreState()
        self.decisions = self.total_steps = self.episodes = 0
        self._scenario_t = 0.0
        self._applied: set[int] = set()
        self._address_map: dict[str, str] = {}  # private mode moved every endpoint to a free port
        self._last_reward = 0.0
        self.last_obs: Observation | None = None

    def _start(self) -> None:
        if self.closed:
            raise TestbedError("LiveEnv is closed")
        backend_urls, listen_url = self._start_private() if self.cfg.mode == "private" else self._start_attach()
        assert self.settings is not None
        ep = list(self.settings.clusters[0].endpoints)
        self.addresses = [e.address for e in ep]
        self.costs = {e.address: float(e.cost_per_million_requests) for e in ep}
        self.hint = np.array([e.capacity_rps or math.nan for e in ep], dtype=np.float64)
        self.static_weights = np.array([e.weight for e in ep], dtype=np.float64)
        own, cfg = self._owned, self.cfg
        if self.scenario is not None:
            own.driver = self.fleet.driver(ep, backend_urls, self._prices_callback())
        if cfg.rps > 0:
            own.load = self.fleet.background_load(listen_url, cfg.rps, cfg.load_concurrency, cfg.load_max_s)
        self.started = True

    def _start_private(self) -> tuple[Mapping[str, str], str]:
        from balanceiq.xds.server import XdsServer

        own = self._owned
        own.workdir = Path(tempfile.mkdtemp(prefix=f"balanceiq-liveenv-{self.worker_index}-"))
        own.reaper = Reaper(own.workdir)
        last: Exception | None = None
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            settings, mapping = reallocate_ports(self.base_settings, free_ports(ports_needed(self.base_settings)))
            state_dir = own.workdir / f"state{attempt}"
            settings = fast_windows(settings, self.cfg.decision_interval_s).model_copy(update={"state_dir": state_dir})
            try:
                server = XdsServer(settings, state_dir=state_dir)
                server.start()
                own.server = server
                fleet = self.fleet.start(
                    settings,
                    own.workdir / f"tb{attempt}",
                    prometheus=self.cfg.prometheus,
                    health_check_interval_s=self.cfg.health_check_interval_s,
                )
                break
            except (BalanceIQError, OSError) as exc:
                last = exc
                log.warning("LiveEnv start attempt %d failed (%s); retrying on other ports", attempt + 1, exc)
                if own.server is not None:
                    own.server.stop()
                    own.server = None
        else:
            raise TestbedError(f"LiveEnv: could not start a private testbed: {last}")
        own.xds, own.fleet = LocalXdsClient(server), fleet
        for pid in fleet.pids:
            own.pids.append(pid)
            own.reaper.add(pid)
        self.settings, self._address_map = settings, mapping
        # No Prometheus: it is asked once (connection refused, ~1 ms), then never again.
        own.telemetry = Telemetry(settings, retry_s=5.0 if self.cfg.prometheus else 1e9)
        return fleet.backend_urls, fleet.listen_url

    def _start_attach(self) -> tuple[Mapping[str, str], str]:
        import ray

        from balanceiq.xds.actor import get_actor

        own, s, interval = self._owned, self.base_settings, self.cfg.decision_interval_s
        if not ray.is_initialized():
            try:
                ray.init(address=self.cfg.ray_address, log_to_driver=False)  # connect only: never start a cluster
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise TestbedError(f"attach mode: cannot connect to Ray at {self.cfg.ray_address!r}: {exc}") from exc
            own.ray_connected = True
        try:
            own.xds = ActorXdsClient(get_actor(), timeout_s=10.0)
        except ValueError as exc:
            raise TestbedError(
                "attach mode: no xDS actor in this Ray cluster (start the stack with `balanceiq testbed up`, "
                f"and train on that cluster: `balanceiq train --address ...`): {exc}"
            ) from exc
        own.lease_ttl_s = max(3 * interval, 10.0)
        weights, health = served(own.xds.status(), self.cluster_name)
        if not weights:
            raise TestbedError(f"attach mode: the xDS actor serves no cluster {self.cluster_name!r}")
        own.restore_weights = (self.cluster_name, weights, health)
        self.settings = s
        # The stack's Prometheus scrapes at its own pace; the rate window follows the
        # decision interval but spans at least 4 of its scrapes.
        window = max(interval, 4 * s.prometheus.scrape_interval_s)
        own.telemetry = Telemetry(with_windows(s, window, max(2 * interval, s.telemetry.stale_after_s)))
        backend_urls = {e.address: f"http://{e.address}" for e in s.clusters[0].endpoints}
        return backend_urls, f"http://{s.envoy.listen_host}:{s.envoy.listen_port}"

    @functools.cached_property
    def fleet(self) -> FleetProvider:
        """The sample fleet (private mode, scenarios, load), resolved on first use."""
        return resolve_fleet(self.cfg.fleet, "LiveEnv (private mode, a scenario or load)")

    @property
    def owned_pids(self) -> list[int]:
        """Processes this env started (private mode), for leak checks."""
        reaper = self._owned.reaper
        return self._owned.pids + ([reaper.proc.pid] if reaper is not None else [])

    def _observe(self, weights: Mapping[str, int]) -> Observation:
        tel = self._owned.telemetry
        assert tel is not None
        obs = tel.observe({a: float(w) for a, w in weights.items()})
        eps = tuple(replace(e, cost_per_million=self.costs.get(e.address, e.cost_per_million)) for e in obs.endpoints)
        return replace(obs, endpoints=eps)

    def _context(self, obs: Observation) -> PolicyContext:
        rps = np.array([e.rps for e in obs.endpoints], dtype=np.float64)
        demand = float(np.where(np.isfinite(rps), rps, 0.0).sum())
        return PolicyContext(self.shares, self.hint, self.static_weights, demand, self.k)

    def _encode(self, obs: Observation) -> np.ndarray:
        est, _ = observe_only(obs, self._context(obs), self.knobs, self.core_state)
        return encode(obs, est.capacity, self.n_max, self.weights_cfg.slo_ms)

    @property
    def shares(self) -> np.ndarray:
        return weights_to_shares(
            [self.weights[a] for a in self.addresses], [self.health[a] != "DRAINING" for a in self.addresses]
        )

    def _push(self, weights: Mapping[str, int], health: Mapping[str, str]) -> bool:
        acked = self._owned.push(self.cluster_name, weights, health, timeout=min(2.0, self.cfg.decision_interval_s))
        self.weights, self.health = dict(weights), dict(health)
        return acked

    def critical_from_action(self, action: Any) -> list[int]:
        return critical_indices(action, len(self.addresses) if self.started else self.n_max)

    def _prices_callback(self) -> Callable[[dict[str, float]], None]:
        # Weak: the driver belongs to Owned, which must not keep the env alive (finalizer).
        ref = weakref.ref(self)

        def on_prices(prices: dict[str, float]) -> None:
            # Price events reach the observation's cost column (a billing feed, for the controller).
            if (env := ref()) is not None:
                env.costs.update({a: float(p) for a, p in prices.items()})

        return on_prices

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
            if ev.endpoint is not None:
                ev = ev.model_copy(update={"endpoint": self._address_map.get(ev.endpoint, ev.endpoint)})
            driver.apply(ev)
            done.append(ev.name)
        return done

    def _info(self, obs: Observation, r: float | None, events: list[str], **extra: Any) -> dict[str, Any]:
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
            **extra,
            "scenario_t": self._scenario_t,
            "scenario_events": events,
            "phase": self.scenario.phase_at(self._scenario_t) if self.scenario else None,
        }

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
        if r is not None:
            self._last_reward = float(r)
        self.core_state = CoreState()
        self.decisions = 0
        self.episodes += 1
        return self._encode(obs), self._info(obs, r, events, acked=acked, reset_s=round(time.monotonic() - t0, 3))

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.started or self.last_obs is None:
            raise RuntimeError("LiveEnv: reset() first")
        t0 = time.monotonic()
        obs = self.last_obs
        # The decision core (the controller's) with the agent's picks as the policy's order.
        picked = self.critical_from_action(action)
        scores = np.full(len(obs.endpoints), -np.inf)
        scores[picked] = len(picked) - np.arange(len(picked), dtype=np.float64)
        core = decide(obs, self._context(obs), scores, replace(self.knobs, k=max(1, len(picked))), self.core_state)
        before = self.shares
        held = obs.source == "none" or not any(e.usable for e in obs.endpoints)
        lp_status: str | None = None
        acked: bool | None = None
        if not held and core.critical:
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
        if self.scenario is not None:
            self._scenario_t += self.cfg.decision_interval_s * self.cfg.scenario_speed
        events = self._advance_scenario(self._scenario_t)
        self._observe(self.weights)  # the window starts at the push
        time.sleep(max(0.0, self.cfg.decision_interval_s - (time.monotonic() - t_push)))
        obs = self.last_obs = self._observe(self.weights)
        r = observed_reward(obs, self.weights_cfg)
        if r is not None:
            self._last_reward = float(r)
        self.decisions += 1
        self.total_steps += 1
        info = self._info(
            obs,
            r,
            events,
            critical=list(core.critical),
            forced=list(core.forced),
            held=held,
            lp_status=lp_status,
            acked=acked,
            moved=float(traffic_moved(before, self.shares)),
            step_s=round(time.monotonic() - t0, 3),
        )
        return self._encode(obs), float(self._last_reward), False, self.decisions >= self.cfg.episode_steps, info

    def close(self) -> None:
        """Stop everything this env started (idempotent); attach mode restores and lets go."""
        self.closed = True
        self._finalizer()
