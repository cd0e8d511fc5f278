"""Capacity and headroom per endpoint from what every Envoy reports: an endpoint whose median rises well
above its *baseline* (the lowest median lately), or whose in-flight requests are far older than what
completes (Little's law), is **congested**; others grow by ``growth`` a decision at most, not past their ceiling."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from balanceiq.policy.baselines import available_mask, obs_field
from balanceiq.policy.knobs import Knobs
from balanceiq.policy.memory import Memory, latency_p95
from balanceiq.telemetry.observation import EndpointObservation, Observation

# Median latency above CONGESTED_RATIO x baseline + CONGESTED_SLACK_MS is queueing.
CONGESTED_RATIO = 1.5
CONGESTED_SLACK_MS = 5.0
CEILING_TAU_S = 90.0  # how fast a ceiling relaxes
GOOD_TAU_S = 120.0  # how fast the load carried cleanly is forgotten
UNCONGESTED_UTIL = 0.5  # the most utilisation an endpoint that is not queueing is taken to run at
MIN_PROBE_RPS = 1.0  # below it, an endpoint is too quiet for its latency to say anything about capacity
# A breacher's capacity is cut to load x SLO / p95, but by at most this factor per
# decision: latency is convex in load, so a linear cut sheds far more than the SLO needs.
MAX_BREACH_CUT = 0.5


@dataclass(frozen=True)
class Estimate:
    """Per endpoint: capacity for the LP, the most load it may get now, and why."""

    capacity: np.ndarray  # rps; the LP's utilisation denominator
    max_load: np.ndarray  # rps; inf = unbounded
    congested: np.ndarray  # bool: queueing now (or overloaded)


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
    """Utilisation ``busy / servers`` at offered load ``busy`` (in servers) and queueing delay over service time
    ``wait_ratio``, by the server count whose M/M/c wait matches best, clamped to [0.3, 1] (medians are noisy).
    Never below one server's reading ``wait / (1 + wait)``: at a given utilisation more servers queue less, so a wait
    no fit matches (a drifted baseline, a service time less variable than M/M/c's) must not read as idle servers."""
    if not (math.isfinite(busy) and busy > 0 and math.isfinite(wait_ratio) and wait_ratio > 0):
        return 1.0
    fewest = math.floor(busy) + 1
    one_server = wait_ratio / (1.0 + wait_ratio)
    if erlang_wait(fewest, busy) < wait_ratio:
        # It queues more than even the fewest servers would: it slowed down.
        return min(1.0, max(0.3, busy / fewest, one_server))
    best, best_err = 1.0, math.inf
    for c in range(fewest, max_servers + 1):
        w = erlang_wait(c, busy)
        err = abs(math.log(w / wait_ratio)) if w > 0 else math.inf
        if err < best_err:
            best, best_err = busy / c, err
        if w < wait_ratio:  # the wait only falls as servers are added
            break
    return min(1.0, max(0.3, best, one_server))


def estimate(
    obs: Observation, hint: np.ndarray, memory: Mapping[str, Memory], knobs: Knobs, dt: float, breaching: Sequence[int]
) -> tuple[Estimate, dict[str, Memory]]:
    """Capacity and headroom per endpoint, and the memory with ``good_rps``/``ceiling_rps``/
    ``cooldown`` updated (a ``breaching`` endpoint's capacity is cut: :func:`_breach_cut`)."""
    n = len(obs.endpoints)
    rps, p95, inflight = obs_field(obs, "rps"), obs_field(obs, "p95_ms"), obs_field(obs, "inflight")
    sat, err = obs_field(obs, "saturation"), obs_field(obs, "error_rate")
    hint = np.asarray(hint, dtype=np.float64).reshape(-1)
    avail = available_mask(obs)
    loads = np.where(np.isfinite(rps) & (rps > 0), rps, 0.0)
    demand = float(loads.sum())
    cap = np.full(n, math.nan)
    max_load = np.full(n, math.inf)
    congested = np.zeros(n, dtype=bool)
    out: dict[str, Memory] = {}
    for i, e in enumerate(obs.endpoints):
        m = memory.get(e.address, Memory())
        load = float(loads[i])
        good = m.good_rps * math.exp(-dt / GOOD_TAU_S)
        ceiling = m.ceiling_rps * math.exp(dt / CEILING_TAU_S) if math.isfinite(m.ceiling_rps) else math.nan
        queueing, ratio, stale, shed = _queueing(m, load, float(inflight[i]), float(p95[i]))
        queued = m.queued_rps * math.exp(dt / CEILING_TAU_S) if math.isfinite(m.queued_rps) else math.nan
        if queueing and load > 0:
            # How busy it is, from how much it queues at this load (M/M/c, servers inferred).
            util = queue_utilisation(load * m.base_ms / 1000.0, ratio - 1.0) if math.isfinite(m.base_ms) else 1.0
            ceiling = load / util
            congested[i] = True
            queued = load * shed
        elif load >= MIN_PROBE_RPS and not queueing and i not in breaching:
            good = max(good, load)
        # The backend's own saturation gauge (or an ORCA utilisation) when it reports one.
        measured = load / sat[i] if math.isfinite(sat[i]) and sat[i] > 0.02 and load > 0 else math.nan
        prior = hint[i] if math.isfinite(hint[i]) and hint[i] > 0 else math.nan
        # The most load a safe move may grow an uncongested endpoint to.
        bound = min(knobs.growth * max(good, load, knobs.probe_share * demand), load + knobs.max_step * demand)
        c = _capacity(load, good, ceiling, bool(congested[i]), measured, prior, bound, knobs.safe_moves)
        if math.isfinite(err[i]) and err[i] > 0 and math.isfinite(c):
            c *= max(0.1, 1.0 - 2.0 * err[i])
        if i in breaching and load > 0:
            c = _breach_cut(c, m, e, load, float(p95[i]), float(err[i]), knobs)
            queued = min(queued, c) if math.isfinite(queued) else c  # growth stops short of what the breach left it
        cap[i] = c if avail[i] else 0.0
        # A breacher, like a congested endpoint, waits before it may grow again (ping-pong).
        cooldown = knobs.cooldown if congested[i] or i in breaching else max(0, m.cooldown - 1)
        if knobs.safe_moves:
            max_load[i] = _max_load(m, bool(congested[i]), c, load, good, ceiling, measured, bound, queued)
        ceiling = ceiling if math.isfinite(ceiling) else math.nan
        out[e.address] = replace(
            m, good_rps=good, ceiling_rps=ceiling, queued_rps=queued, cooldown=cooldown, stale_inflight=stale
        )
    # Unknown capacity: the median of the known, else all traffic (max_load bounds growth).
    known = np.isfinite(cap) & (cap > 0)
    cap[~np.isfinite(cap)] = float(np.median(cap[known])) if known.any() else max(demand, 1.0)
    return Estimate(cap, max_load, congested), out


def _queueing(m: Memory, load: float, inflight: float, p95: float) -> tuple[bool, float, bool, float]:
    """``(queueing, wait over baseline, in-flight read stale, shed)`` by the endpoint's own baseline; ``shed``: the
    fraction of its load to keep so its median falls back under the limit (limit / wait, near what M/M/1 needs)."""
    limit = CONGESTED_RATIO + CONGESTED_SLACK_MS / m.base_ms if math.isfinite(m.base_ms) and m.base_ms > 0 else math.inf
    queueing = bool(load >= MIN_PROBE_RPS and math.isfinite(m.ratio) and m.ratio > limit)
    # Or in-flight requests far older than what completes (Little's law): a stuck endpoint's latency reads stale.
    q = inflight if math.isfinite(inflight) and inflight > 0 else 0.0
    recent = p95 if math.isfinite(p95) else (m.base_ms if math.isfinite(m.base_ms) else math.nan)
    little_ratio = math.nan
    stale = False
    if q >= 2.0:
        little_ms = 1000.0 * q / load if load > 0 else math.inf
        # rq_active is a sampled gauge (high when scrapes meet bursts): twice running if p95 is fresh.
        stale = not math.isfinite(recent) or little_ms > max(3.0 * recent, recent + 100.0)
        if stale and (m.stale_inflight or not math.isfinite(p95)):
            queueing = True
            if math.isfinite(m.base_ms) and m.base_ms > 0:
                little_ratio = little_ms / m.base_ms
    # The wait over the baseline: the median's, or Little's law's when that says more.
    waits = [r for r in (m.ratio, little_ratio) if math.isfinite(r)]
    wait = max(waits) if queueing and waits else 2 * CONGESTED_RATIO
    shed = max(MAX_BREACH_CUT, min(1.0, limit / wait)) if math.isfinite(limit) else MAX_BREACH_CUT
    return queueing, wait, stale, shed


def _capacity(
    load: float, good: float, ceiling: float, congested: bool, measured: float, prior: float, bound: float, safe: bool
) -> float:
    """Capacity by the best evidence there is (NaN: unknown)."""
    if math.isfinite(measured):
        return measured
    if congested:
        return ceiling
    if math.isfinite(ceiling):
        return max(ceiling, load)
    if math.isfinite(prior):
        return prior
    if load > 0 and safe:
        # What the growth bound lets it reach at UNCONGESTED_UTIL (so price and latency pick).
        return max(load, good, bound) / UNCONGESTED_UTIL
    return math.nan


def _breach_cut(
    c: float, m: Memory, e: EndpointObservation, load: float, p95: float, err: float, knobs: Knobs
) -> float:
    """A breacher's capacity capped at load x SLO / p95 (no lower than MAX_BREACH_CUT of it)
    and 1 - 2 x error rate: a slow dependency breaks the SLO with the backend half idle."""
    # The evidence's p95, or this window's when even its median misses (act at once).
    seen = latency_p95(m, knobs.slo_ms)
    if not math.isfinite(seen) or e.p50_ms > knobs.slo_ms:
        seen = max((v for v in (seen, p95) if math.isfinite(v)), default=math.nan)
    factor = max(MAX_BREACH_CUT, knobs.slo_ms / seen) if math.isfinite(seen) and seen > knobs.slo_ms else 1.0
    if math.isfinite(err):
        factor = min(factor, max(0.1, 1.0 - 2.0 * err))
    return min(c, load * factor) if math.isfinite(c) else load * factor


def _max_load(
    m: Memory,
    congested: bool,
    c: float,
    load: float,
    good: float,
    ceiling: float,
    measured: float,
    bound: float,
    queued: float,
) -> float:
    """The most load a safe move may give it now (inf: unbounded)."""
    if congested:
        # Back off at once, as far as it queues (``queued`` <= load): medians flatter a one-slot queue's capacity.
        return min(c, queued) if math.isfinite(c) else queued
    if m.cooldown > 0:
        # Backed off: the next window (still draining its queue) would hand it all back.
        return min(load, c) if math.isfinite(c) else load
    if math.isfinite(measured):
        return math.inf
    # Never seen queueing: what it carried cleanly lately is known headroom.
    grow = bound if math.isfinite(ceiling) else max(bound, good)
    # Short of the load it last queued at or a breach left it (else the ceiling read then), or it climbs back there.
    past = queued if math.isfinite(queued) else ceiling
    return min(grow, max(0.9 * past, load)) if math.isfinite(past) else grow
