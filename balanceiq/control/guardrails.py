"""Guardrails between the policy's proposal and the weights Envoy receives.

:meth:`Guardrails.apply`, in this order (each step may assume the previous ones held):

1. *Sanitise* ``current`` and ``proposed``: NaN/negative/inf -> 0, renormalised (all
   zero: equal over the routable); a length mismatch raises ``GuardrailError``.
2. *Routable* = available and not drained. Others get 0 at once, exempt from
   ``max_shift``: ramping traffic off a dead host only fails requests more slowly. With
   nothing routable, an equal split over the least bad set (noted): Envoy must still get
   valid weights.
3. *Fixed shares*: routable "pin"/"set" endpoints get exactly their share at once (an
   operator's instruction is not smoothed), scaled to fit when they cannot sum to 1; the
   rest share the remainder like the proposal. An SLO breacher never gains share here,
   whoever proposed it (the baseline knows nothing of breaches).
4. *Floor*: every routable, non-fixed endpoint gets ``min_share`` (a breacher
   ``breach_min_share``) so its latency stays measured, paid for by the others in
   proportion to their excess over the floor; floors that do not fit are scaled to half
   the free share.
5. *max_shift*: from ``forced`` (``current`` with steps 2-3 applied, and what the target
   takes off a breacher moved at once), at most ``max_shift`` of the way to the target.
   A convex combination keeps fixed shares, zeros and floors exact; coming last, nothing
   can undo it.
6. *Weights*: ``shares_to_weights`` at ``WEIGHT_SCALE``; Envoy forbids weight 0, so
   health status ("DRAINING") keeps traffic off drained endpoints.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from balanceiq.config import GuardrailConfig
from balanceiq.control.args import _NOTE_TOL, _SUM_TOL, WEIGHT_SCALE, _fmt, _names
from balanceiq.control.overrides import Override
from balanceiq.exceptions import GuardrailError
from balanceiq.policy.lp import shares_to_weights, traffic_moved

__all__ = ["GuardResult", "Guardrails"]


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
    return np.asarray(~(np.isfinite(f) & (f == 0)))


def _clean(v: np.ndarray, base: np.ndarray) -> np.ndarray:
    """NaN/negative/inf -> 0, then sum 1; all zero -> equal over ``base``."""
    s = np.where(np.isfinite(v) & (v >= 0), v, 0.0)
    top = float(s.max(initial=0.0))
    if top <= 0:
        return np.asarray(base / base.sum())
    s = s / top  # no overflow in the sum, whatever the magnitudes
    return np.asarray(s / s.sum())


class Guardrails:
    """Apply a :class:`GuardrailConfig` to each decision (module doc); ``config`` may be
    reassigned at run time, and each :meth:`apply` reads it once."""

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
        drained, fixed, fixed_val = _overrides(addrs, overrides, notes)
        routable = avail & ~drained
        if not routable.any():
            return self._fallback(addrs, cur_raw, avail, drained, notes, cfg)
        # Step 1: sanitise.
        cur = _clean(cur_raw, routable)
        prop = _clean(prop_raw, routable)
        _note_forced_off(addrs, cur, avail, drained, notes)
        # Step 3: fixed shares, and an SLO breacher never gains traffic.
        split = _fixed_split(addrs, cur, prop, fixed, fixed_val, routable, notes)
        _keep_breachers_from_gaining(addrs, cur, split, breach, notes)
        # Step 4: floor (SLO breachers get the lower breach_min_share).
        floor_acted = _raise_to_floors(split, breach, cfg, notes)
        # Step 5: max_shift, measured from what is forced.
        final, limited = _limit_shift(addrs, cur, split, routable, breach, cfg, notes)
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


# -- the steps of Guardrails.apply (see the module docstring) ---------------------------------


@dataclass
class _Split:
    """Step 3's result: the target shares, the fixed ones, and the free share."""

    target: np.ndarray
    fixed: np.ndarray  # bool: routable pinned/set endpoints
    fv: np.ndarray  # their shares (0 elsewhere)
    free_mask: np.ndarray  # bool: routable and not fixed
    free: float  # 1 - sum(fixed shares)


