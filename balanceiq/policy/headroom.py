"""Capacity and headroom per endpoint from what Envoy reports (see :mod:`.decide`)."""

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
# How fast a ceiling relaxes and the load carried cleanly is forgotten.
CEILING_TAU_S = 90.0
GOOD_TAU_S = 120.0
# An endpoint that is not queueing is taken to run at no more than this utilisation.
UNCONGESTED_UTIL = 0.5
# Below this load an endpoint is too quiet for its latency to say anything about capacity.
MIN_PROBE_RPS = 1.0
# A breacher's capacity is cut to load x SLO / p95, but by at most this factor per
# decision: latency grows faster than linearly with load near capacity, so a linear cut
# sheds far more than the SLO needs, and the endpoints taking it over queue next.
MAX_BREACH_CUT = 0.5


@dataclass(frozen=True)
class Estimate:
    """Per endpoint: capacity for the LP, the most load it may get now, and why."""

    capacity: np.ndarray  # rps; the LP's utilisation denominator
    max_load: np.ndarray  # rps; inf = unbounded
    congested: np.ndarray  # bool: queueing now (or overloaded)
    baseline_ms: np.ndarray


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
    (rate x baseline service time), ``wait_ratio`` the queueing delay over the service
    time; the server count whose M/M/c wait matches best gives ``busy / servers``,
    clamped to [0.3, 1] because a median is a noisy measure of a mean wait."""
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


def estimate(
    obs: Observation,
    hint: np.ndarray,
    memory: Mapping[str, Memory],
    knobs: Knobs,
    dt: float,
    breaching: Sequence[int] = (),
) -> tuple[Estimate, dict[str, Memory]]:
    """Capacity and headroom per endpoint; returns the estimate and the memory with
    ``good_rps``/``ceiling_rps``/``cooldown`` updated. A ``breaching`` endpoint's capacity
    is also cut in proportion to how far it is out of bounds (:func:`_breach_cut`)."""
    n = len(obs.endpoints)
    rps, p95, inflight = obs_field(obs, "rps"), obs_field(obs, "p95_ms"), obs_field(obs, "inflight")
    sat, err = obs_field(obs, "saturation"), obs_field(obs, "error_rate")
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
        queueing, ratio, stale = _queueing(m, load, float(inflight[i]), float(p95[i]))
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
        c = _capacity(load, good, ceiling, bool(congested[i]), measured, prior, knobs, demand)
        if math.isfinite(err[i]) and err[i] > 0 and math.isfinite(c):
            c *= max(0.1, 1.0 - 2.0 * err[i])
        if i in breaching and load > 0:
            c = _breach_cut(c, m, e, load, float(p95[i]), float(err[i]), knobs)
        cap[i] = c
        # A breacher, like a congested endpoint, waits before it may grow again: its next
        # window may well read fine (a tail is bursty), and regrowing at once is ping-pong.
        cooldown = knobs.cooldown if congested[i] or i in breaching else max(0, m.cooldown - 1)
        if knobs.safe_moves:
            max_load[i] = _max_load(m, bool(congested[i]), c, load, good, ceiling, measured, knobs, demand)
        if not avail[i]:
            cap[i] = 0.0
        ceiling = ceiling if math.isfinite(ceiling) else math.nan
        out[e.address] = replace(m, good_rps=good, ceiling_rps=ceiling, cooldown=cooldown, stale_inflight=stale)
    # Unknown capacity: typical (the median of the known), else enough for all traffic;
    # growth is bounded by max_load, so this only lets cost and latency decide where it goes.
    unknown = ~np.isfinite(cap)
    if unknown.any():
        known = np.isfinite(cap) & (cap > 0)
        cap[unknown] = float(np.median(cap[known])) if known.any() else max(demand, 1.0)
    return Estimate(cap, max_load, congested, base_out), out


def _queueing(m: Memory, load: float, inflight: float, p95: float) -> tuple[bool, float, bool]:
    """``(queueing, wait over baseline, in-flight read stale)`` by the endpoint's own baseline."""
    # The median well above the baseline ...
    limit = CONGESTED_RATIO + CONGESTED_SLACK_MS / m.base_ms if math.isfinite(m.base_ms) and m.base_ms > 0 else math.inf
    queueing = bool(load >= MIN_PROBE_RPS and math.isfinite(m.ratio) and m.ratio > limit)
    # ... or requests in flight far older than what completes (Little's law: their time
    # in system is in-flight / rate): a stuck endpoint completes little, so its latency
    # reads stale while Envoy's rq_active climbs.
    q = inflight if math.isfinite(inflight) and inflight > 0 else 0.0
    recent = p95 if math.isfinite(p95) else (m.base_ms if math.isfinite(m.base_ms) else math.nan)
    little_ratio = math.nan
    stale = False
    if q >= 2.0:
        little_ms = 1000.0 * q / load if load > 0 else math.inf
        # Far older, not merely older: rq_active is a sampled gauge that reads high when
        # scrapes meet bursts. Against a fresh latency it must say so twice running;
        # without one, once is enough.
        stale = not math.isfinite(recent) or little_ms > max(3.0 * recent, recent + 100.0)
        if stale and (m.stale_inflight or not math.isfinite(p95)):
            queueing = True
            if math.isfinite(m.base_ms) and m.base_ms > 0:
                little_ratio = little_ms / m.base_ms
    # How long requests wait, over the baseline: the median's word, or Little's law's
    # when that says more (a median of the few that complete reads as no queue at all).
    waits = [r for r in (m.ratio, little_ratio) if math.isfinite(r)]
    return queueing, max(waits) if queueing and waits else 2 * CONGESTED_RATIO, stale


def _capacity(
    load: float,
    good: float,
    ceiling: float,
    congested: bool,
    measured: float,
    prior: float,
    knobs: Knobs,
    demand: float,
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
    if load > 0 and knobs.safe_moves:
        # Carrying this much without queueing: it can take what the growth bound lets it
        # grow to at no more than UNCONGESTED_UTIL (the bound, not this guess, keeps it
        # from being flooded; the guess lets price and latency pick).
        grown = min(knobs.growth * max(good, load, knobs.probe_share * demand), load + knobs.max_step * demand)
        return max(load, good, grown) / UNCONGESTED_UTIL
    return math.nan


def _breach_cut(
    c: float, m: Memory, e: EndpointObservation, load: float, p95: float, err: float, knobs: Knobs
) -> float:
    """A breacher's capacity capped at load x SLO / p95 (no lower than MAX_BREACH_CUT of it)
    and 1 - 2 x error rate: a slow dependency breaks the SLO with the backend half idle,
    and the LP must still move traffic off it as far as it is out of bounds."""
    # The evidence's p95, or this window's when even its median misses (a sudden
    # slowdown is acted on in full at once).
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
    knobs: Knobs,
    demand: float,
) -> float:
    """The most load a safe move may give it now (inf: unbounded)."""
    probe = knobs.probe_share * demand
    if congested or m.cooldown > 0:
        # Backed off: no growth for a few decisions, or the next window (still draining
        # its queue) would hand it back what it just lost: ping-pong.
        return min(load, c) if math.isfinite(c) else load
    if math.isfinite(measured):
        return math.inf
    bound = min(knobs.growth * max(good, load, probe), load + knobs.max_step * demand)
    if math.isfinite(ceiling):
        return min(bound, max(0.9 * ceiling, load))
    # Never seen queueing: what it carried cleanly lately is known headroom, not a probe;
    # after a queue, the ceiling decides instead.
    return max(bound, good)
