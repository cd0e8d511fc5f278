"""The one decision step: observation -> capacity -> breachers -> critical set -> LP.

:func:`decide` is a pure function of (observation, context, policy scores, knobs, state)
and returns the decision together with the next state. The controller, the simulator's
policy, :class:`~balanceiq.sim.env.FleetEnv`, :class:`~balanceiq.testbed.live_env.LiveEnv`
and ``POST /api/policy/score`` all call it, so what is trained is what is served.

Capacity comes from what every Envoy reports (:func:`estimate`): its in-flight count
per endpoint, request and error rates and the ALS latency. Each endpoint's *baseline*
is the lowest median latency it has shown lately; an endpoint whose median rises well
above it, or whose in-flight requests are far older than what completes (Little's law),
is **congested**: it is at its capacity, and the rate it completes bounds it. An
uncongested endpoint's capacity is unknown beyond what it carries, so it may grow only
by ``growth`` per decision (and never past what it was last seen congested at): safe
moves probe for headroom instead of pouring traffic onto an endpoint that cannot take
it. The backends' own saturation gauges, ORCA utilisation or a configured
``capacity_rps`` refine this when present; none is required.

Price: a price change makes the endpoint critical at once; an endpoint whose price rose
does not gain share while it stays up, unless the others cannot carry the traffic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from balanceiq.policy.baselines import PolicyContext, available_mask
from balanceiq.policy.lp import LpResult, least_request_weights, shares_to_weights, solve_critical
from balanceiq.telemetry.observation import Observation

# An endpoint at or above this error rate in one window is in visible trouble.
BREACH_ERROR_RATE = 0.05
# Time constant of the decayed error evidence, and the requests it needs before it counts.
ERROR_MEMORY_S = 60.0
MIN_ERROR_EVIDENCE = 30.0
# Median latency above CONGESTED_RATIO x baseline + CONGESTED_SLACK_MS is queueing.
CONGESTED_RATIO = 1.5
CONGESTED_SLACK_MS = 5.0
# How fast a baseline may rise (a slowed endpoint's new normal) and a ceiling relax.
BASELINE_TAU_S = 60.0
CEILING_TAU_S = 90.0
GOOD_TAU_S = 120.0
# Latency (p95) below this fraction of the SLO costs nothing in the LP: once an endpoint
# is comfortably inside the SLO, price decides, not a few milliseconds more or less.
LATENCY_FREE = 0.5
# Decisions a recovered breacher stays critical (it grows back in bounded steps).
RECOVERY_DECISIONS = 6
# How long a quiet endpoint's last measured p95 stands in (fading) for a measurement.
LATENCY_MEMORY_S = 20.0
# Requests a window needs before its median says anything (about latency or queueing).
MIN_SAMPLES = 8.0
# How far one window below the baseline pulls it down, and the weight of a new window in
# the smoothed median/baseline ratio: single windows of a few dozen requests are noisy.
BASELINE_STEP = 0.3
RATIO_SMOOTHING = 0.5
# An endpoint that is not queueing is taken to run at no more than this utilisation.
UNCONGESTED_UTIL = 0.5
# Below this load an endpoint is too quiet for its latency to say anything about capacity.
MIN_PROBE_RPS = 1.0
# Latency evidence: each window's p95 over the SLO (in log units), weighted by the
# requests behind it and decayed with this time constant, and the requests it needs
# before it says anything. The p95 of one window of a few dozen requests is one of its
# slowest two or three: an endpoint with a 4 % tail reads "breaching" in every other
# window, and acting on each reading moves traffic back and forth (ping-pong).
LATENCY_EVIDENCE_S = 3.0
MIN_LATENCY_EVIDENCE = 30.0
# A breacher's capacity is cut to load x SLO / p95, but by at most this factor per
# decision: latency grows faster than linearly with load near capacity, so a linear cut
# sheds far more than the SLO needs, and the endpoints taking it over queue next (seen:
# cuts to a sixth, all endpoints of a loaded fleet breaching in turn).
MAX_BREACH_CUT = 0.5
# A quiet breacher's first hold lasts this long, each further one (a breach again within
# STRIKE_MEMORY_S of the last) twice as long, up to ``breach_hold_s`` (Envoy's outlier
# ejection likewise grows with the ejection count): a transient breach must not idle a
# good endpoint for the whole hold while the others queue for it.
HOLD_BASE_S = 5.0
STRIKE_MEMORY_S = 60.0
# Below this distance from the fleet-wide optimum (a share of traffic) an endpoint is
# where it should be: not worth a place in the critical set.
GAP_MIN = 0.01


@dataclass(frozen=True)
class Knobs:
    """What shapes a decision besides the observation (the controller's run-time policy)."""

    k: int = 2
    """Critical endpoints the policy adds on top of the forced ones."""
    slo_ms: float = 150.0
    """p95 above this breaches the SLO."""
    cost_weight: float = 0.1
    """Weight of the LP's cost term."""
    util_target: float = 0.0
    """Utilisation below which the LP's cost and latency terms alone decide."""
    latency_weight: float = 0.0
    """Weight of the LP's latency term (p95 in SLO units)."""
    growth: float = 1.5
    """An uncongested endpoint's load may grow by at most this factor per decision."""
    probe_share: float = 0.05
    """Every endpoint may grow to at least this share of demand, however quiet it was."""
    max_step: float = 0.05
    """An endpoint gains at most this share of demand per decision (bounded steps)."""
    max_shrink: float = 0.04
    """A steady endpoint (not breaching, congested or repriced) loses at most this share
    per decision: shed at once for a small gain, it is what the next event needs back.
    Below the 5-point step that counts towards a reversal, with room for rounding."""
    cooldown: int = 3
    """Decisions a congested or breaching endpoint waits before it may grow again."""
    gap_k: int = 1
    """Endpoints added to the critical set each decision because they sit furthest from
    the whole fleet's optimum (the LP over every endpoint, same bounds): whatever the
    policy ranks, a dear endpoint nobody picks still sheds in bounded steps."""
    breach_error_rate: float = 0.01
    """A decayed error rate at or above this over about a minute breaches."""
    breach_hold_s: float = 30.0
    """A breacher too quiet to measure stays one this long."""
    force_breaching: bool = True
    """Breaching, congested and repriced endpoints (and the ``gap_k`` furthest from the
    optimum) are always critical; off: the policy's K alone (plain CFR-RL)."""
    safe_moves: bool = True
    """Bound growth by the headroom estimate (off: the plain CFR-RL LP)."""


@dataclass(frozen=True)
class Memory:
    """What the core remembers of one endpoint between decisions."""

    base_ms: float = math.nan  # lowest recent median latency
    ratio: float = math.nan  # median over baseline, smoothed over decisions
    good_rps: float = 0.0  # most load carried uncongested lately
    ceiling_rps: float = math.nan  # load it was last seen congested at (nan: never)
    price: float = math.nan  # price at the last decision
    dearer_from: float = math.nan  # its price before a rise still in force
    dearer_share: float = math.nan  # its share when the price rose: no more while dearer
    breached_at: float = math.nan  # last time it was measured breaching
    strikes: int = 0  # breach episodes in a row (each lengthens the hold)
    cleared_at: float = math.nan  # when the last episode ended
    p95_ms: float = math.nan  # last measured p95 (a quiet endpoint keeps its record)
    p95_at: float = math.nan  # when
    cooldown: int = 0  # decisions left without growth after it congested
    recovering: int = 0  # decisions left as critical (recovered from a breach, or still growing)
    stale_inflight: bool = False  # Little's law read its in-flight requests far older than its latency
    requests: float = 0.0  # decayed request count (error evidence)
    errors: float = 0.0  # decayed error count
    slow_log: float = math.nan  # log(p95 / SLO), request-weighted over recent windows
    slow_n: float = 0.0  # decayed requests behind slow_log


@dataclass(frozen=True)
class CoreState:
    """The core's memory across decisions (immutable; :func:`decide` returns the next)."""

    at: float | None = None
    memory: Mapping[str, Memory] = field(default_factory=dict)


@dataclass(frozen=True)
class Estimate:
    """Per endpoint: capacity for the LP, the most load it may get now, and why."""

    capacity: np.ndarray  # rps; the LP's utilisation denominator
    max_load: np.ndarray  # rps; inf = unbounded
    congested: np.ndarray  # bool: queueing now (or overloaded)
    baseline_ms: np.ndarray


@dataclass(frozen=True)
class CoreDecision:
    """One decision and the state it leaves."""

    shares: np.ndarray
    weights: np.ndarray
    critical: tuple[int, ...]
    forced: tuple[int, ...]
    breaching: tuple[int, ...]  # measured now (window or sustained errors)
    held: tuple[int, ...]  # earlier breachers too quiet to measure
    estimate: Estimate
    lp_status: str
    state: CoreState
    notes: tuple[str, ...] = ()

    @property
    def capacity(self) -> np.ndarray:
        return self.estimate.capacity

    def info(self) -> dict[str, Any]:
        return {"lp_status": self.lp_status, "capacity_estimate": [round(float(c), 3) for c in self.capacity]}


def erlang_wait(c: int, a: float) -> float:
    """Mean wait in queue over mean service time of an M/M/c queue with offered load
    ``a`` = arrival rate x service time (Erlang C / (c - a)); inf when ``a >= c``."""
    if a >= c:
        return math.inf
    if a <= 0:
        return 0.0
    term, total = 1.0, 1.0  # a^k / k!, summed for k < c
    for k in range(1, c):
        term *= a / k
        total += term
    last = term * a / c * c / (c - a)  # a^c / c! * c / (c - a)
    return last / (total + last) / (c - a)


def queue_utilisation(busy: float, wait_ratio: float, max_servers: int = 256) -> float:
    """Utilisation of an endpoint seen queueing: ``busy`` is its offered load in servers
    (rate x baseline service time, Little's law), ``wait_ratio`` the queueing delay over
    the service time. The server count whose M/M/c wait matches best gives capacity
    ``servers / service time``, so utilisation ``busy / servers``; clamped to [0.3, 1]
    because a median is a noisy measure of a mean wait."""
    if not (math.isfinite(busy) and busy > 0 and math.isfinite(wait_ratio) and wait_ratio > 0):
        return 1.0
    best, best_err = 1.0, math.inf
    c = max(1, math.floor(busy) + 1)
    if erlang_wait(c, busy) < wait_ratio:
        # It queues more than even the fewest servers would at this load: busier than
        # its baseline says (it slowed down); read the wait as one server's.
        return min(1.0, max(0.3, busy / c, wait_ratio / (1.0 + wait_ratio)))
    while c <= max_servers:
        w = erlang_wait(c, busy)
        err = abs(math.log(w / wait_ratio)) if w > 0 else math.inf
        if err < best_err:
            best, best_err = busy / c, err
        if w < wait_ratio:  # the wait only falls as servers are added
            break
        c += 1
    return min(1.0, max(0.3, best))


def lp_latency(p95_ms: np.ndarray, slo_ms: float) -> np.ndarray:
    """The LP's latency term per endpoint: p95 in SLO units above :data:`LATENCY_FREE`
    (NaN stays unknown)."""
    with np.errstate(invalid="ignore"):
        return np.maximum(np.asarray(p95_ms, dtype=np.float64) / slo_ms - LATENCY_FREE, 0.0)


def time_in_system_s(addresses: Sequence[str], state: CoreState) -> np.ndarray:
    """Each endpoint's smoothed median latency in seconds (NaN: not measured yet)."""
    t = np.full(len(addresses), math.nan)
    for i, a in enumerate(addresses):
        m = state.memory.get(a)
        if m is not None and math.isfinite(m.base_ms) and math.isfinite(m.ratio):
            t[i] = m.base_ms * m.ratio / 1000.0
    return t


def envoy_weights(
    shares: np.ndarray,
    addresses: Sequence[str],
    state: CoreState,
    demand_rps: float,
    lb_policy: str,
    *,
    available: np.ndarray | None = None,
    scale: int = 10000,
) -> np.ndarray:
    """Integer Envoy weights that realise ``shares`` under ``lb_policy``: as they are for
    ROUND_ROBIN; for LEAST_REQUEST, where Envoy picks by ``weight / (active + 1)``, each
    scaled by (1 + the requests it will hold), from its smoothed median latency."""
    if lb_policy != "LEAST_REQUEST":
        return shares_to_weights(shares, scale=scale, available=available)
    return least_request_weights(
        shares, time_in_system_s(addresses, state), demand_rps, available=available, scale=scale
    )


def _f(x: float) -> float:
    return float(x) if math.isfinite(x) else math.nan


def _arr(obs: Observation, name: str) -> np.ndarray:
    return np.array([getattr(e, name) for e in obs.endpoints], dtype=np.float64)


def window_breaching(obs: Observation, slo_ms: float) -> list[int]:
    """Endpoints in visible trouble in this window: p95 over the SLO or >= 5% errors."""
    return [
        i
        for i, e in enumerate(obs.endpoints)
        if (math.isfinite(e.p95_ms) and e.p95_ms > slo_ms)
        or (math.isfinite(e.error_rate) and e.error_rate >= BREACH_ERROR_RATE)
    ]


def latency_p95(m: Memory, slo_ms: float) -> float:
    """The p95 the latency evidence stands for (NaN: not enough of it)."""
    if m.slow_n >= MIN_LATENCY_EVIDENCE and math.isfinite(m.slow_log):
        return slo_ms * math.exp(m.slow_log)
    return math.nan


def with_forced(ranked: Sequence[int], forced: Sequence[int], k: int) -> list[int]:
    """Every ``forced`` endpoint, then the first ``k`` of ``ranked`` not already in.

    The policy adds its own K on top rather than filling up to K: the forced endpoints'
    traffic needs somewhere to go, and with one spare the LP would pour all of it there.
    """
    chosen = list(dict.fromkeys(int(i) for i in forced))
    extra = [i for i in dict.fromkeys(int(i) for i in ranked) if i not in chosen]
    return chosen + extra[: max(0, int(k))]


def _remember(
    obs: Observation, shares: np.ndarray, knobs: Knobs, state: CoreState, now: float
) -> tuple[dict[str, Memory], list[int], list[int], list[int]]:
    """Update each endpoint's memory; returns it, the breachers measured now, the quiet
    breachers held, and the endpoints whose price changed."""
    dt = max(0.0, now - state.at) if state.at is not None else 0.0
    decay = math.exp(-dt / ERROR_MEMORY_S) if state.at is not None else 0.0
    fade = math.exp(-dt / LATENCY_EVIDENCE_S) if state.at is not None else 0.0
    window = obs.window_s if math.isfinite(obs.window_s) and obs.window_s > 0 else max(dt, 1.0)
    measured = {
        i for i, e in enumerate(obs.endpoints) if math.isfinite(e.error_rate) and e.error_rate >= BREACH_ERROR_RATE
    }
    mem: dict[str, Memory] = {}
    held: list[int] = []
    repriced: list[int] = []
    for i, e in enumerate(obs.endpoints):
        m = state.memory.get(e.address, Memory())
        # Error evidence: decayed counts, so a steady trickle of errors breaches too.
        seen = e.rps * window if math.isfinite(e.rps) and e.rps > 0 and math.isfinite(e.error_rate) else 0.0
        req = m.requests * decay + seen
        err = m.errors * decay + (e.error_rate * seen if seen else 0.0)
        if req >= MIN_ERROR_EVIDENCE and err / req >= knobs.breach_error_rate:
            measured.add(i)
        # Latency evidence: breaching once the requests behind it say p95 > SLO, or at
        # once when even the window's median misses the SLO (no sampling doubt then).
        slow_n, slow_log = m.slow_n * fade, m.slow_log
        n = e.rps * window if math.isfinite(e.rps) and e.rps > 0 else 0.0
        fresh = n > 0 and math.isfinite(e.p95_ms) and e.p95_ms > 0
        if fresh:
            x = math.log(e.p95_ms / knobs.slo_ms)
            slow_log = x if not math.isfinite(slow_log) or slow_n <= 0 else (slow_log * slow_n + x * n) / (slow_n + n)
            slow_n += n
        # Judged only on a window that measured it: what it read before is no verdict on
        # an endpoint too quiet to measure now (the hold below covers that).
        evidence = fresh and slow_n >= MIN_LATENCY_EVIDENCE
        median_miss = n >= MIN_SAMPLES and math.isfinite(e.p50_ms) and e.p50_ms > knobs.slo_ms
        if median_miss or (evidence and slow_log > 0):
            measured.add(i)
        # Within the SLO on less evidence than a breach needs: a breacher left with a
        # trickle gathers little, and must not stay held for want of it.
        within = fresh and slow_n >= MIN_SAMPLES and slow_log <= 0
        breached_at = m.breached_at
        recovering = max(0, m.recovering - 1)
        strikes, cleared_at = m.strikes, m.cleared_at
        if i in measured:
            if not math.isfinite(breached_at):
                recent = math.isfinite(cleared_at) and now - cleared_at <= STRIKE_MEMORY_S
                strikes = strikes + 1 if recent else 1
            breached_at = now
            recovering = 0
        elif within:
            if math.isfinite(breached_at):
                # Measured within the SLO again: re-optimised for the next few decisions
                # (like a price change), so it wins traffic back without waiting for the
                # policy to pick it.
                recovering = RECOVERY_DECISIONS
                cleared_at = now
            breached_at = math.nan
        elif math.isfinite(breached_at):
            hold = min(knobs.breach_hold_s, HOLD_BASE_S * 2.0 ** max(0, strikes - 1))
            if now - breached_at <= hold:
                held.append(i)
            else:
                # Too quiet to measure for the whole hold: re-optimised too, or its
                # trickle would be its share until the policy happens to pick it.
                breached_at = math.nan
                recovering = RECOVERY_DECISIONS
                cleared_at = now
        # Baseline: the lowest median lately, allowed to drift up (a slowed endpoint's
        # new normal) but never above what is measured now.
        base, smooth = m.base_ms, m.ratio
        p50 = e.p50_ms if e.usable and math.isfinite(e.p50_ms) and e.p50_ms > 0 else math.nan
        if not (math.isfinite(e.rps) and e.rps * window >= MIN_SAMPLES):
            p50 = math.nan  # a median of a handful of requests is noise
        if math.isfinite(p50):
            if not math.isfinite(base):
                base = p50
            elif p50 < base:
                base += BASELINE_STEP * (p50 - base)  # down, but not to one lucky window
            else:
                base = min(p50, base * math.exp(dt / BASELINE_TAU_S))
            r = p50 / base
            smooth = r if not math.isfinite(smooth) else RATIO_SMOOTHING * r + (1 - RATIO_SMOOTHING) * smooth
        else:
            # Too quiet to measure now: what it queued like before says nothing about
            # today (a recovered endpoint must not stay "congested" on its trickle).
            smooth = math.nan
        # Price: a change is re-optimised at once; a rise caps the share while it lasts.
        price = e.cost_per_million
        dearer_from, dearer_share = m.dearer_from, m.dearer_share
        if math.isfinite(price) and math.isfinite(m.price) and abs(price - m.price) > 1e-12 * max(1.0, m.price):
            repriced.append(i)
            if price > m.price and not math.isfinite(dearer_from):
                dearer_from, dearer_share = m.price, float(shares[i])
        if math.isfinite(dearer_from) and math.isfinite(price) and price <= dearer_from:
            dearer_from = dearer_share = math.nan
        ceiling = m.ceiling_rps
        if recovering == RECOVERY_DECISIONS:
            # The incident is over: what it queued like while slow (a slowdown reads as
            # queueing) is not today's, and a ceiling learned then must not cap it below
            # what it carried cleanly before.
            smooth = p50 / base if math.isfinite(p50) and math.isfinite(base) else math.nan
            if math.isfinite(ceiling):
                ceiling = max(ceiling, m.good_rps)
        mem[e.address] = replace(
            m,
            ceiling_rps=ceiling,
            base_ms=_f(base),
            ratio=_f(smooth),
            p95_ms=e.p95_ms if e.usable and math.isfinite(e.p95_ms) else m.p95_ms,
            p95_at=now if e.usable and math.isfinite(e.p95_ms) else m.p95_at,
            price=_f(price) if math.isfinite(price) else m.price,
            dearer_from=dearer_from,
            dearer_share=dearer_share,
            breached_at=breached_at,
            strikes=strikes,
            cleared_at=cleared_at,
            recovering=recovering,
            requests=req,
            errors=err,
            slow_log=_f(slow_log),
            slow_n=slow_n,
        )
    breaching = sorted(i for i in measured if i not in held)
    return mem, breaching, held, repriced


def estimate(
    obs: Observation,
    hint: np.ndarray,
    memory: Mapping[str, Memory],
    knobs: Knobs,
    dt: float,
    breaching: Sequence[int] = (),
) -> tuple[Estimate, dict[str, Memory]]:
    """Capacity and headroom per endpoint from what Envoy reports (see the module doc);
    returns the estimate and the memory with ``good_rps``/``ceiling_rps`` updated.

    A ``breaching`` endpoint's capacity is also capped at its load times ``slo / p95``
    (no lower than :data:`MAX_BREACH_CUT` of it per decision) and ``1 - 2 x error rate``:
    a slow dependency or a network problem breaks the SLO with the backend half idle, and
    the LP must still move traffic off it in proportion to how far it is out of bounds."""
    n = len(obs.endpoints)
    rps = _arr(obs, "rps")
    p95 = _arr(obs, "p95_ms")
    inflight = _arr(obs, "inflight")
    sat = _arr(obs, "saturation")
    err = _arr(obs, "error_rate")
    hint = np.asarray(hint, dtype=np.float64).reshape(-1)
    avail = available_mask(obs)
    demand = float(np.nansum(np.where(np.isfinite(rps) & (rps > 0), rps, 0.0)))
    cap = np.full(n, math.nan)
    max_load = np.full(n, math.inf)
    congested = np.zeros(n, dtype=bool)
    base_out = np.full(n, math.nan)
    out: dict[str, Memory] = {}
    for i, e in enumerate(obs.endpoints):
        m = memory.get(e.address, Memory())
        base_out[i] = m.base_ms
        load = float(rps[i]) if math.isfinite(rps[i]) and rps[i] > 0 else 0.0
        good = m.good_rps * math.exp(-dt / GOOD_TAU_S)
        ceiling = m.ceiling_rps * math.exp(dt / CEILING_TAU_S) if math.isfinite(m.ceiling_rps) else math.nan
        # Queueing, by the endpoint's own baseline: the median well above it ...
        limit = (
            CONGESTED_RATIO + CONGESTED_SLACK_MS / m.base_ms if math.isfinite(m.base_ms) and m.base_ms > 0 else math.inf
        )
        queueing = bool(load >= MIN_PROBE_RPS and math.isfinite(m.ratio) and m.ratio > limit)
        # ... or requests in flight far older than what completes (Little's law: their
        # time in system is in-flight / rate): a stuck or overloaded endpoint completes
        # little, so its latency reads stale while Envoy's rq_active climbs.
        q = float(inflight[i]) if math.isfinite(inflight[i]) and inflight[i] > 0 else 0.0
        recent = p95[i] if math.isfinite(p95[i]) else (m.base_ms if math.isfinite(m.base_ms) else math.nan)
        little_ratio = math.nan
        stale = False
        if q >= 2.0:
            little_ms = 1000.0 * q / load if load > 0 else math.inf
            # Far older, not merely older: rq_active is a sampled gauge, and a time average
            # of samples reads high when scrapes meet bursts (seen: 53 ms by Little's law at
            # a 17 ms median; Envoy's admin gives one sample, not an average). Against a
            # fresh latency it must say so twice running; without one, once is enough.
            stale = not math.isfinite(recent) or little_ms > max(3.0 * recent, recent + 100.0)
            if stale and (m.stale_inflight or not math.isfinite(p95[i])):
                queueing = True
                if math.isfinite(m.base_ms) and m.base_ms > 0:
                    little_ratio = little_ms / m.base_ms
        # How long requests wait, over the baseline: the median's word, or Little's law's
        # when that says more (a median of the few that complete reads as no queue at all).
        waits = [r for r in (m.ratio, little_ratio) if math.isfinite(r)]
        ratio = max(waits) if queueing and waits else 2 * CONGESTED_RATIO
        if queueing and load > 0:
            # How busy it is, from how much it queues at this load (M/M/c, the servers
            # inferred): a one-slot backend queues at a third of its capacity, a
            # sixteen-slot one only near all of it.
            util = queue_utilisation(load * m.base_ms / 1000.0, ratio - 1.0) if math.isfinite(m.base_ms) else 1.0
            ceiling = load / util
            congested[i] = True
        elif load >= MIN_PROBE_RPS and not queueing and i not in breaching:
            good = max(good, load)
        # The backend's own saturation gauge (or an ORCA utilisation) when it reports one.
        measured = load / sat[i] if math.isfinite(sat[i]) and sat[i] > 0.02 and load > 0 else math.nan
        prior = hint[i] if math.isfinite(hint[i]) and hint[i] > 0 else math.nan
        if math.isfinite(measured):
            c = measured
        elif congested[i]:
            c = ceiling
        elif math.isfinite(ceiling):
            c = max(ceiling, load)
        elif math.isfinite(prior):
            c = prior
        elif load > 0 and knobs.safe_moves:
            # Carrying this much without queueing: it can take what the growth bound
            # lets it grow to at no more than UNCONGESTED_UTIL (the bound, not this
            # guess, keeps it from being flooded; the guess lets price and latency pick).
            c = (
                max(
                    load,
                    good,
                    min(knobs.growth * max(good, load, knobs.probe_share * demand), load + knobs.max_step * demand),
                )
                / UNCONGESTED_UTIL
            )
        else:
            c = math.nan  # unknown: filled below
        if math.isfinite(err[i]) and err[i] > 0 and math.isfinite(c):
            c *= max(0.1, 1.0 - 2.0 * err[i])
        if i in breaching and load > 0:
            # How far out it is: the evidence's p95, or this window's when even its
            # median misses (a sudden slowdown is acted on in full at once).
            seen = latency_p95(m, knobs.slo_ms)
            if not math.isfinite(seen) or obs.endpoints[i].p50_ms > knobs.slo_ms:
                seen = max((v for v in (seen, p95[i]) if math.isfinite(v)), default=math.nan)
            factor = max(MAX_BREACH_CUT, knobs.slo_ms / seen) if math.isfinite(seen) and seen > knobs.slo_ms else 1.0
            if math.isfinite(err[i]):
                factor = min(factor, max(0.1, 1.0 - 2.0 * err[i]))
            c = min(c, load * factor) if math.isfinite(c) else load * factor
        cap[i] = c
        # A breacher, like a congested endpoint, waits before it may grow again: its next
        # window may well read fine (a tail is bursty), and regrowing at once is ping-pong.
        cooldown = knobs.cooldown if congested[i] or i in breaching else max(0, m.cooldown - 1)
        if knobs.safe_moves:
            probe = knobs.probe_share * demand
            if congested[i] or m.cooldown > 0:
                # Backed off: no growth for a few decisions, or the next window (still
                # draining its queue) would hand it back what it just lost: ping-pong.
                max_load[i] = min(load, c) if math.isfinite(c) else load
            elif not math.isfinite(measured):
                bound = min(knobs.growth * max(good, load, probe), load + knobs.max_step * demand)
                if math.isfinite(ceiling):
                    bound = min(bound, max(0.9 * ceiling, load))
                else:
                    # Never seen queueing: what it carried cleanly lately is known headroom,
                    # not a probe; one shed for price takes it back at once when an event
                    # needs it (after a queue, the ceiling decides instead).
                    bound = max(bound, good)
                max_load[i] = bound
        if not avail[i]:
            cap[i] = 0.0
        out[e.address] = replace(
            m,
            good_rps=good,
            ceiling_rps=ceiling if math.isfinite(ceiling) else math.nan,
            cooldown=cooldown,
            stale_inflight=stale,
        )
    # Unknown capacity: typical (the median of the known), else enough for all traffic;
    # growth is bounded by max_load, so this only lets cost and latency decide where it goes.
    unknown = ~np.isfinite(cap)
    if unknown.any():
        known = np.isfinite(cap) & (cap > 0)
        cap[unknown] = float(np.median(cap[known])) if known.any() else max(demand, 1.0)
    return Estimate(cap, max_load, congested, base_out), out


def decide(
    obs: Observation,
    ctx: PolicyContext,
    scores: np.ndarray | None,
    knobs: Knobs,
    state: CoreState | None = None,
    *,
    now: float | None = None,
) -> CoreDecision:
    """One decision (see the module doc). ``scores``: the policy's, one per endpoint
    (higher = more critical; already perturbed if the caller samples), or ``None`` to
    re-optimise every endpoint. ``ctx.shares`` is the split in force."""
    state = state or CoreState()
    n = len(obs.endpoints)
    if n == 0:
        raise ValueError(f"cluster {obs.cluster!r}: observation has no endpoints")
    now = float(obs.timestamp if now is None else now)
    shares = np.asarray(ctx.shares, dtype=np.float64).reshape(-1)
    if shares.shape[0] != n:
        raise ValueError(f"context has {shares.shape[0]} shares, observation has {n} endpoints")
    dt = max(0.0, now - state.at) if state.at is not None else 0.0
    mem, breaching, held, repriced = _remember(obs, shares, knobs, state, now)
    est, mem = estimate(obs, np.asarray(ctx.capacity_hint, dtype=np.float64), mem, knobs, dt, breaching)
    avail = available_mask(obs)
    notes: list[str] = []

    forced: list[int] = []
    if knobs.force_breaching:
        recovered = [i for i, e in enumerate(obs.endpoints) if mem[e.address].recovering > 0]
        forced = [
            i for i in breaching + [int(j) for j in np.flatnonzero(est.congested)] + repriced + recovered if avail[i]
        ]
        forced = [i for i in dict.fromkeys(forced) if i not in held]
    if scores is None:
        critical = [i for i in range(n) if avail[i] and i not in held]
    else:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)[:n]
        if s.shape[0] != n:
            raise ValueError(f"{s.shape[0]} scores for {n} endpoints")
        s = np.where(avail & np.isfinite(s), s, -np.inf)
        s[list(held)] = -np.inf
        ranked = [int(i) for i in np.argsort(-s, kind="stable") if s[i] > -np.inf]
        critical = with_forced(ranked, forced, max(1, min(int(knobs.k), n)))

    demand = float(ctx.demand_rps) if math.isfinite(ctx.demand_rps) and ctx.demand_rps > 0 else 0.0
    # Each endpoint's share when its price rose (NaN: no rise in force).
    dearer_share = np.array([mem[e.address].dearer_share for e in obs.endpoints], dtype=np.float64)
    dearer = np.isfinite(dearer_share)
    max_share = None
    if knobs.safe_moves and demand > 0:
        max_share = np.where(np.isfinite(est.max_load), est.max_load / demand, np.inf)
        # A price that rose caps the share unless the others cannot carry the traffic.
        if dearer.any():
            capped = np.where(dearer, np.minimum(max_share, dearer_share), max_share)

            def room_for(crit_idx: list[int]) -> bool:
                crit = np.zeros(n, dtype=bool)
                crit[crit_idx] = True
                budget = 1.0 - float(np.where(~crit & avail, shares, 0.0).sum())
                return float(np.minimum(np.where(crit & avail, capped, 0.0), 1.0).sum()) >= budget

            if not room_for(critical):
                # Look for headroom among every endpoint before the dearer one may grow.
                everyone = [i for i in range(n) if avail[i] and i not in held]
                if room_for(everyone):
                    critical = list(dict.fromkeys(critical + everyone))
                    notes.append("price: every endpoint re-optimised to keep a repriced one from gaining share")
            if room_for(critical):
                max_share = capped
            else:
                notes.append("price: a repriced endpoint may gain share, the others lack headroom")
    min_share = None
    if knobs.safe_moves:
        # Bounded steps down as well as up: only trouble (a breach, a queue, a price
        # change) moves traffic off an endpoint at once; the LP's preference alone
        # moves it gradually, so an endpoint is not emptied one decision and refilled
        # the next (ping-pong) while the others grow in bounded steps.
        urgent = est.congested | dearer
        urgent[[*breaching, *held, *repriced]] = True
        min_share = np.where(avail & ~urgent, np.maximum(shares - knobs.max_shrink, 0.0), 0.0)
    latency = None
    if knobs.latency_weight > 0:
        # The latency evidence's p95 where there is enough of it: one window's p95 flips
        # with the few slowest requests it happened to catch.
        p95 = _arr(obs, "p95_ms")
        for i, e in enumerate(obs.endpoints):
            smooth = latency_p95(mem[e.address], knobs.slo_ms)
            if math.isfinite(smooth) and math.isfinite(p95[i]):
                p95[i] = smooth
        # A quiet endpoint's latency is what it last measured (fading over LATENCY_MEMORY_S),
        # not "typical" at once: the trickle a slow endpoint is left with must not make it
        # look new.
        known = np.isfinite(p95)
        typical = float(np.median(p95[known])) if known.any() else math.nan
        for i, e in enumerate(obs.endpoints):
            m = mem[e.address]
            age = now - m.p95_at
            if not known[i] and math.isfinite(m.p95_ms) and age < LATENCY_MEMORY_S:
                # Fades to "typical" (what an unknown latency counts as) so a recovered
                # endpoint's trickle of traffic can win it back.
                w = 1.0 - age / LATENCY_MEMORY_S
                p95[i] = w * m.p95_ms + (1.0 - w) * typical if math.isfinite(typical) else m.p95_ms
        latency = lp_latency(p95, knobs.slo_ms)

    def solve(crit: Sequence[int]) -> LpResult:
        return solve_critical(
            shares,
            crit,
            est.capacity,
            _arr(obs, "cost_per_million"),
            demand,
            available=avail,
            cost_weight=knobs.cost_weight,
            util_target=knobs.util_target,
            latency=latency,
            latency_weight=knobs.latency_weight,
            max_share=max_share,
            min_share=min_share,
        )

    if scores is not None and knobs.gap_k > 0 and knobs.force_breaching:
        # The policy ranks by what it learned (today: load, not price); the endpoints
        # furthest from the fleet-wide optimum join too, so none is left at a share the
        # optimum has long moved away from only because the policy never names it.
        everyone = [i for i in range(n) if avail[i] and i not in held]
        # Nothing to add when the critical set already holds everyone (small fleets):
        # no second LP on the decision path then.
        whole = solve(everyone) if set(everyone) - set(critical) else None
        gap = np.abs(whole.shares - shares) if whole is not None else np.zeros(n)
        gap[list(critical)] = 0.0
        gap[list(held)] = 0.0
        picks = [int(i) for i in np.argsort(-gap, kind="stable")[: knobs.gap_k] if gap[i] > GAP_MIN]
        critical = critical + picks
    res = solve(critical)
    if max_share is not None:
        # Grown as far as its safe-move bound allows: the LP wanted more, so it stays
        # critical until it has what the LP wants (CFR-RL re-routes until converged).
        bound = (res.shares > shares + 1e-6) & np.isfinite(max_share) & (res.shares >= max_share - 1e-6)
        if min_share is not None:
            # Likewise one held up by its bounded step down: it stays critical until it has
            # shed what the LP wants off it, or it keeps a stop-gap share for good.
            bound |= (res.shares < shares - 1e-6) & (min_share > 0) & (res.shares <= min_share + 1e-6)
        for j in np.flatnonzero(bound):
            a = obs.endpoints[int(j)].address
            mem[a] = replace(mem[a], recovering=max(mem[a].recovering, 2))
    return CoreDecision(
        shares=res.shares,
        weights=shares_to_weights(res.shares, available=avail),
        critical=tuple(critical),
        forced=tuple(forced),
        breaching=tuple(breaching),
        held=tuple(held),
        estimate=est,
        lp_status=res.status,
        state=CoreState(at=now, memory=mem),
        notes=tuple(notes),
    )


