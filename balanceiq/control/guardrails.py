"""Guardrails between the policy's proposal and the weights Envoy receives.

The policy and the LP propose traffic shares; nothing reaches Envoy before
:meth:`Guardrails.apply` has turned them into shares that are safe to publish, and then
into integer weights. Operators steer it with :class:`OverrideTable` (pin, drain, set),
and :class:`RollbackMonitor` decides whether the learned policy or the baseline heuristic
proposes at all.

**What :meth:`Guardrails.apply` does, in this order, and why this order**

1. *Sanitise.* NaN, negative and infinite entries of ``current`` and ``proposed`` become
   0, both are renormalised to sum 1; an all-zero vector becomes an equal split over the
   routable endpoints. A length mismatch is a programming error, not a number problem,
   and raises :class:`~balanceiq.exceptions.GuardrailError`. Everything after this step
   may assume clean probability vectors.
2. *Routable set.* Routable = available and not drained. Drained and unavailable
   endpoints get share 0 *at once*, exempt from ``max_shift``: safety beats smoothness,
   and ramping traffic off a dead host would only mean failing requests more slowly.
   If nothing is routable the guardrails stop here and split equally over the available
   endpoints (drains are then ignored: an up endpoint that is drained beats an outage),
   or, if nothing is available either, over the endpoints that are not drained (or all
   of them): Envoy must still get valid weights, and its own health checks and panic
   threshold know better than a controller that sees nothing alive. Each case is noted.
3. *Fixed shares.* "pin" and "set" endpoints that are routable get exactly their
   override's share, also at once (an operator's explicit instruction is not smoothed).
   The other routable endpoints share ``1 - sum(fixed)`` in proportion to the proposal.
   Fixed shares of endpoints that are not routable are released to the others. If the
   fixed shares sum to more than 1, or every routable endpoint is fixed and they do not
   sum to 1, they are scaled to fit (noted): the shares must sum to 1 whatever happens.
   This comes before the floor because fixed endpoints are exempt from it.
   An endpoint breaching the SLO never gains share here, whoever proposed it (the
   baseline after a rollback knows nothing of breaches): its excess goes to the others
   in proportion to their target.
4. *Floor.* Every routable, non-fixed endpoint gets at least ``min_share`` (an SLO
   breacher only ``breach_min_share``), so the controller keeps seeing fresh latency
   from it. If the floors do not fit (their sum exceeds the free share) they are scaled
   to sum to half of it (noted), which still leaves the other half to the proposal. Endpoints raised to the floor are
   paid for by the others *in proportion to their excess over the floor*, which keeps
   every payer at or above the floor (the total excess is never smaller than the total
   deficit when the floors fit).
5. *max_shift.* ``forced`` is ``current`` with steps 2-3 applied: drained/unavailable
   endpoints zeroed, fixed shares set, the other routable endpoints rescaled to the free
   share (if they carried no traffic at all, they take the target's split: there is no
   current distribution to ramp from). Then what the target takes off an endpoint
   *breaching the SLO* is taken at once too, and handed to the non-breaching endpoints
   the target adds traffic to, in proportion to what they gain (never beyond it): every
   decision that leaves a breacher at full share keeps failing requests on it. If ``traffic_moved(forced, target) > max_shift``,
   the final shares are ``forced + alpha * (target - forced)`` with
   ``alpha = max_shift / moved``. That is a convex combination of two vectors that both
   sum to 1, carry the same fixed shares and zeros, so those survive exactly. Both are at
   or above the floor wherever ``forced`` is, so the result is too; an endpoint that just
   came back (0 in ``forced``) ramps up to the floor over a few decisions instead of
   jumping there, which is the point of the limit. Coming last, the limit sees the real
   change the proposal asks for, floors included, and nothing after it can undo it.
6. *Weights.* ``shares_to_weights(final, scale=10000, available=routable)``: integers in
   ``[1, 2**32-1]`` summing to 10,000 (or n); Envoy forbids weight 0, so drained and
   unavailable endpoints get weight 1 and their health status ("DRAINING" for drains,
   Envoy's own health checks for the rest) keeps traffic off them.

``GuardResult.moved`` is ``traffic_moved`` from the sanitised ``current`` to the final
shares, forced moves included, so it can exceed ``max_shift`` only when something was
forced (a drain, an endpoint going down, a new fixed share, a fallback).
"""

