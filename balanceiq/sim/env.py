"""CFR-RL as a plain gymnasium environment over the fleet simulator. Each step is one control decision: the agent names
K critical endpoints (ordered, no repeats), SLO breachers join them, the LP re-splits traffic among them while every
other endpoint keeps its share, and the fleet runs ``decision_steps`` simulator steps under the new split, scored by
:mod:`balanceiq.policy.reward`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from balanceiq.config import critical_count
from balanceiq.policy.baselines import PolicyContext
from balanceiq.policy.decide import CoreDecision, decide, envoy_weights, observe_only
from balanceiq.policy.features import N_FEATURES, encode
from balanceiq.policy.knobs import Knobs
from balanceiq.policy.lp import critical_indices, shares_to_weights, traffic_moved
from balanceiq.policy.memory import CoreState, remember
from balanceiq.policy.reward import RewardWeights, reward
from balanceiq.sim.balancer import BALANCERS
from balanceiq.sim.fleet import FleetSim, StepResult
from balanceiq.sim.randomise import ENDPOINTS, random_scenario
from balanceiq.sim.scenario import Scenario, load_scenario
from balanceiq.telemetry.observation import Observation


@dataclass(frozen=True)
class EnvConfig:
    """FleetEnv's ``env_config`` (RLlib passes the dict through; other keys are ignored)."""

    scenarios: Any = ("steady",)  # names, files or Scenarios; one drawn per episode
    n_max: int | None = None  # observation padding (default: 16 or the largest N)
    k: int | None = None  # critical endpoints (default: about 20% of the largest N)
    decision_steps: int = 5  # simulator steps per decision
    episode_steps: int = 60  # decisions per episode
    obs_noise: float = 0.05  # relative noise on observed latency and errors
    # The LP's weights: the served config's by default, so training solves the controller's objective.
    cost_weight: float = Knobs.cost_weight
    util_target: float = Knobs.util_target
    latency_weight: float = Knobs.latency_weight
    force_breaching: bool = True  # breaching endpoints always critical
    reward: dict[str, Any] = field(default_factory=dict)  # RewardWeights fields
    seed: int = 0
    random_fleets: float = 0.0  # share of episodes on a random fleet (balanceiq.sim.randomise), not a scenario
    random_endpoints: tuple[int, int] = ENDPOINTS
    balancer: str = "round_robin"  # Envoy's (balanceiq.sim.balancer.BALANCERS)
    controller_weights: bool = True  # Envoy gets the controller's weights for a split (false: the split itself)
    saturation: bool = True  # observations carry utilisation (ORCA reports or load gauges)
    capacity_hints: bool = True  # the scenario's capacities as the controller's priors (false: none, as live)


_FIELDS = frozenset(f.name for f in fields(EnvConfig))
_INFO_KEYS = ("p50_ms", "p95_ms", "p99_ms", "error_rate", "cost_per_million")


