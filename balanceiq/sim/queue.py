"""One endpoint's latency model: an M/G/c queue behind a fixed delay.

Service is a fixed part plus an exponential part (coefficient of variation ``cv`` of that
core), with an optional slow tail (``tail_prob`` of requests hold their slot ``tail_ms``
longer), as the lab's sample backends serve. The wait is Erlang C's: the chance of waiting
by Sakasegawa's approximation (exact for one server), the wait itself exponential, scaled
by Allen-Cunneen's (1 + cs^2) / 2. With one server, cv 1 and no tail it is the M/M/1
sojourn exactly. Past ``RHO_SAT`` the queue fills until requests wait out the timeout, unless
a least-request balancer's chain gives the wait (see :func:`build`).

Arrays broadcast: endpoint parameters against loads of any shape; the last axis of
``offset``/``weight`` indexes the mixture of fixed delays (overload, tails).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import exprel

RHO_SAT = 0.98  # Utilisation from which an endpoint counts as overloaded (the queue model stops applying).
RHO_FULL = 1.1  # Utilisation at which every request served waits the full timeout.
TIMEOUT_MS = 2000.0  # Default cap on the time beyond the fixed delay (queueing plus service plus brownout).
TAIL_FRACTION = 0.1  # Share of requests a ``tail_latency`` event slows down unless it says otherwise.

_NEWTON_STEPS = 40


@dataclass(frozen=True)
class Queue:
    """The time beyond the fixed delay, ``min(offset_j + E + B W, timeout)`` with
    probability ``weight_j``: E exponential service (rate ``alpha`` per ms), W the wait
    (rate ``theta``) taken with probability ``p_wait``."""

    alpha: np.ndarray
    theta: np.ndarray
    p_wait: np.ndarray
    offset: np.ndarray
    weight: np.ndarray
    timeout: float
    exponential: bool = False
    """Every endpoint is M/M/1 (one server, exponential service): ``E + B W`` is then
    exponential with rate ``theta``, which the fast paths use."""


def build(
    capacity: np.ndarray,
    servers: np.ndarray,
    cv: np.ndarray,
    tail_prob: np.ndarray,
    tail_ms: np.ndarray,
    load: np.ndarray,
    event_tail: tuple[np.ndarray, np.ndarray] | None = None,
    timeout_ms: float = TIMEOUT_MS,
    wait: tuple[np.ndarray, np.ndarray] | None = None,
    backlog_ms: np.ndarray | None = None,
) -> Queue:
    """The queue of endpoints with these parameters (capacity in req/s) under ``load``
    req/s; ``event_tail`` (ms, fraction) adds that much to that share of requests.
    ``wait`` (chance of waiting, mean wait in ms when waiting) replaces Erlang C's where a
    balancer decides by queue length (:mod:`balanceiq.sim.balancer`), and the overload
    past ``RHO_SAT`` too: that balancer sends less the more requests wait and the chain's
    waits are all of them, so only the load above capacity waits out the timeout. ``backlog_ms`` (the
    last axis: arrivals spread over the step) is the wait behind a backlog carried from earlier steps,
    in place of the overload ramp."""
    extra = load.ndim - capacity.ndim
    mu, c, cv, tp, tm = (np.reshape(x, x.shape + (1,) * extra) for x in (capacity, servers, cv, tail_prob, tail_ms))
    rho = load / mu
    rho_e = np.minimum(rho, RHO_SAT)
    core, exp_ms, cs2 = service(mu, c, cv, tp, tm)
    alpha = 1.0 / exp_ms
    theta = mu * (1.0 - rho_e) * 1e-3 * 2.0 / (1.0 + cs2)
    p_wait = rho_e ** (np.sqrt(2.0 * (c + 1.0)) - 1.0)
    if wait is None and backlog_ms is None:
        shift = np.clip((rho - RHO_SAT) * (timeout_ms / (RHO_FULL - RHO_SAT)), 0.0, timeout_ms)
    else:  # the chain's waits (every request Envoy counts active) or the carried backlog are the queue
        shift = np.zeros_like(rho)
    if wait is not None:
        p_wait, wait_ms = (np.reshape(x, x.shape + (1,) * extra) for x in wait)
        theta = 2.0 / (1.0 + cs2) / np.maximum(wait_ms, 1e-9)
        # Past capacity only the excess has nowhere to go: it waits out the timeout (the backends' queues are unbounded).
        late = 1.0 - 1.0 / np.maximum(rho, 1.0)
    fixed = (core - exp_ms) + shift
    offsets, weights = [fixed], [np.ones_like(fixed)]
    if np.any(tp > 0):
        offsets, weights = [fixed, fixed + tm], [1.0 - tp + 0 * fixed, tp + 0 * fixed]
    if event_tail is not None:
        v, f = (np.reshape(x, x.shape + (1,) * extra) for x in event_tail)
        offsets += [o + v for o in offsets]
        weights = [w * (1 - f) for w in weights] + [w * f for w in weights]
    if backlog_ms is not None:
        k = backlog_ms.shape[-1]
        offsets = [o + backlog_ms[..., j] for j in range(k) for o in offsets]
        weights = [w / k for _ in range(k) for w in weights]
    if wait is not None and np.any(late > 0):
        offsets, weights = [*offsets, np.full_like(fixed, timeout_ms)], [*(w * (1 - late) for w in weights), late]
    exponential = wait is None and bool(np.all(c == 1) and np.all(cv == 1))
    offset, weight = np.stack(offsets, axis=-1), np.stack(weights, axis=-1)
    return Queue(alpha, theta, p_wait, offset, weight, float(timeout_ms), exponential)


def service(
    capacity: np.ndarray, servers: np.ndarray, cv: np.ndarray, tail_prob: np.ndarray, tail_ms: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A slot's hold without the tail and its exponential part (ms), and its squared coefficient of variation."""
    mean_ms = 1000.0 * servers / capacity
    core = mean_ms - tail_prob * tail_ms
    exp_ms = cv * core
    return core, exp_ms, (exp_ms * exp_ms + tail_prob * (1 - tail_prob) * tail_ms * tail_ms) / (mean_ms * mean_ms)