def breach_state(
    obs: Observation, shares: np.ndarray, knobs: Knobs, state: CoreState | None = None, *, now: float | None = None
) -> tuple[list[int], list[int], CoreState]:
    """``(measured, held, next state)``: endpoints breaching now (in this window or by
    their sustained error rate), and earlier breachers too quiet to measure, held for up
    to ``knobs.breach_hold_s``."""
    state = state or CoreState()
    now = float(obs.timestamp if now is None else now)
    mem, measured, held, _ = _remember(obs, np.asarray(shares, dtype=np.float64), knobs, state, now)
    return measured, held, CoreState(at=now, memory=mem)


def observe_only(
    obs: Observation, ctx: PolicyContext, knobs: Knobs, state: CoreState | None = None, *, now: float | None = None
) -> tuple[Estimate, CoreState]:
    """The estimate without a decision (for encoding the policy's input), and the state
    it would leave; :func:`decide` on the same input computes the same estimate."""
    state = state or CoreState()
    now = float(obs.timestamp if now is None else now)
    dt = max(0.0, now - state.at) if state.at is not None else 0.0
    shares = np.asarray(ctx.shares, dtype=np.float64).reshape(-1)
    mem, breaching, _, _ = _remember(obs, shares, knobs, state, now)
    est, _ = estimate(obs, np.asarray(ctx.capacity_hint, dtype=np.float64), mem, knobs, dt, breaching)
    return est, state
