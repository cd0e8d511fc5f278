"""Guardrails between the policy's proposal and the weights Envoy receives: sanitise the
inputs, take unavailable and drained endpoints out at once, honour operator overrides, keep
SLO breachers from gaining, floor every share and limit how much traffic one decision moves.
The steps of :meth:`Guardrails.apply` run in that order, each assuming the previous ones held."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from balanceiq.config import GuardrailConfig
from balanceiq.control.args import _SUM_TOL, WEIGHT_SCALE, _fmt, _names
from balanceiq.control.overrides import Override
from balanceiq.exceptions import GuardrailError
from balanceiq.policy.lp import endpoint_mask, shares_to_weights, traffic_moved

# Forced moves smaller than this are not worth a note: a drained endpoint keeps weight 1,
# so a ``current`` derived from realised weights always shows ~1e-4 on it.
_NOTE_TOL = 1e-3


@dataclass(frozen=True)
class GuardResult:
    """What the guardrails made of one proposal: shares, Envoy weights and why."""

    shares: np.ndarray  # sums to 1 over the routable endpoints, 0 elsewhere
    weights: np.ndarray  # int64, each in [1, 2**32-1]
    health: dict[str, str]  # address -> "HEALTHY" | "DRAINING"
    moved: float  # traffic_moved(sanitised current, shares)
    notes: tuple[str, ...]  # one per guardrail that acted
    limited: bool  # max_shift acted


def _vector(name: str, values: object, n: int) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise GuardrailError(f"{name} must be a vector of numbers: {exc}") from None
    if arr.shape[0] != n:
        raise GuardrailError(f"{name} has {arr.shape[0]} entries, expected {n} (one per endpoint)")
    return arr


def _mask(name: str, values: object, n: int) -> np.ndarray:
    try:
        return endpoint_mask(name, values, n)
    except ValueError as exc:
        raise GuardrailError(str(exc)) from None


def _clean(v: np.ndarray, base: np.ndarray) -> np.ndarray:
    """NaN/negative/inf -> 0, then sum 1; all zero -> equal over ``base``."""
    s = np.where(np.isfinite(v) & (v >= 0), v, 0.0)
    top = float(s.max(initial=0.0))
    if top <= 0:
        return np.asarray(base / base.sum())
    s = s / top  # no overflow in the sum, whatever the magnitudes
    return np.asarray(s / s.sum())


class Guardrails:
    """Applies a :class:`GuardrailConfig` to each decision; ``config`` may be reassigned (read once per apply)."""

    def __init__(self, config: GuardrailConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._decisions = 0
        self._limited = 0
        self._floored = 0

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
        if unknown := sorted(set(overrides) - set(addrs)):
            notes.append(f"overrides: ignored for unknown endpoint(s) {_names(unknown)}")
        ovs = [overrides.get(a) for a in addrs]
        drained = np.array([o is not None and o.action == "drain" for o in ovs])
        fixed = np.array([o is not None and o.fixed for o in ovs])
        fixed_val = np.array([float(o.share or 0.0) if o is not None and o.fixed else 0.0 for o in ovs])
        routable = avail & ~drained
        limited = floored = False
        if routable.any():
            cur = _clean(cur_raw, routable)
            _note_forced_off(addrs, cur, avail, drained, notes)
            split = _fixed_split(addrs, cur, _clean(prop_raw, routable), fixed, fixed_val, routable, notes)
            _keep_breachers_from_gaining(addrs, cur, split, breach, notes)
            floored = _raise_to_floors(split, breach, cfg, notes)
            final, limited = _limit_shift(addrs, cur, split, breach, cfg.max_shift, notes)
        else:
            routable = _fallback_set(avail, drained, notes)
            final = routable / routable.sum()
            cur = _clean(cur_raw, routable)
        # An endpoint we route to is never reported DRAINING: Envoy would refuse it.
        health = {a: ("DRAINING" if d and not r else "HEALTHY") for a, d, r in zip(addrs, drained, routable)}
        weights = shares_to_weights(final, scale=WEIGHT_SCALE, available=routable)
        result = GuardResult(final, weights, health, traffic_moved(cur, final), tuple(notes), limited)
        with self._lock:
            self._decisions += 1
            self._limited += int(limited)
            self._floored += int(floored)
        return result

    def state(self) -> dict[str, Any]:
        """The config in force and how often each guardrail acted, for the API."""
        with self._lock:
            counts = {"decisions": self._decisions, "limited_count": self._limited, "floor_count": self._floored}
        return {**self.config.model_dump(mode="json"), **counts}


@dataclass
class _Split:
    """The fixed shares' result: the target shares, the fixed ones, and the free share."""

    target: np.ndarray
    fixed: np.ndarray  # bool: routable pinned/set endpoints
    fv: np.ndarray  # their shares (0 elsewhere)
    free_mask: np.ndarray  # bool: routable and not fixed
    free: float  # 1 - sum(fixed shares)