def _overrides(
    addrs: list[str], overrides: Mapping[str, Override], notes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(drained, fixed, fixed share)`` per endpoint; overrides of unknown ones noted."""
    n = len(addrs)
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
    return drained, fixed, fixed_val


def _note_forced_off(
    addrs: list[str], cur: np.ndarray, avail: np.ndarray, drained: np.ndarray, notes: list[str]
) -> None:
    for mask, label in ((drained & (cur > 0), "drained"), (~avail & ~drained & (cur > 0), "unavailable")):
        amount = float(cur[mask].sum())
        if amount > _NOTE_TOL:
            names = [addrs[i] for i in np.flatnonzero(mask)]
            notes.append(
                f"{label}: moved {_fmt(amount)} of traffic off {_names(names)} at once (exempt from max_shift)"
            )


def _fixed_split(
    addrs: list[str],
    cur: np.ndarray,
    prop: np.ndarray,
    fixed: np.ndarray,
    fixed_val: np.ndarray,
    routable: np.ndarray,
    notes: list[str],
) -> _Split:
    """Fixed shares exactly; the other routable endpoints share the rest like the proposal."""
    released = fixed & ~routable & (fixed_val > 0)
    if released.any():
        names = [addrs[i] for i in np.flatnonzero(released)]
        notes.append(f"fixed: {_names(names)} not routable; pinned/set share released to the others")
    fixed = fixed & routable
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
    return _Split(target=target, fixed=fixed, fv=fv, free_mask=free_mask, free=free)


def _keep_breachers_from_gaining(
    addrs: list[str], cur: np.ndarray, split: _Split, breach: np.ndarray, notes: list[str]
) -> None:
    """Whoever proposes (the baseline after a rollback knows nothing of breaches), an SLO
    breacher never gains traffic; the excess goes to the others."""
    target, free_mask = split.target, split.free_mask
    grow = free_mask & breach & (target > cur + _NOTE_TOL)
    others = free_mask & ~breach
    if grow.any() and float(target[others].sum()) > 0:
        excess = float((target - cur)[grow].sum())
        target[grow] = cur[grow]
        target[others] += target[others] / float(target[others].sum()) * excess
        notes.append(f"breaching: {_names([addrs[i] for i in np.flatnonzero(grow)])} kept from gaining traffic")


def _raise_to_floors(split: _Split, breach: np.ndarray, cfg: GuardrailConfig, notes: list[str]) -> bool:
    """Every free endpoint at least its floor, paid for by the others in proportion to
    their excess over theirs; True when the floors changed anything."""
    target, free_mask, free = split.target, split.free_mask, split.free
    floors = np.where(breach, float(cfg.breach_min_share), float(cfg.min_share))[free_mask]
    if not free_mask.any() or floors.max(initial=0.0) <= 0:
        return False
    floor_acted = False
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
    return floor_acted


def _limit_shift(
    addrs: list[str],
    cur: np.ndarray,
    split: _Split,
    routable: np.ndarray,
    breach: np.ndarray,
    cfg: GuardrailConfig,
    notes: list[str],
) -> tuple[np.ndarray, bool]:
    """``forced`` (what moves at once) plus at most ``max_shift`` of the rest of the way
    to the target; ``(final shares, limited)``."""
    target, fixed, fv, free_mask, free = split.target, split.fixed, split.fv, split.free_mask, split.free
    forced = np.where(routable, cur, 0.0)
    forced[fixed] = fv[fixed]
    if free_mask.any():
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
    if want <= cfg.max_shift:
        return target, False
    alpha = float(cfg.max_shift) / want
    final = forced + alpha * (target - forced)
    final[fixed] = fv[fixed]  # already exact (f + alpha * 0); kept explicit
    final[~routable] = 0.0
    notes.append(f"max_shift: proposal moved {_fmt(want)} of traffic, limited to {_fmt(cfg.max_shift)}")
    return np.maximum(final, 0.0), True
