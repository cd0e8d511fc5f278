"""CFR-RL as a plain gymnasium environment over the fleet simulator.

Each step is one control decision: the agent names K critical endpoints (ordered, no
repeats), SLO breachers join them, the LP re-splits traffic among them while every other
endpoint keeps its share, and the fleet runs ``decision_steps`` simulator steps under the
new split, scored by :mod:`balanceiq.policy.reward`.

``env_config`` keys (RLlib passes it through): ``scenarios`` (one drawn per episode;
default ``steady``), ``n_max`` (observation padding, 16), ``k`` (about 20% of the largest
N), ``decision_steps`` (5), ``episode_steps`` (60), ``obs_noise`` (0.05), the LP's
``cost_weight``, ``util_target`` and ``latency_weight`` (the LP's; default: the served
config's defaults, so training solves the controller's objective), ``force_breaching`` (true),
``reward`` (:class:`~balanceiq.policy.reward.RewardWeights` fields), ``seed``,
``random_fleets`` (0): the share of episodes on a fresh random fleet and timeline
(:mod:`balanceiq.sim.randomise`, sizes ``random_endpoints``, [3, 120]) instead of one of
``scenarios``, and
``balancer``: Envoy's (:data:`~balanceiq.sim.balancer.BALANCERS`, ``round_robin``) under
the weights the controller would push for each split (``controller_weights``, true; false
hands the split to Envoy as weights, as Envoy with static weights); ``saturation`` (true):
whether observations carry each endpoint's utilisation (ORCA reports or load gauges).
"""

from __future__ import annotations

from dataclasses import dataclass
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
from balanceiq.sim.fleet import FleetSim
from balanceiq.sim.randomise import ENDPOINTS, random_scenario
from balanceiq.sim.scenario import Scenario, load_scenario
from balanceiq.telemetry.observation import Observation


@dataclass(frozen=True)
class DecisionOutcome:
    """What one decision produced, aggregated over its simulator steps."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    error_rate: float
    cost_per_million: float
    max_utilization: float
    reward: float
    traffic_moved: float


def run_decision(
    sim: FleetSim, shares: np.ndarray, steps: int, weights: RewardWeights, balancer: str = "round_robin"
) -> tuple[DecisionOutcome, Any]:
    """Run ``steps`` simulator steps with Envoy weights ``shares`` under ``balancer``;
    returns the outcome and last result."""
    p50 = p95 = p99 = err = cost = umax = 0.0
    last = None
    for _ in range(steps):
        last = sim.step(shares, balancer)
        p50 += last.p50_ms
        p95 += last.p95_ms
        p99 += last.p99_ms
        err += last.error_rate
        cost += last.cost_per_million
        umax = max(umax, float(last.max_utilization))
    p50, p95, p99, err, cost = (x / steps for x in (p50, p95, p99, err, cost))
    r = reward(p95, p99, err, cost, weights)
    return DecisionOutcome(p50, p95, p99, err, cost, umax, r, 0.0), last


_INFO_KEYS = ("p50_ms", "p95_ms", "p99_ms", "error_rate", "cost_per_million", "max_utilization")


class FleetEnv(gym.Env):
    """CFR-RL over :class:`~balanceiq.sim.fleet.FleetSim`; see the module docstring."""

    # gymnasium.Env declares metadata as an instance attribute; it is class-wide here.
    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}  # type: ignore[misc]

    def __init__(self, env_config: dict[str, Any] | None = None) -> None:
        cfg = dict(env_config or {})
        names = cfg.get("scenarios", ["steady"])
        self.scenarios: list[Scenario] = [load_scenario(s) for s in ([names] if isinstance(names, str) else names)]
        self.random_fleets = float(cfg.get("random_fleets", 0.0))
        if not 0.0 <= self.random_fleets <= 1.0:
            raise ValueError(f"random_fleets is a share of episodes, 0..1, got {self.random_fleets}")
        lo, hi = (int(x) for x in cfg.get("random_endpoints", ENDPOINTS))
        self.random_endpoints = (lo, hi)
        biggest = max([len(s.endpoints) for s in self.scenarios] + ([hi] if self.random_fleets > 0 else []))
        self.n_max = int(cfg.get("n_max", max(16, biggest)))
        if biggest > self.n_max:
            raise ValueError(f"scenario with {biggest} endpoints exceeds n_max={self.n_max}")
        self.k = int(cfg.get("k") or critical_count(biggest))
        self.decision_steps = int(cfg.get("decision_steps", 5))
        self.episode_steps = int(cfg.get("episode_steps", 60))
        self.obs_noise = float(cfg.get("obs_noise", 0.05))
        self.cost_weight = float(cfg.get("cost_weight", Knobs.cost_weight))
        self.util_target = float(cfg.get("util_target", Knobs.util_target))
        self.latency_weight = float(cfg.get("latency_weight", Knobs.latency_weight))
        self.force_breaching = bool(cfg.get("force_breaching", True))
        self.weights = RewardWeights(**cfg.get("reward", {}))
        self.balancer = str(cfg.get("balancer", "round_robin"))
        if self.balancer not in BALANCERS:
            raise ValueError(f"unknown balancer {self.balancer!r}; known: {', '.join(BALANCERS)}")
        self.controller_weights = bool(cfg.get("controller_weights", True))
        self.saturation = bool(cfg.get("saturation", True))
        self._base_seed = int(cfg.get("seed", 0))
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
        self.sim = FleetSim(scenario, seed=sim_seed, obs_noise=self.obs_noise, saturation=self.saturation)
        self.hint = np.array([e.capacity_rps for e in scenario.endpoints], dtype=np.float64)
        static = np.array([e.weight for e in scenario.endpoints], dtype=np.float64)
        self.shares = static / static.sum()
        self.static = static
        self.core_state = CoreState()
        self._weights_state = CoreState()
        self.decisions = 0
        _, last = run_decision(self.sim, self.shares, self.decision_steps, self.weights, self.balancer)
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
        outcome, last = run_decision(self.sim, envoy, self.decision_steps, self.weights, self.balancer)
        moved = traffic_moved(self.shares, new_shares)
        r = outcome.reward - self.weights.churn * moved
        self.shares = new_shares
        self.last_obs = self.sim.observation(last, shares_to_weights(envoy))
        self.decisions += 1
        truncated = self.decisions >= self.episode_steps or self.sim.done
        info.update({k: getattr(outcome, k) for k in _INFO_KEYS}, traffic_moved=moved, reward=r)
        return self._encode(self.last_obs), float(r), False, bool(truncated), info

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
        return Knobs(
            k=self.k if k is None else k,
            slo_ms=self.weights.slo_ms,
            cost_weight=self.cost_weight,
            util_target=self.util_target,
            latency_weight=self.latency_weight,
            force_breaching=self.force_breaching,
        )

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
