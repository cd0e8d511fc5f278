"""What the decision core remembers of each endpoint, and the breach evidence it keeps."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from balanceiq.policy.knobs import Knobs
from balanceiq.telemetry.observation import EndpointObservation, Observation

BREACH_ERROR_RATE = 0.05  # an error rate this high in one window is visible trouble
ERROR_MEMORY_S = 60.0  # time constant of the decayed error evidence
MIN_ERROR_EVIDENCE = 30.0  # requests it needs before it counts
BASELINE_TAU_S = 60.0  # how fast a baseline may rise (a slowed endpoint's new normal)
RECOVERY_DECISIONS = 6  # a recovered breacher stays critical this long (it grows back in bounded steps)
MIN_SAMPLES = 8.0  # requests a window needs before its median says anything (about latency or queueing)
BASELINE_STEP = 0.3  # how far one window below the baseline pulls it down
RATIO_SMOOTHING = 0.5  # a new window's weight in the smoothed median/baseline ratio (small windows are noisy)
LATENCY_EVIDENCE_S = 3.0  # time constant of the latency evidence: each window's log(p95 / SLO), request-weighted
MIN_LATENCY_EVIDENCE = 30.0  # requests it needs (one small window's p95 is noise)
# A trickle endpoint's evidence (fewer requests a window than a verdict needs) is kept until
# newer requests replace it, while its last p95 is at most this old: fading by time alone,
# a slow endpoint held at the min_share floor would never gather a verdict.
TRICKLE_EVIDENCE_S = 30.0
# A quiet breacher's first hold lasts this long, each further one (a breach again within
# STRIKE_MEMORY_S of the last) twice as long, up to ``breach_hold_s`` (like outlier ejection).
HOLD_BASE_S = 5.0
STRIKE_MEMORY_S = 60.0
FORGET_LOG = math.log(0.5)  # a recovered breacher's p95 this far under the SLO (log) ends its regrowth cap


@dataclass(frozen=True)
class Memory:
    """What the core remembers of one endpoint between decisions."""

    base_ms: float = math.nan  # lowest recent median latency
    ratio: float = math.nan  # median over baseline, smoothed over decisions
    good_rps: float = 0.0  # most load carried uncongested lately
    ceiling_rps: float = math.nan  # capacity read when it last queued (nan: never)
    queued_rps: float = math.nan  # load it last queued at, or a breach cut left it: growth stops short (relaxing)
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


def _f(x: float) -> float:
    return float(x) if math.isfinite(x) else math.nan


def latency_p95(m: Memory, slo_ms: float) -> float:
    """The p95 the latency evidence stands for (NaN: not enough of it)."""
    return slo_ms * math.exp(m.slow_log) if m.slow_n >= MIN_LATENCY_EVIDENCE and math.isfinite(m.slow_log) else math.nan


def remember(
    obs: Observation, shares: np.ndarray, knobs: Knobs, state: CoreState, now: float
) -> tuple[dict[str, Memory], list[int], list[int], list[int]]:
    """Update each endpoint's memory; returns it, the breachers measured now, the quiet
    breachers held, and the endpoints whose price changed."""
    dt = max(0.0, now - state.at) if state.at is not None else 0.0
    decay = math.exp(-dt / ERROR_MEMORY_S) if state.at is not None else 0.0
    fade = math.exp(-dt / LATENCY_EVIDENCE_S) if state.at is not None else 0.0
    window = obs.window_s if math.isfinite(obs.window_s) and obs.window_s > 0 else max(dt, 1.0)
    mem: dict[str, Memory] = {}
    flags: list[tuple[bool, bool, bool]] = []  # (measured, held, repriced)
    for i, e in enumerate(obs.endpoints):
        m = state.memory.get(e.address, Memory())
        req, err, erring = _error_evidence(e, m, knobs, decay, window)
        slow_n, slow_log, slow, within = _latency_evidence(e, m, knobs, fade, window, now)
        measured = erring or slow or (math.isfinite(e.error_rate) and e.error_rate >= BREACH_ERROR_RATE)
        m = replace(m, requests=req, errors=err, slow_log=_f(slow_log), slow_n=slow_n)
        m, is_held = _episode(m, measured, within, knobs, now)
        m, is_repriced = _price(m, e, float(shares[i]))
        mem[e.address] = _baseline(m, e, window, dt, now)
        flags.append((measured, is_held, is_repriced))
    breaching, held, repriced = ([i for i, f in enumerate(flags) if f[j]] for j in range(3))
    return mem, breaching, held, repriced


def _error_evidence(
    e: EndpointObservation, m: Memory, knobs: Knobs, decay: float, window: float
) -> tuple[float, float, bool]:
    """Decayed request and error counts, so a steady trickle of errors breaches too."""
    seen = e.rps * window if math.isfinite(e.rps) and e.rps > 0 and math.isfinite(e.error_rate) else 0.0
    req = m.requests * decay + seen
    err = m.errors * decay + (e.error_rate * seen if seen else 0.0)
    return req, err, req >= MIN_ERROR_EVIDENCE and err / req >= knobs.breach_error_rate


def _latency_evidence(
    e: EndpointObservation, m: Memory, knobs: Knobs, fade: float, window: float, now: float
) -> tuple[float, float, bool, bool]:
    """``(slow_n, slow_log, breaching, within the SLO)`` by the latency evidence."""
    n = e.rps * window if math.isfinite(e.rps) and e.rps > 0 else 0.0
    slow_n, slow_log = m.slow_n * fade, m.slow_log
    fresh = n > 0 and math.isfinite(e.p95_ms) and e.p95_ms > 0
    # Only a window over the SLO extends trickle evidence: a fast one lets the old fade, or a
    # recovered endpoint would be re-judged on its past at every trickle window.
    still_slow = not fresh or e.p95_ms > knobs.slo_ms
    if still_slow and math.isfinite(m.p95_at) and now - m.p95_at <= TRICKLE_EVIDENCE_S:
        slow_n = max(slow_n, min(m.slow_n, MIN_LATENCY_EVIDENCE - n))
    if fresh:
        x = math.log(e.p95_ms / knobs.slo_ms)
        slow_log = x if not math.isfinite(slow_log) or slow_n <= 0 else (slow_log * slow_n + x * n) / (slow_n + n)
        slow_n += n
    # Judged only on a window that measured it, or at once when even its median misses.
    evidence = fresh and slow_n >= MIN_LATENCY_EVIDENCE
    median_miss = n >= MIN_SAMPLES and math.isfinite(e.p50_ms) and e.p50_ms > knobs.slo_ms
    # Within the SLO on less evidence than a breach needs (a breacher gets only a trickle).
    within = fresh and slow_n >= MIN_SAMPLES and slow_log <= 0
    return slow_n, slow_log, median_miss or (evidence and slow_log > 0), within


def _episode(m: Memory, measured: bool, within: bool, knobs: Knobs, now: float) -> tuple[Memory, bool]:
    """The breach episode: strikes, a quiet breacher's hold, recovery; ``(memory, held)``."""
    breached_at, strikes, cleared_at = m.breached_at, m.strikes, m.cleared_at
    recovering = max(0, m.recovering - 1)
    queued, held = m.queued_rps, False
    if measured:
        if not math.isfinite(breached_at):
            recent = math.isfinite(cleared_at) and now - cleared_at <= STRIKE_MEMORY_S
            strikes = strikes + 1 if recent else 1
        breached_at, recovering = now, 0
    elif math.isfinite(breached_at):
        hold = min(knobs.breach_hold_s, HOLD_BASE_S * 2.0 ** max(0, strikes - 1))
        held = not within and now - breached_at <= hold
        if not held:
            # Within the SLO again, or unmeasured the whole hold: re-optimised a while to win traffic back.
            breached_at, recovering, cleared_at = math.nan, RECOVERY_DECISIONS, now
    if not math.isfinite(breached_at) and now - cleared_at <= STRIKE_MEMORY_S and not m.slow_log > FORGET_LOG:
        # Recovered and far under the SLO: the incident is over. Nearer, growing back to where it breached breaches again.
        queued = math.nan
    return replace(
        m, breached_at=breached_at, strikes=strikes, cleared_at=cleared_at, recovering=recovering, queued_rps=queued
    ), held