from __future__ import annotations

import math
import operator
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from balanceiq.config import GuardrailConfig
from balanceiq.exceptions import GuardrailError
from balanceiq.policy.lp import shares_to_weights, traffic_moved

#: The controller's weights always sum to this; a "set" weight w means share w / WEIGHT_SCALE.
WEIGHT_SCALE = 10000

Action = Literal["pin", "drain", "set"]
Mode = Literal["policy", "baseline"]

_ACTIONS: tuple[str, ...] = ("pin", "drain", "set")
_FIXED: tuple[str, ...] = ("pin", "set")
# Shares are floats: a sum within this of 1 is 1 (and fixed shares may sum to 1 + this).
_SUM_TOL = 1e-9
# Forced moves smaller than this are not worth a note: a drained endpoint keeps weight 1,
# so a ``current`` derived from realised weights always shows ~1e-4 on it.
_NOTE_TOL = 1e-3
_MAX_NAMES = 5
_TRANSITIONS_KEPT = 20

__all__ = [
    "WEIGHT_SCALE",
    "GuardResult",
    "Guardrails",
    "Override",
    "OverrideTable",
    "RollbackMonitor",
]


# -- small helpers ---------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    """Numbers in notes and reasons: short, and ``n/a`` for a missing value."""
    return "n/a" if x is None else f"{x:.3g}"


def _names(names: Sequence[str]) -> str:
    """A readable, bounded list of endpoints for a note (40 addresses would drown it)."""
    if len(names) <= _MAX_NAMES:
        return ", ".join(names)
    return f"{', '.join(names[:_MAX_NAMES])} and {len(names) - _MAX_NAMES} more"


def _finite_float(name: str, value: object) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise GuardrailError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise GuardrailError(f"{name} must be finite, got {value!r}")
    return v


def _now(now: float | None) -> float:
    return time.time() if now is None else _finite_float("now", now)


def _int_arg(name: str, value: object, minimum: int) -> int:
    # bool is an int to Python, but ``after=True`` is a bug, not a count.
    if isinstance(value, bool):
        raise GuardrailError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise GuardrailError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise GuardrailError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return v


# -- overrides -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Override:
    """An operator's instruction for one endpoint, optionally with an expiry.

    ``share`` is the frozen share for "pin", ``weight / 10000`` for "set" and None for
    "drain". Validated on construction so a malformed override never reaches the loop.
    """

    address: str
    action: Action
    share: float | None
    expires_at: float | None  # unix time; None = until cleared
    reason: str = ""
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise GuardrailError(
                f"override action for {self.address} must be one of {', '.join(_ACTIONS)}, got {self.action!r}"
            )
        if self.action == "drain":
            if self.share is not None:
                raise GuardrailError(f"drain override for {self.address} takes no share, got {self.share!r}")
        else:
            share = _finite_float(f"share of {self.address}", self.share)
            if not 0.0 <= share <= 1.0:
                raise GuardrailError(f"share of {self.address} must be in [0, 1], got {self.share!r}")
        if self.expires_at is not None:
            _finite_float(f"expires_at of {self.address}", self.expires_at)

    @property
    def fixed(self) -> bool:
        """True for "pin" and "set": the endpoint's share is decided by the operator."""
        return self.action in _FIXED

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "action": self.action,
            "share": self.share,
            "weight": None if self.share is None else round(self.share * WEIGHT_SCALE),
            "expires_at": self.expires_at,
            "reason": self.reason,
            "created_at": self.created_at,
        }


