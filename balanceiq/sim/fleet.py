"""A vectorised, seeded model of a multi-cloud fleet under a traffic split.

Each :meth:`FleetSim.step` is one telemetry window: endpoint ``i`` gets ``s_i D`` of demand ``D(t) = base_rps (1 + a
sin(2 pi t / period + phase))`` times event multipliers and lognormal noise, ``s`` being the policy's weights as Envoy's
balancer applies them (:mod:`~balanceiq.sim.balancer`). Latency is base latency plus an M/G/c queue
(:mod:`~balanceiq.sim.queue`); errors are ``BASE_ERROR`` plus the load above capacity shed, or every request of a failed
endpoint. Fleet quantiles invert the traffic mixture of the endpoints' CDFs on a fixed log-spaced grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from balanceiq.sim import queue
from balanceiq.sim.balancer import orca_weights, split
from balanceiq.sim.queue import TAIL_FRACTION
from balanceiq.sim.scenario import Scenario, load_scenario
from balanceiq.telemetry.observation import NO_TRAFFIC, EndpointObservation, Observation

BASE_ERROR = 0.001  # Error rate of a healthy endpoint below capacity.
ORCA_BLACKOUT_S = 10.0
"""CSWRR uses an endpoint's reports once it has sent them this long (Envoy's ``blackout_period``)."""
SATURATION_MAX = 10.0  # Observations clip saturation here: a dead endpoint under traffic is "very" saturated, not inf.
QUANTILES = np.array([0.5, 0.95, 0.99])  # Latency quantiles reported, in the order of the ``*_p50/p95/p99_ms`` fields.

_GRID_POINTS = 320
_GRID_LO_MS = 0.01
_NOISE_BLOCK = 1024
_EXP_K = -np.log1p(-QUANTILES)  # quantiles of Exp(1)
_SPREAD = (np.arange(4) + 0.5) / 4  # arrival times within a step, as fractions, for the backlog's waits


@dataclass(frozen=True, slots=True)
class StepResult:
    """One step: per-endpoint arrays (length n; latency and error rate ``nan`` where the
    endpoint got no traffic) and fleet aggregates."""

    t: float  # simulated time at the start of the step (s)
    offered_rps: np.ndarray  # sent to each endpoint (share x demand)
    served_rps: np.ndarray  # answered successfully
    capacity_rps: np.ndarray  # true effective capacity during the step (0 when failed)
    available: np.ndarray  # False where the endpoint was down
    utilization: np.ndarray  # offered / capacity; inf for a failed endpoint sent traffic
    endpoint_p50_ms: np.ndarray
    endpoint_p95_ms: np.ndarray
    endpoint_p99_ms: np.ndarray
    endpoint_error_rate: np.ndarray  # share of offered requests that failed (shed, fast-failed or base errors)
    inflight: np.ndarray  # mean requests in the system (Little's law: accepted rate x mean latency)
    endpoint_cost_per_million: np.ndarray  # price in force during the step
    demand_rps: float  # total demand during the step
    p50_ms: float  # fleet quantiles: the endpoints' mixture by traffic share
    p95_ms: float
    p99_ms: float
    error_rate: float  # share of all requests that failed
    cost_per_million: float  # $ per million served (offered-weighted if none was served)
    max_utilization: float  # highest among available endpoints (a failed one shows in error_rate)
    mix: np.ndarray  # the fleet's latency CDF on FleetSim.latency_grid_ms (the endpoints' by traffic share)


class _Segment:
    """Fleet state between two event boundaries; precomputed so a step does no event logic."""

    def __init__(self, start: float, sim: FleetSim, active: Sequence[tuple[list[int], str, float, float]]) -> None:
        n = sim.n
        self.start = start
        cap_mult = np.ones(n)
        cost_mult = np.ones(n)
        self.servers = servers = sim.servers.copy()
        self.tail = tail = np.zeros(n)
        self.tail_frac = tail_frac = np.full(n, TAIL_FRACTION)
        errors = np.zeros(n)
        self.failed = failed = np.zeros(n, dtype=bool)
        self.demand_mult = 1.0
        for idx, kind, value, fraction in active:
            if kind == "capacity":
                cap_mult[idx] *= value
            elif kind == "servers":
                servers[idx] *= value
                cap_mult[idx] *= value
            elif kind == "cost":
                cost_mult[idx] *= value
            elif kind == "tail_latency":
                tail[idx] += value
                tail_frac[idx] = fraction
            elif kind == "errors":
                errors[idx] = np.minimum(errors[idx] + value, 1.0)
            elif kind == "fail":
                failed[idx] = True
            else:  # demand, burst
                self.demand_mult *= value
        self.any_failed = bool(failed.any())
        self.any_tail = bool((tail > 0).any())
        self.one_server = bool(np.all(servers == 1))
        self.ok = 1.0 - np.minimum(BASE_ERROR + errors, 1.0)
        self.capacity = np.where(failed, 0.0, sim.base_capacity_rps * cap_mult)
        # A failed endpoint's rate only feeds divisions whose result is then overwritten.
        self.mu_safe = np.where(failed, 1.0, self.capacity)
        # Fast failures occupy the endpoint for base latency: nothing is shed, nothing served.
        self.mu_accept = np.where(failed, np.inf, self.capacity)
        self.cost = sim.base_cost * cost_mult
        self.up = ~failed
        # Step results hand these out without copying; nobody may change them underneath.
        for arr in (self.failed, self.tail, self.capacity, self.mu_safe, self.mu_accept, self.cost, self.up, self.ok):
            arr.setflags(write=False)


class FleetSim:
    """Seeded simulator of one scenario. ``obs_noise``: the lognormal sigma :meth:`observation`
    puts on latency and errors (its own random stream: observing does not change the run);
    without ``saturation`` observations carry none (no ORCA reports or load gauges)."""

    def __init__(
        self, scenario: Scenario | str | Path, seed: int | None = None, obs_noise: float = 0.0, saturation: bool = True
    ) -> None:
        scenario = load_scenario(scenario)
        if not (math.isfinite(obs_noise) and obs_noise >= 0):
            raise ValueError(f"obs_noise must be a finite number >= 0, got {obs_noise!r}")
        self.scenario = scenario
        self.obs_noise = float(obs_noise)
        self.saturation = bool(saturation)
        self.n = len(scenario.endpoints)
        self.names: list[str] = scenario.names
        self.step_s = float(scenario.step_s)
        self.base_latency_ms = np.array([e.base_latency_ms for e in scenario.endpoints], dtype=np.float64)
        self.base_capacity_rps = np.array([e.capacity_rps for e in scenario.endpoints], dtype=np.float64)
        self.base_cost = np.array([e.cost_per_million for e in scenario.endpoints], dtype=np.float64)
        self.static_weights = np.array([e.weight for e in scenario.endpoints], dtype=np.float64)
        self.servers = np.array([e.servers for e in scenario.endpoints], dtype=np.float64)
        self.service_cv = np.array([e.service_cv for e in scenario.endpoints], dtype=np.float64)
        self.tail_prob = np.array([e.tail_prob for e in scenario.endpoints], dtype=np.float64)
        self.tail_ms = np.array([e.tail_ms for e in scenario.endpoints], dtype=np.float64)
        self._plain = bool(np.all(self.servers == 1) and np.all(self.service_cv == 1) and np.all(self.tail_prob == 0))

        self._omega = 2.0 * math.pi / scenario.demand.diurnal_period_s

        events = scenario.events
        bounds = sorted({0.0} | {e.at_s for e in events} | {e.end_s for e in events if math.isfinite(e.end_s)})
        effects = [(scenario.targets(e.target), e.kind, float(e.value), e.fraction) for e in events]
        self._segments = [
            _Segment(start, self, [x for x, e in zip(effects, events) if e.at_s <= start < e.end_s]) for start in bounds
        ]
        self._starts = [seg.start for seg in self._segments]
        max_tail = max(float(seg.tail.max()) for seg in self._segments)

        # One grid for every step: wide enough for the slowest possible answer.
        self.timeout_ms = float(scenario.timeout_ms)
        hi = float(self.base_latency_ms.max()) + self.timeout_ms + max_tail
        self.latency_grid_ms = np.geomspace(_GRID_LO_MS, hi * 1.05 + 1.0, _GRID_POINTS)
        self.grid_ratio = float(self.latency_grid_ms[1] / self.latency_grid_ms[0])
        """Ratio between neighbouring grid points: the resolution of fleet quantiles."""
        self._log_grid = np.log(self.latency_grid_ms)
        x = self.latency_grid_ms[None, :]
        b = self.base_latency_ms[:, None]
        self._x_minus_b = x - b
        # CDF of a failed endpoint: every (fast) answer takes exactly base latency.
        self._failed_cdf = (self._x_minus_b >= 0).astype(np.float64)

        self.seed = scenario.seed if seed is None else int(seed)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Back to time 0 with events re-armed; reseeds (same seed, same trajectory)."""
        if seed is not None:
            self.seed = int(seed)
        demand_ss, obs_ss, orca_ss = np.random.SeedSequence(self.seed).spawn(3)
        self._rng = np.random.default_rng(demand_ss)
        self._obs_rng = np.random.default_rng(obs_ss)
        self._orca_rng = np.random.default_rng(orca_ss)
        self._backlog = np.zeros(self.n)
        self._k = 0
        self.t = 0.0
        self._seg_index = 0
        self._next_start = self._starts[1] if len(self._starts) > 1 else math.inf
        self._noise = np.empty(0)
        self._noise_pos = 0
        self._orca: np.ndarray | None = None
        self._lb_state: dict[str, np.ndarray] = {}
        self._enter_step()

    def _enter_step(self) -> None:
        """Bring segment, demand noise and demand up to date for the step starting at ``t``."""
        eps = 1e-9 * self.step_s
        while self.t + eps >= self._next_start:
            self._seg_index += 1
            nxt = self._seg_index + 1
            self._next_start = self._starts[nxt] if nxt < len(self._starts) else math.inf
        self._seg = self._segments[self._seg_index]
        d = self.scenario.demand
        if self._noise_pos >= self._noise.shape[0]:
            # Drawn in blocks: one call per thousand steps instead of one per step.
            self._noise = np.exp(d.noise * self._rng.standard_normal(_NOISE_BLOCK) - 0.5 * d.noise * d.noise)
            self._noise_pos = 0
        noise = float(self._noise[self._noise_pos])
        self._noise_pos += 1
        diurnal = 1.0 + d.diurnal_amplitude * math.sin(self._omega * self.t + d.phase)
        self._demand = d.base_rps * diurnal * self._seg.demand_mult * noise

    @property
    def done(self) -> bool:
        """True once ``duration_s`` has elapsed (stepping further is allowed)."""
        return self.t >= self.scenario.duration_s - 1e-9 * self.step_s

    def _shares(self, shares: np.ndarray) -> np.ndarray:
        s = np.asarray(shares, dtype=np.float64)
        if s.shape != (self.n,):
            raise ValueError(f"shares must have shape ({self.n},), got {s.shape}")
        total = float(s.sum())
        if not (math.isfinite(total) and total > 0.0) or float(s.min()) < 0.0:
            checks = {"contain NaN": np.isnan(s), "contain infinity": np.isinf(s), "must be >= 0; negative": s < 0}
            for what, bad in checks.items():
                if bad.any():
                    raise ValueError(f"shares {what} at index {np.flatnonzero(bad).tolist()}")
            raise ValueError("shares sum to 0: no endpoint would receive traffic")
        return s if total == 1.0 else s / total

    def _mm1(self, seg: _Segment, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`queue.build`'s answer for M/M/1 endpoints in closed form (the sojourn is
        exponential): the shipped scenarios' case, and training's, kept fast."""
        t = self.timeout_ms
        r, shift, mean_wait = queue.mm1(seg.mu_safe, rho, t)
        lat = self.base_latency_ms[:, None] + np.minimum(shift[:, None] + np.multiply.outer(1.0 / r, _EXP_K), t)
        cdf = -np.expm1(-r[:, None] * np.maximum(self._x_minus_b - shift[:, None], 0.0))
        return lat, mean_wait, np.maximum(cdf, self._x_minus_b >= t)

    def _failures(
        self, seg: _Segment, lam: np.ndarray, rho: np.ndarray, lat: np.ndarray, mean_wait: np.ndarray, cdf: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """A failed endpoint answers at once (in place); returns utilisation and its maximum
        over endpoints that are up."""
        if not seg.any_failed:
            return rho, float(rho.max())
        failed = seg.failed
        lat[failed] = self.base_latency_ms[failed, None]
        mean_wait[failed] = 0.0
        cdf[failed] = self._failed_cdf[failed]
        up = rho[seg.up]
        return np.where(failed, np.where(lam > 0.0, np.inf, 0.0), rho), float(up.max()) if up.size else 0.0

    def _carry(self, seg: _Segment, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Under CSWRR, whose weights move under it, each endpoint's queue builds and drains over time
        instead of being at its equilibrium at once (the backends' queues are unbounded FIFOs that serve
        even what the client gave up on). The pointwise-stationary fluid model (Wang, Tipper and
        Banerjee, 1996): ``dL/dt = arrivals - capacity x u(L)``, ``u(L)`` the utilisation at which the
        equilibrium queue holds ``L`` (:func:`queue.held`), in backward Euler steps; beyond ``RHO_SAT``
        the excess is a backlog served at capacity. Sets the next weights from this step's reports;
        returns the load whose equilibrium each endpoint is in over the step and the wait (ms) behind
        the backlog, arrivals spread over the step (:data:`_SPREAD`), if there is one."""
        mu, c, k = seg.mu_safe, seg.servers, _SPREAD.size
        cs2 = queue.service(mu, c, self.service_cv, self.tail_prob, self.tail_ms)[2]
        dt, rho, excess = self.step_s / k, np.zeros((self.n, k)), np.zeros((self.n, k))
        for j in range(k):
            target = self._backlog + dt * lam
            lo, hi = np.zeros(self.n), np.full(self.n, queue.RHO_SAT)
            for _ in range(30):  # bisection: the utilisation u' with held(u') + dt x capacity x u' = target
                mid = 0.5 * (lo + hi)
                below = queue.held(c, cs2, mid) + dt * mu * mid < target
                lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
            at_sat = queue.held(c, cs2, hi)
            full = at_sat + dt * mu * hi < target
            self._backlog = np.where(seg.up, np.where(full, target - dt * mu * hi, at_sat), 0.0)
            rho[:, j], excess[:, j] = hi, np.where(full, self._backlog - at_sat, 0.0)
        self._orca = orca_weights(lam, seg.capacity, seg.servers, rho[:, -1], excess[:, -1] >= 1.0, self._orca_rng)
        return rho.mean(axis=1) * mu, 1000.0 * excess / mu[:, None] if excess.any() else None

    def step(self, shares: np.ndarray, balancer: str = "round_robin") -> StepResult:
        """Run one step with weights ``shares`` (normalised if they do not sum to 1) under
        Envoy's ``balancer`` (:data:`~balanceiq.sim.balancer.BALANCERS`)."""
        seg = self._seg
        demand = self._demand
        weights = self._shares(shares)
        if balancer == "cswrr" and self.t >= ORCA_BLACKOUT_S and self._orca is not None:
            weights = self._orca  # the last step's reports; the configured weights until then
        sp = split(balancer, weights, demand, seg.capacity, seg.up, seg.servers, self._lb_state)
        s = sp.shares
        b = self.base_latency_ms

        lam = s * demand
        rho = lam / seg.mu_safe
        load, backlog_ms = self._carry(seg, lam) if balancer == "cswrr" else (lam, None)
        if self._plain and seg.one_server and sp.p_wait is None and not seg.any_tail and backlog_ms is None:
            lat, mean_wait, cdf = self._mm1(seg, load / seg.mu_safe)
        else:
            tail = (seg.tail, seg.tail_frac) if seg.any_tail else None
            wait = None if sp.p_wait is None or sp.wait_ms is None else (sp.p_wait, sp.wait_ms)
            q = queue.build(
                seg.mu_safe,
                seg.servers,
                self.service_cv,
                self.tail_prob,
                self.tail_ms,
                load,
                tail,
                self.timeout_ms,
                wait,
                backlog_ms,
            )
            lat = b[:, None] + queue.quantiles(q, QUANTILES)
            mean_wait = queue.mean(q)
            cdf = 1.0 - queue.survival(q, self._x_minus_b)

        served = seg.ok * np.minimum(lam, seg.capacity)
        accepted = np.minimum(lam, seg.mu_accept)
        util, max_util = self._failures(seg, lam, rho, lat, mean_wait, cdf)
        inflight = accepted * (b + mean_wait) * 1e-3

        mix = s @ cdf
        agg = np.exp(np.interp(QUANTILES, mix, self._log_grid))

        silent = lam <= 0.0
        err = 1.0 - served / np.maximum(lam, 1e-300)
        total_served = float(served.sum())
        price = float(served @ seg.cost) / total_served if total_served > 0.0 else float(s @ seg.cost)
        if silent.any():
            lat[silent] = np.nan
            err[silent] = np.nan

        result = StepResult(
            t=self.t,
            offered_rps=lam,
            served_rps=served,
            capacity_rps=seg.capacity,
            available=seg.up,
            utilization=util,
            endpoint_p50_ms=lat[:, 0],
            endpoint_p95_ms=lat[:, 1],
            endpoint_p99_ms=lat[:, 2],
            endpoint_error_rate=err,
            inflight=inflight,
            endpoint_cost_per_million=seg.cost,
            demand_rps=demand,
            p50_ms=float(agg[0]),
            p95_ms=float(agg[1]),
            p99_ms=float(agg[2]),
            error_rate=1.0 - total_served / demand,
            cost_per_million=price,
            max_utilization=max_util,
            mix=mix,
        )
        self._k += 1
        self.t = self._k * self.step_s
        self._enter_step()
        return result

    def observation(self, result: StepResult, weights: np.ndarray | None = None) -> Observation:
        """``result`` as the :class:`Observation` live telemetry would produce, under Envoy
        ``weights`` (default: the scenario's static ones). ``rps`` is offered load, like
        Envoy's ``rq_total`` rate; ``timestamp`` is the end of the step."""
        n = self.n
        w = self.static_weights if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},), got {w.shape}")
        p50, p95, err = result.endpoint_p50_ms, result.endpoint_p95_ms, result.endpoint_error_rate
        if self.obs_noise > 0.0:
            sig = self.obs_noise
            z = self._obs_rng.standard_normal((2, n))
            lat_noise = np.exp(sig * z[0] - 0.5 * sig * sig)
            p50, p95 = p50 * lat_noise, p95 * lat_noise  # one factor for both keeps p50 <= p95
            err = np.clip(err * np.exp(sig * z[1] - 0.5 * sig * sig), 0.0, 1.0)
        sat = np.minimum(result.utilization, SATURATION_MAX) if self.saturation else np.full(n, np.nan)
        flags = [frozenset({NO_TRAFFIC}) if quiet else frozenset() for quiet in (result.offered_rps <= 0.0).tolist()]
        # EndpointObservation's fields in order (age 0: a step is observed as it ends).
        cols = (p50, p95, err, sat, result.inflight, result.offered_rps, result.endpoint_cost_per_million, w)
        rows = zip(self.names, *(c.tolist() for c in cols), result.available.tolist(), [0.0] * n, flags, strict=True)
        endpoints = tuple(EndpointObservation(*row) for row in rows)
        return Observation(
            cluster=self.scenario.name,
            endpoints=endpoints,
            source="simulator",
            timestamp=result.t + self.step_s,
            window_s=self.step_s,
        )