def _price(m: Memory, e: EndpointObservation, share: float) -> tuple[Memory, bool]:
    """A price change is re-optimised at once; a rise caps the share while it lasts."""
    price = e.cost_per_million
    dearer_from, dearer_share = m.dearer_from, m.dearer_share
    repriced = False
    if math.isfinite(price) and math.isfinite(m.price) and abs(price - m.price) > 1e-12 * max(1.0, m.price):
        repriced = True
        if price > m.price and not math.isfinite(dearer_from):
            dearer_from, dearer_share = m.price, share
    if math.isfinite(dearer_from) and math.isfinite(price) and price <= dearer_from:
        dearer_from = dearer_share = math.nan
    price = _f(price) if math.isfinite(price) else m.price
    return replace(m, price=price, dearer_from=dearer_from, dearer_share=dearer_share), repriced


def _baseline(m: Memory, e: EndpointObservation, window: float, dt: float, now: float) -> Memory:
    """The lowest median lately, allowed to drift up (a slowed endpoint's new normal) but
    never above what is measured now; the smoothed median/baseline ratio; the last p95."""
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
        # Too quiet to measure now: how it queued before says nothing about today.
        smooth = math.nan
    ceiling = m.ceiling_rps
    if m.recovering == RECOVERY_DECISIONS:
        # The incident is over: how it queued while slow says nothing now; its ceiling then is no cap.
        smooth = p50 / base if math.isfinite(p50) and math.isfinite(base) else math.nan
        if math.isfinite(ceiling):
            ceiling = max(ceiling, m.good_rps)
    usable = e.usable and math.isfinite(e.p95_ms)
    return replace(
        m,
        ceiling_rps=ceiling,
        base_ms=_f(base),
        ratio=_f(smooth),
        p95_ms=e.p95_ms if usable else m.p95_ms,
        p95_at=now if usable else m.p95_at,
    )