class OverrideTable:
    """The active overrides, at most one per endpoint; a new one replaces the old.

    Thread-safe: the API thread writes while the control loop reads :meth:`active`.
    Every write is checked against the *active* overrides at its ``now``, so an operator
    cannot leave the loop without a routable endpoint or with fixed shares above 1.
    (Availability is not known here; :meth:`Guardrails.apply` handles what it changes.)
    """

    def __init__(self, addresses: Sequence[str]) -> None:
        addrs = [str(a) for a in addresses]
        dup = sorted(a for a, k in Counter(addrs).items() if k > 1)
        if dup:
            raise GuardrailError(f"duplicate endpoint address(es): {', '.join(dup)}")
        self._addresses = tuple(addrs)
        self._lock = threading.Lock()
        self._overrides: dict[str, Override] = {}

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    def _check_address(self, address: str) -> None:
        if address not in self._addresses:
            raise GuardrailError(f"unknown endpoint {address!r}: not one of {_names(self._addresses)}")

    @staticmethod
    def _ttl(address: str, ttl_s: float | None) -> float | None:
        if ttl_s is None:
            return None
        ttl = _finite_float(f"ttl_s for {address}", ttl_s)
        if ttl <= 0:
            raise GuardrailError(f"ttl_s for {address} must be > 0, got {ttl_s!r}")
        return ttl

    def _expire(self, now: float) -> None:
        for a in [a for a, o in self._overrides.items() if o.expired(now)]:
            del self._overrides[a]

    def _put(
        self,
        address: str,
        action: Action,
        share: float | None,
        what: str,
        ttl_s: float | None,
        reason: str,
        now: float | None,
    ) -> Override:
        self._check_address(address)
        ttl = self._ttl(address, ttl_s)
        t = _now(now)
        ov = Override(address, action, share, None if ttl is None else t + ttl, str(reason), t)
        with self._lock:
            self._expire(t)
            others = {a: o for a, o in self._overrides.items() if a != address}
            if action == "drain":
                if all(o.action == "drain" for o in others.values()) and len(others) == len(self._addresses) - 1:
                    raise GuardrailError(f"cannot drain {address}: it is the last routable endpoint")
            else:
                assert share is not None
                fixed = {a: o.share or 0.0 for a, o in others.items() if o.fixed}
                total = sum(fixed.values()) + share
                if total > 1.0 + _SUM_TOL:
                    held = ", ".join(f"{a}={s:.4g}" for a, s in sorted(fixed.items()))
                    raise GuardrailError(
                        f"cannot {what}: pinned/set shares would sum to {total:.4g} > 1 (already fixed: {held})"
                    )
            self._overrides[address] = ov
        return ov

    def pin(
        self,
        address: str,
        current_share: float,
        ttl_s: float | None = None,
        reason: str = "",
        now: float | None = None,
    ) -> Override:
        """Freeze ``address`` at ``current_share`` (the share it has now, in [0, 1])."""
        self._check_address(address)
        share = _finite_float(f"current_share of {address}", current_share)
        if not 0.0 <= share <= 1.0:
            raise GuardrailError(f"cannot pin {address}: current_share must be in [0, 1], got {current_share!r}")
        return self._put(address, "pin", share, f"pin {address} at share {share:.4g}", ttl_s, reason, now)

    def drain(self, address: str, ttl_s: float | None = None, reason: str = "", now: float | None = None) -> Override:
        """Take ``address`` out of rotation (share 0, health DRAINING) at once."""
        return self._put(address, "drain", None, f"drain {address}", ttl_s, reason, now)

    def set_weight(
        self, address: str, weight: int, ttl_s: float | None = None, reason: str = "", now: float | None = None
    ) -> Override:
        """Fix ``address`` at ``weight`` out of 10,000, i.e. share ``weight / 10000``."""
        self._check_address(address)
        if isinstance(weight, bool):
            raise GuardrailError(f"weight for {address} must be an integer in 1..{WEIGHT_SCALE}, got {weight!r}")
        try:
            w = operator.index(weight)
        except TypeError:
            raise GuardrailError(
                f"weight for {address} must be an integer in 1..{WEIGHT_SCALE}, got {weight!r}"
            ) from None
        if not 1 <= w <= WEIGHT_SCALE:
            raise GuardrailError(f"weight for {address} must be in 1..{WEIGHT_SCALE}, got {w}")
        return self._put(address, "set", w / WEIGHT_SCALE, f"set {address} to weight {w}", ttl_s, reason, now)

    def clear(self, address: str) -> bool:
        """Remove the override of ``address``; True if there was one (expired or not)."""
        self._check_address(address)
        with self._lock:
            return self._overrides.pop(address, None) is not None

    def active(self, now: float | None = None) -> dict[str, Override]:
        """The overrides in force at ``now``; expired ones are dropped from the table."""
        t = _now(now)
        with self._lock:
            self._expire(t)
            return dict(self._overrides)

    def to_json(self, now: float | None = None) -> list[dict[str, Any]]:
        active = self.active(now)
        return [active[a].to_json() for a in self._addresses if a in active]