def _named(addrs: list[str], mask: np.ndarray) -> str:
    return _names([addrs[i] for i in np.flatnonzero(mask)])


def _fallback_set(avail: np.ndarray, drained: np.ndarray, notes: list[str]) -> np.ndarray:
    """Nothing routable: the least bad set to split equally over (Envoy must get valid weights)."""
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
        serve = np.ones(len(avail), dtype=bool)
        notes.append(f"fallback: no endpoint available and all drained; equal split over all {len(avail)}")
    return serve


def _note_forced_off(
    addrs: list[str], cur: np.ndarray, avail: np.ndarray, drained: np.ndarray, notes: list[str]
) -> None:
    """Unavailable and drained endpoints go to 0 at once, exempt from ``max_shift``: ramping only fails more slowly."""
    for mask, label in ((drained & (cur > 0), "drained"), (~avail & ~drained & (cur > 0), "unavailable")):
        amount = float(cur[mask].sum())
        if amount > _NOTE_TOL:
            notes.append(
                f"{label}: moved {_fmt(amount)} of traffic off {_named(addrs, mask)} at once (exempt from max_shift)"
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
    """Routable pinned/set endpoints get exactly their share at once (an operator's instruction is
    not smoothed), scaled to fit if need be; the other routable ones share the rest like the proposal."""
    released = fixed & ~routable & (fixed_val > 0)
    if released.any():
        notes.append(f"fixed: {_named(addrs, released)} not routable; pinned/set share released to the others")
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
    target = fv.copy()
    if free_mask.any():
        p = prop[free_mask]
        psum = float(p.sum())
        target[free_mask] = p / psum * free if psum > 0 else free / int(free_mask.sum())
    if held := [f"{addrs[i]}={fv[i]:.4g}" for i in np.flatnonzero(fixed) if abs(cur[i] - fv[i]) > _NOTE_TOL]:
        notes.append(f"fixed: {_names(held)} set at once (operator override, exempt from max_shift)")
    return _Split(target=target, fixed=fixed, fv=fv, free_mask=free_mask, free=free)


def _keep_breachers_from_gaining(
    addrs: list[str], cur: np.ndarray, split: _Split, breach: np.ndarray, notes: list[str]
) -> None:
    """An SLO breacher never gains traffic, whoever proposes (a baseline knows nothing of breaches)."""
    target, free_mask = split.target, split.free_mask
    grow = free_mask & breach & (target > cur + _NOTE_TOL)
    others = free_mask & ~breach
    if grow.any() and float(target[others].sum()) > 0:
        excess = float((target - cur)[grow].sum())
        target[grow] = cur[grow]
        target[others] += target[others] / float(target[others].sum()) * excess
        notes.append(f"breaching: {_named(addrs, grow)} kept from gaining traffic")


def _raise_to_floors(split: _Split, breach: np.ndarray, cfg: GuardrailConfig, notes: list[str]) -> bool:
    """Every free endpoint at least ``min_share`` (a breacher ``breach_min_share``) so its latency stays
    measured, paid for by the others in proportion to their excess; floors that do not fit are scaled
    to half the free share. True when they acted."""
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
    addrs: list[str], cur: np.ndarray, split: _Split, breach: np.ndarray, max_shift: float, notes: list[str]
) -> tuple[np.ndarray, bool]:
    """``forced`` (``cur`` with the moves above that happen at once) plus at most ``max_shift`` of the
    rest of the way to the target; ``(final shares, limited)``. The convex combination keeps fixed
    shares, zeros and floors exact; coming last, nothing can undo it."""
    target, fixed, fv, free_mask, free = split.target, split.fixed, split.fv, split.free_mask, split.free
    forced = np.where(fixed | free_mask, cur, 0.0)
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
            notes.append(
                f"breaching: moved {_fmt(amount)} of traffic off {_named(addrs, off)} at once (exempt from max_shift)"
            )
    want = traffic_moved(forced, target)
    if want <= max_shift:
        return target, False
    notes.append(f"max_shift: proposal moved {_fmt(want)} of traffic, limited to {_fmt(max_shift)}")
    return np.maximum(forced + float(max_shift) / want * (target - forced), 0.0), True