def held(servers: np.ndarray, cs2: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Mean requests an endpoint holds (in service and waiting) in equilibrium at utilisation ``rho`` < 1,
    service's squared coefficient of variation ``cs2`` (:func:`service`), by :func:`build`'s
    approximations (Little's law on its mean wait)."""
    p_wait = rho ** (np.sqrt(2.0 * (servers + 1.0)) - 1.0)
    return servers * rho + p_wait * rho / (1.0 - rho) * (1.0 + cs2) / 2.0


def mm1(mu: np.ndarray, rho: np.ndarray, timeout_ms: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An M/M/1 endpoint in closed form (the sojourn is exponential): its rate per ms, the
    overload shift (ms) and the mean time beyond the fixed delay, the timeout included."""
    r = mu * (1.0 - np.minimum(rho, RHO_SAT)) * 1e-3
    shift = np.clip((rho - RHO_SAT) * (timeout_ms / (RHO_FULL - RHO_SAT)), 0.0, timeout_ms)
    gap = np.maximum(timeout_ms - shift, 0.0)
    return r, shift, timeout_ms - gap - np.expm1(-r * gap) / r


def _g(y: np.ndarray, a: np.ndarray, t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Survival of ``E + B W`` at ``y`` and its derivative (1 and 0 for y < 0)."""
    yp = np.maximum(y, 0.0)
    lo = np.minimum(a, t)
    # (t e^-ay - a e^-ty) / (t - a), written so that t -> a and large y stay finite.
    rel = exprel(-np.abs(t - a) * yp) * yp
    el = np.exp(-lo * yp)
    ea = np.exp(-a * yp)
    g = (1.0 - p) * ea + p * el * (1.0 + lo * rel)
    dg = -a * (1.0 - p) * ea - p * a * t * el * rel
    neg = y < 0.0
    return np.where(neg, 1.0, g), np.where(neg, 0.0, dg)


def _integral(g: np.ndarray, a: np.ndarray, t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The integral of the survival of ``E + B W`` from 0 to ``g`` (>= 0)."""
    ia = -np.expm1(-a * g) / a
    it = -np.expm1(-t * g) / t
    diff = t - a
    near = np.abs(diff) <= 1e-7 * a
    ih = np.where(near, (2.0 - (2.0 + a * g) * np.exp(-a * g)) / a, (t * ia - a * it) / np.where(near, 1.0, diff))
    return (1.0 - p) * ia + p * ih


def _mixture(q: Queue, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Survival of the time beyond the fixed delay at ``x`` (< timeout), and its derivative;
    ``x`` has the queue's shape plus any trailing axes."""
    extra = x.ndim - q.alpha.ndim
    a, t, p = (np.reshape(v, v.shape + (1,) * (extra + 1)) for v in (q.alpha, q.theta, q.p_wait))
    o, w = (np.reshape(v, v.shape[:-1] + (1,) * extra + v.shape[-1:]) for v in (q.offset, q.weight))
    y = x[..., None] - o
    if q.exponential:
        g = np.exp(-t * np.maximum(y, 0.0))
        return (w * g).sum(axis=-1), (w * np.where(y < 0.0, 0.0, -t * g)).sum(axis=-1)
    g, dg = _g(y, a, t, p)
    return (w * g).sum(axis=-1), (w * dg).sum(axis=-1)


def survival(q: Queue, x: np.ndarray) -> np.ndarray:
    """P(time beyond the fixed delay > x); 0 from the timeout on."""
    s, _ = _mixture(q, np.minimum(x, q.timeout))
    return np.where(x >= q.timeout, 0.0, s)


def mean(q: Queue) -> np.ndarray:
    """Mean time beyond the fixed delay (ms), the timeout included."""
    a, t, p = (v[..., None] for v in (q.alpha, q.theta, q.p_wait))
    gap = np.maximum(q.timeout - q.offset, 0.0)
    return (q.weight * (np.minimum(q.offset, q.timeout) + _integral(gap, a, t, p))).sum(axis=-1)


def quantiles(q: Queue, levels: np.ndarray) -> np.ndarray:
    """Quantiles of the time beyond the fixed delay (ms); shape: the queue's plus ``levels``'."""
    shape = q.alpha.shape + levels.shape
    target = np.broadcast_to(1.0 - levels, shape)
    lo = np.zeros(shape)
    hi = np.full(shape, q.timeout)
    # Exact for a single exponential-like component: the Newton steps then change nothing.
    scale = 1.0 / q.alpha + q.p_wait / q.theta
    x = np.clip(q.offset[..., :1] - scale[..., None] * np.log(target), 0.0, q.timeout)
    if q.exponential and q.offset.shape[-1] == 1:
        return x
    capped = _mixture(q, hi)[0] >= target
    for _ in range(_NEWTON_STEPS):
        s, ds = _mixture(q, x)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = (np.log(s) - np.log(target)) * s / ds
        done = np.abs(step) <= 1e-12 * np.maximum(x, 1e-9)
        if np.all(done | capped):
            break
        above = s > target
        lo = np.where(above, x, lo)
        hi = np.where(above, hi, x)
        nxt = x - step
        bad = ~np.isfinite(nxt) | (nxt <= lo) | (nxt >= hi)
        x = np.where(done, x, np.where(bad, 0.5 * (lo + hi), nxt))
    return np.where(capped, q.timeout, x)