# -- guardrails ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardResult:
    """What the guardrails made of one proposal: shares, Envoy weights and why."""

    shares: np.ndarray  # sums to 1 over the routable endpoints, 0 elsewhere
    weights: np.ndarray  # int64, each in [1, 2**32-1]
    health: dict[str, str]  # address -> "HEALTHY" | "DRAINING"
    moved: float  # traffic_moved(sanitised current, shares)
    notes: tuple[str, ...]  # one per guardrail that acted
    limited: bool  # max_shift acted

    def to_json(self, addresses: Sequence[str]) -> dict[str, Any]:
        addrs = [str(a) for a in addresses]
        if len(addrs) != len(self.shares):
            raise GuardrailError(f"addresses has {len(addrs)} entries, the result {len(self.shares)}")
        return {
            "endpoints": [
                {
                    "address": a,
                    "share": float(self.shares[i]),
                    "weight": int(self.weights[i]),
                    "health": self.health.get(a, "HEALTHY"),
                }
                for i, a in enumerate(addrs)
            ],
            "moved": float(self.moved),
            "limited": bool(self.limited),
            "notes": list(self.notes),
        }


def _vector(name: str, values: object, n: int) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise GuardrailError(f"{name} must be a vector of numbers: {exc}") from None
    if arr.shape[0] != n:
        raise GuardrailError(f"{name} has {arr.shape[0]} entries, expected {n} (one per endpoint)")
    return arr


def _mask(name: str, values: object, n: int) -> np.ndarray:
    arr = np.asarray(values).reshape(-1)
    if arr.shape[0] != n:
        raise GuardrailError(f"{name} has {arr.shape[0]} entries, expected {n} (one per endpoint)")
    if arr.dtype == bool:
        return arr.copy()
    try:
        f = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise GuardrailError(f"{name} must be a vector of booleans: {exc}") from None
    # As in the LP: NaN is "unknown", which must not take an endpoint down.
    return ~(np.isfinite(f) & (f == 0))


def _clean(v: np.ndarray, base: np.ndarray) -> np.ndarray:
    """NaN/negative/inf -> 0, then sum 1; all zero -> equal over ``base``."""
    s = np.where(np.isfinite(v) & (v >= 0), v, 0.0)
    top = float(s.max(initial=0.0))
    if top <= 0:
        return base / base.sum()
    s = s / top  # no overflow in the sum, whatever the magnitudes
    return s / s.sum()