class FleetEnv(gym.Env):
    """CFR-RL over :class:`~balanceiq.sim.fleet.FleetSim` (see the module docstring and :class:`EnvConfig`)."""

    # gymnasium.Env declares metadata as an instance attribute; it is class-wide here.
    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}  # type: ignore[misc]
    sim_class: ClassVar[type[FleetSim]] = FleetSim

    def __init__(self, env_config: dict[str, Any] | None = None) -> None:
        cfg = EnvConfig(**{key: v for key, v in (env_config or {}).items() if key in _FIELDS})
        names = cfg.scenarios
        self.scenarios: list[Scenario] = [load_scenario(s) for s in ([names] if isinstance(names, str) else names)]
        self.random_fleets = float(cfg.random_fleets)
        if not 0.0 <= self.random_fleets <= 1.0:
            raise ValueError(f"random_fleets is a share of episodes, 0..1, got {self.random_fleets}")
        lo, hi = (int(x) for x in cfg.random_endpoints)
        self.random_endpoints = (lo, hi)
        biggest = max([len(s.endpoints) for s in self.scenarios] + ([hi] if self.random_fleets > 0 else []))
        self.n_max = int(max(16, biggest) if cfg.n_max is None else cfg.n_max)
        if biggest > self.n_max:
            raise ValueError(f"scenario with {biggest} endpoints exceeds n_max={self.n_max}")
        self.k = int(cfg.k or critical_count(biggest))
        self.decision_steps = int(cfg.decision_steps)
        self.episode_steps = int(cfg.episode_steps)
        self.obs_noise = float(cfg.obs_noise)
        self.weights = RewardWeights(**cfg.reward)
        self._knobs = Knobs(
            k=self.k,
            slo_ms=self.weights.slo_ms,
            cost_weight=float(cfg.cost_weight),
            util_target=float(cfg.util_target),
            latency_weight=float(cfg.latency_weight),
            force_breaching=bool(cfg.force_breaching),
        )
        self.balancer = str(cfg.balancer)
        if self.balancer not in BALANCERS:
            raise ValueError(f"unknown balancer {self.balancer!r}; known: {', '.join(BALANCERS)}")
        self.controller_weights = bool(cfg.controller_weights)
        self.saturation = bool(cfg.saturation)
        self.capacity_hints = bool(cfg.capacity_hints)
        self._base_seed = int(cfg.seed)
        self.observation_space = gym.spaces.Box(-3.0, float(max(20, self.n_max)), (self.n_max, N_FEATURES), np.float32)
        self.action_space = gym.spaces.MultiDiscrete([self.n_max] * self.k)
        self.sim: FleetSim | None = None
        self._episode = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        scenario = self.scenarios[int(self.np_random.integers(len(self.scenarios)))]
        if self.random_fleets > 0 and self.np_random.random() < self.random_fleets:
            scenario = random_scenario(int(self.np_random.integers(2**31)), endpoints=self.random_endpoints)
        sim_seed = int(self.np_random.integers(2**31)) if seed is not None or self._episode else self._base_seed
        self._episode += 1
        self.sim = self.sim_class(scenario, seed=sim_seed, obs_noise=self.obs_noise, saturation=self.saturation)
        self.hint = np.array([e.capacity_rps if self.capacity_hints else np.nan for e in scenario.endpoints])
        self.static = static = np.array([e.weight for e in scenario.endpoints], dtype=np.float64)
        self.shares = static / static.sum()
        self.core_state = CoreState()
        self._weights_state = CoreState()
        self.decisions = 0
        _, _, last = self._run(self.shares)
        self.last_obs = self.sim.observation(last, shares_to_weights(self.shares))
        return self._encode(self.last_obs), {"scenario": scenario.name}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        assert self.sim is not None, "reset() first"
        picked = critical_indices(action, self.sim.n)
        new_shares, info = self.apply_critical(picked)
        return self.step_shares(new_shares, info)

    def step_shares(
        self, new_shares: np.ndarray, info: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply a full traffic split (what a baseline decides) and run one decision."""
        assert self.sim is not None, "reset() first"
        info = dict(info or {})
        envoy = self.envoy_weights(new_shares)
        outcome, r, last = self._run(envoy)
        moved = traffic_moved(self.shares, new_shares)
        r = r - self.weights.churn * moved
        self.shares = new_shares
        self.last_obs = self.sim.observation(last, shares_to_weights(envoy))
        self.decisions += 1
        truncated = self.decisions >= self.episode_steps or self.sim.done
        info.update(outcome, traffic_moved=moved, reward=r)
        return self._encode(self.last_obs), float(r), False, bool(truncated), info

    def _run(self, envoy: np.ndarray) -> tuple[dict[str, float], float, StepResult]:
        """``decision_steps`` simulator steps under Envoy weights ``envoy``: the means (the
        worst utilisation), their reward (churn aside) and the last step."""
        assert self.sim is not None, "reset() first"
        total, umax, last = [0.0] * 5, 0.0, None
        for _ in range(self.decision_steps):
            last = self.sim.step(envoy, self.balancer)
            step = (last.p50_ms, last.p95_ms, last.p99_ms, last.error_rate, last.cost_per_million)
            total = [a + b for a, b in zip(total, step, strict=True)]
            umax = max(umax, float(last.max_utilization))
        out = dict(zip(_INFO_KEYS, (x / self.decision_steps for x in total), strict=True), max_utilization=umax)
        assert last is not None
        return out, reward(out["p95_ms"], out["p99_ms"], out["error_rate"], out["cost_per_million"], self.weights), last

    def envoy_weights(self, shares: np.ndarray) -> np.ndarray:
        """The weights Envoy gets for ``shares``: under LEAST_REQUEST, the controller's
        (scaled by the requests each endpoint holds, from the core's memory)."""
        if self.balancer != "least_request" or not self.controller_weights:
            return shares
        assert self.sim is not None, "reset() first"
        obs = self.last_obs
        state = self.core_state
        if not state.memory:  # a policy with its own core (a baseline): the controller's memory
            mem, *_ = remember(obs, self.shares, self.knobs(), self._weights_state, obs.timestamp)
            state = self._weights_state = CoreState(obs.timestamp, mem)
        demand = float(np.nansum([e.rps for e in obs.endpoints]))
        return envoy_weights(shares, self.sim.names, state, demand, "LEAST_REQUEST").astype(np.float64)

    def knobs(self, k: int | None = None) -> Knobs:
        return self._knobs if k is None else replace(self._knobs, k=k)

    def context(self) -> PolicyContext:
        obs: Observation = self.last_obs
        demand = float(np.nansum([e.rps for e in obs.endpoints]))
        return PolicyContext(self.shares, self.hint, self.static, demand, self.k)

    def decide(self, critical: list[int] | None) -> CoreDecision:
        """The decision core on the last observation: ``critical`` in the policy's order
        (forced endpoints join them), or ``None`` for every endpoint. Remembers."""
        n = len(self.last_obs.endpoints)
        scores = None
        if critical is not None:
            scores = np.full(n, -np.inf)
            scores[list(critical)] = len(critical) - np.arange(len(critical), dtype=np.float64)
        k = self.k if critical is None else max(1, len(critical))
        core = decide(self.last_obs, self.context(), scores, self.knobs(k), self.core_state)
        self.core_state = core.state
        return core

    def capacity_estimate(self) -> np.ndarray:
        est, _ = observe_only(self.last_obs, self.context(), self.knobs(), self.core_state)
        return est.capacity

    def apply_critical(self, critical: list[int]) -> tuple[np.ndarray, dict[str, Any]]:
        """The decision core over ``critical`` (forced endpoints join them)."""
        core = self.decide(critical)
        return core.shares, {"lp_status": core.lp_status, "critical": list(core.critical)}

    def _encode(self, obs: Observation) -> np.ndarray:
        return encode(obs, self.capacity_estimate() if self.sim else self.hint, self.n_max, self.weights.slo_ms)