class Guardrails:
    """Apply a :class:`GuardrailConfig` to each decision (module doc: order and why).

    ``config`` may be replaced at run time by assigning the attribute; each
    :meth:`apply` reads it once, so a decision never mixes two configs.
    """

    def __init__(self, config: GuardrailConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._decisions = 0
        self._limited = 0
        self._floored = 0
        self._last_notes: tuple[str, ...] = ()

    def apply(
        self,
        addresses: Sequence[str],
        current: np.ndarray,
        proposed: np.ndarray,
        available: np.ndarray,
        overrides: Mapping[str, Override],
        breaching: np.ndarray | None = None,
    ) -> GuardResult:
        cfg = self.config
        addrs = [str(a) for a in addresses]
        n = len(addrs)
        if n == 0:
            raise GuardrailError("addresses is empty: no endpoint to route to")
        cur_raw = _vector("current", current, n)
        prop_raw = _vector("proposed", proposed, n)
        avail = _mask("available", available, n)
        breach = np.zeros(n, dtype=bool) if breaching is None else _mask("breaching", breaching, n)
        notes: list[str] = []

        # Step 2 first (it decides what "equal over routable" in step 1 means).
        index = {a: i for i, a in enumerate(addrs)}
        unknown = sorted(a for a in overrides if a not in index)
        if unknown:
            notes.append(f"overrides: ignored for unknown endpoint(s) {_names(unknown)}")
        drained = np.zeros(n, dtype=bool)
        fixed = np.zeros(n, dtype=bool)
        fixed_val = np.zeros(n)
        for a, ov in overrides.items():
            i = index.get(a)
            if i is None:
                continue
            if ov.action == "drain":
                drained[i] = True
            elif ov.fixed:
                fixed[i] = True
                fixed_val[i] = float(ov.share or 0.0)
        routable = avail & ~drained

        if not routable.any():
            return self._fallback(addrs, cur_raw, avail, drained, notes, cfg)

        # Step 1: sanitise.
        cur = _clean(cur_raw, routable)
        prop = _clean(prop_raw, routable)

        for mask, label in ((drained & (cur > 0), "drained"), (~avail & ~drained & (cur > 0), "unavailable")):
            amount = float(cur[mask].sum())
            if amount > _NOTE_TOL:
                names = [addrs[i] for i in np.flatnonzero(mask)]
                notes.append(
                    f"{label}: moved {_fmt(amount)} of traffic off {_names(names)} at once (exempt from max_shift)"
                )

        # Step 3: fixed shares.
        released = fixed & ~routable & (fixed_val > 0)
        if released.any():
            names = [addrs[i] for i in np.flatnonzero(released)]
            notes.append(f"fixed: {_names(names)} not routable; pinned/set share released to the others")
        fixed &= routable
        fv = np.where(fixed, fixed_val, 0.0)
        free_mask = routable & ~fixed
        fsum = float(fv.sum())
        if fsum > 1.0 + _SUM_TOL:
            fv = fv / fsum
            notes.append(f"fixed: pinned/set shares sum to {_fmt(fsum)} > 1; scaled down to sum 1")
        elif not free_mask.any() and abs(fsum - 1.0) > _SUM_TOL:
            fv = fv / fsum if fsum > 0 else fixed / fixed.sum()
            notes.append(
                f"fixed: every routable endpoint is pinned/set but their shares sum to {_fmt(fsum)}; scaled to sum 1"
            )
        free = max(0.0, 1.0 - float(fv.sum()))
        m = int(free_mask.sum())
        target = fv.copy()
        if m:
            p = prop[free_mask]
            psum = float(p.sum())
            target[free_mask] = p / psum * free if psum > 0 else free / m
        if fixed.any():
            moved_fixed = np.abs(cur[fixed] - fv[fixed])
            if float(moved_fixed.max()) > _NOTE_TOL:
                held = [f"{addrs[i]}={fv[i]:.4g}" for i in np.flatnonzero(fixed) if abs(cur[i] - fv[i]) > _NOTE_TOL]
                notes.append(f"fixed: {_names(held)} set at once (operator override, exempt from max_shift)")

        # Step 3b: an SLO breacher never gains traffic (whoever proposes: the baseline after
        # a rollback knows nothing of breaches); the excess goes to the others.
        grow = free_mask & breach & (target > cur + _NOTE_TOL)
        others = free_mask & ~breach
        if grow.any() and float(target[others].sum()) > 0:
            excess = float((target - cur)[grow].sum())
            target[grow] = cur[grow]
            target[others] += target[others] / float(target[others].sum()) * excess
            notes.append(f"breaching: {_names([addrs[i] for i in np.flatnonzero(grow)])} kept from gaining traffic")

        # Step 4: floor (SLO breachers get the lower breach_min_share).
        floors = np.where(breach, float(cfg.breach_min_share), float(cfg.min_share))[free_mask]
        floor_acted = False
        if m and floors.max(initial=0.0) > 0:
            if float(floors.sum()) > free + _SUM_TOL:
                scale = free / (2 * float(floors.sum()))
                notes.append(
                    f"min_share: floors summing to {_fmt(float(floors.sum()))} do not fit in the free share "
                    f"{_fmt(free)}; floors scaled by {_fmt(scale)}"
                )
                floors = floors * scale
                floor_acted = True
            x = target[free_mask]
            below = x < floors
            if below.any():
                deficit = float((floors - x)[below].sum())
                above = np.where(below, 0.0, x - floors)
                total_excess = float(above.sum())
                if total_excess > 0:
                    x = np.where(below, floors, x - above / total_excess * deficit)
                else:  # only by rounding: the floors exactly fill the free share
                    x = floors / float(floors.sum()) * free
                target[free_mask] = np.maximum(x, 0.0)
                shown = sorted({_fmt(f) for f in floors[below]})
                notes.append(f"min_share: raised {int(below.sum())} endpoint(s) to the floor {' / '.join(shown)}")
                floor_acted = True

        # Step 5: max_shift, measured from ``forced``.
        forced = np.where(routable, cur, 0.0)
        forced[fixed] = fv[fixed]
        if m:
            c_free = float(forced[free_mask].sum())
            if c_free > 0:
                # Divide first: free / c_free overflows when c_free is subnormal.
                forced[free_mask] = forced[free_mask] / c_free * free
            else:
                forced[free_mask] = target[free_mask]
            # Moves off SLO breachers are not ramped (like a drain): what the proposal takes
            # off them goes at once where the proposal adds traffic.
            off = free_mask & breach & (forced > target + _NOTE_TOL)
            gain = np.where(free_mask & ~breach, np.maximum(target - forced, 0.0), 0.0)
            if off.any() and float(gain.sum()) > 0:
                drop = np.where(off, forced - target, 0.0)
                # Never more than the others are meant to gain (another breacher may be
                # the one gaining): the move must not overshoot the proposal.
                drop *= min(1.0, float(gain.sum()) / float(drop.sum()))
                amount = float(drop.sum())
                forced -= drop
                forced += gain / float(gain.sum()) * amount
                names = [addrs[i] for i in np.flatnonzero(off)]
                notes.append(
                    f"breaching: moved {_fmt(amount)} of traffic off {_names(names)} at once (exempt from max_shift)"
                )
        want = traffic_moved(forced, target)
        limited = want > cfg.max_shift
        if limited:
            alpha = float(cfg.max_shift) / want
            final = forced + alpha * (target - forced)
            final[fixed] = fv[fixed]  # already exact (f + alpha * 0); kept explicit
            final[~routable] = 0.0
            final = np.maximum(final, 0.0)
            notes.append(f"max_shift: proposal moved {_fmt(want)} of traffic, limited to {_fmt(cfg.max_shift)}")
        else:
            final = target

        # Step 6: weights.
        weights = shares_to_weights(final, scale=WEIGHT_SCALE, available=routable)
        health = {a: ("DRAINING" if drained[i] else "HEALTHY") for i, a in enumerate(addrs)}
        result = GuardResult(
            shares=final,
            weights=weights,
            health=health,
            moved=traffic_moved(cur, final),
            notes=tuple(notes),
            limited=bool(limited),
        )
        self._count(result, floor_acted)
        return result

    def _fallback(
        self,
        addrs: list[str],
        cur_raw: np.ndarray,
        avail: np.ndarray,
        drained: np.ndarray,
        notes: list[str],
        cfg: GuardrailConfig,
    ) -> GuardResult:
        """Nothing routable: an equal split over whatever is least bad (module doc, step 2)."""
        n = len(addrs)
        if avail.any():
            serve = avail.copy()
            notes.append(
                f"fallback: every available endpoint is drained; equal split over the {int(serve.sum())} "
                "available endpoint(s), drains ignored"
            )
        elif (~drained).any():
            serve = ~drained
            notes.append(
                f"fallback: no endpoint available; equal split over the {int(serve.sum())} not drained "
                "endpoint(s), Envoy's health checks decide"
            )
        else:
            serve = np.ones(n, dtype=bool)
            notes.append(f"fallback: no endpoint available and all drained; equal split over all {n}")
        final = serve / serve.sum()
        cur = _clean(cur_raw, serve)
        # An endpoint we route to is never reported DRAINING: Envoy would refuse it.
        health = {a: ("DRAINING" if drained[i] and not serve[i] else "HEALTHY") for i, a in enumerate(addrs)}
        weights = shares_to_weights(final, scale=WEIGHT_SCALE, available=serve)
        result = GuardResult(final, weights, health, traffic_moved(cur, final), tuple(notes), False)
        self._count(result, False)
        return result

    def _count(self, result: GuardResult, floor_acted: bool) -> None:
        with self._lock:
            self._decisions += 1
            self._limited += int(result.limited)
            self._floored += int(floor_acted)
            self._last_notes = result.notes

    def state(self) -> dict[str, Any]:
        """The config in force and how often each guardrail acted, for the API."""
        cfg = self.config
        out: dict[str, Any] = dict(cfg.model_dump(mode="json"))
        with self._lock:
            out.update(
                decisions=self._decisions,
                limited_count=self._limited,
                floor_count=self._floored,
                last_notes=list(self._last_notes),
            )
        return out


# -- rollback --------------------------------------------------------------------------------


def _rollback_args(after: object, margin: object, probation_after: object) -> tuple[int, float, int]:
    a = _int_arg("rollback_after", after, 1)
    mg = _finite_float("rollback_margin", margin)
    if mg < 0:
        raise GuardrailError(f"rollback_margin must be >= 0, got {margin!r}")
    p = _int_arg("probation_after", probation_after, 1)
    return a, mg, p


class RollbackMonitor:
    """Circuit breaker between the learned policy and the baseline heuristic.

    Every interval both the policy's proposal and the baseline's are scored on the *same*
    observation with the same model (the caller passes the negated LP objective: worst
    estimated load/capacity plus the cost term; higher is better). Comparing realised
    rewards across time instead would blame the policy for the weather: a cloud that
    degrades lowers the reward of whatever is in force.

    ``policy`` (closed): an interval is *worse* when the policy's score is below the
    baseline's by more than ``margin`` (or not finite); ``after`` consecutive worse
    intervals roll back. ``baseline`` (open): the policy keeps being scored in shadow;
    ``probation_after`` consecutive intervals in which it is no longer worse bring it
    back (it recovered). Thread-safe: the loop records while the API reads.
    """

    def __init__(self, after: int, margin: float, probation_after: int) -> None:
        self.after, self.margin, self.probation_after = _rollback_args(after, margin, probation_after)
        self._lock = threading.Lock()
        self._transitions: deque[dict[str, Any]] = deque(maxlen=_TRANSITIONS_KEPT)
        self._recent: deque[tuple[float, float]] = deque(maxlen=20)
        self.worse_streak = 0
        self.good_streak = 0
        self.rollbacks = 0
        self.recoveries = 0
        self.since = time.time()
        self.mode: Mode = "policy"
        self.reason = "using the policy (scored against the baseline every interval)"

    def _go(self, to: Mode, reason: str, now: float) -> None:
        self._transitions.append({"at": now, "from": self.mode, "to": to, "reason": reason})
        self.mode = to
        self.reason = reason
        self.since = now
        self.worse_streak = 0
        self.good_streak = 0

    def record(self, policy_score: float, baseline_score: float, now: float | None = None) -> str:
        """Account one interval's shadow comparison; return the mode for the next decision."""
        p, b = _finite_or_nan(policy_score), _finite_or_nan(baseline_score)
        t = _now(now)
        with self._lock:
            if not math.isfinite(b):
                return self.mode  # nothing to compare against: no evidence either way
            self._recent.append((p, b))
            worse = not math.isfinite(p) or p < b - self.margin
            if self.mode == "policy":
                self.worse_streak = self.worse_streak + 1 if worse else 0
                if self.worse_streak >= self.after:
                    self.rollbacks += 1
                    self._go(
                        "baseline",
                        f"rollback: the policy scored below the baseline by more than {_fmt(self.margin)} for "
                        f"{self.worse_streak} consecutive interval(s) (last {_fmt(p)} vs {_fmt(b)}); using the "
                        f"baseline until the policy holds its own for {self.probation_after} interval(s)",
                        t,
                    )
            else:
                self.good_streak = 0 if worse else self.good_streak + 1
                if self.good_streak >= self.probation_after:
                    self.recoveries += 1
                    self._go(
                        "policy",
                        f"recovered: the policy scored within {_fmt(self.margin)} of the baseline or better for "
                        f"{self.good_streak} consecutive interval(s) (last {_fmt(p)} vs {_fmt(b)}); using the policy",
                        t,
                    )
            return self.mode

    def reconfigure(self, after: int, margin: float, probation_after: int) -> None:
        """New thresholds (validated first, so a bad call changes nothing)."""
        a, mg, p = _rollback_args(after, margin, probation_after)
        with self._lock:
            self.after, self.margin, self.probation_after = a, mg, p

    def state(self) -> dict[str, Any]:
        with self._lock:
            last = self._recent[-1] if self._recent else (None, None)
            return {
                "mode": self.mode,
                "reason": self.reason,
                "since": self.since,
                "worse_streak": self.worse_streak,
                "good_streak": self.good_streak,
                "last_policy_score": _num_or_none(last[0]),
                "last_baseline_score": _num_or_none(last[1]),
                "rollbacks": self.rollbacks,
                "recoveries": self.recoveries,
                "after": self.after,
                "margin": self.margin,
                "probation_after": self.probation_after,
                "transitions": [dict(x) for x in self._transitions],
            }


def _finite_or_nan(x: object) -> float:
    try:
        f = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _num_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
