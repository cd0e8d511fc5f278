"""Operator overrides: pin, drain or set an endpoint's share, each with an optional TTL;
the guardrails apply them last and at once, so an operator's instruction is final."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from balanceiq.control.args import _SUM_TOL, WEIGHT_SCALE, _finite_float, _int_arg, _names, _now
from balanceiq.exceptions import GuardrailError

Action = Literal["pin", "drain", "set"]


@dataclass(frozen=True)
class Override:
    """An operator's instruction for one endpoint, validated on construction. ``share``:
    the frozen share for "pin", ``weight / 10000`` for "set", None for "drain"."""

    address: str
    action: Action
    share: float | None
    expires_at: float | None  # unix time; None = until cleared
    reason: str = ""
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.action not in get_args(Action):
            raise GuardrailError(
                f"override action for {self.address} must be one of {', '.join(get_args(Action))}, got {self.action!r}"
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
        return self.action != "drain"

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
    """The active overrides, at most one per endpoint (the API writes while the loop reads). A write
    leaving no routable endpoint, or fixed shares above 1, is refused; availability is the guardrails'."""

    def __init__(self, addresses: Sequence[str]) -> None:
        addrs = [str(a) for a in addresses]
        if dup := sorted(a for a, k in Counter(addrs).items() if k > 1):
            raise GuardrailError(f"duplicate endpoint address(es): {', '.join(dup)}")
        self._addresses = tuple(addrs)
        self._lock = threading.Lock()
        self._overrides: dict[str, Override] = {}

    def _check_address(self, address: str) -> None:
        if address not in self._addresses:
            raise GuardrailError(f"unknown endpoint {address!r}: not one of {_names(self._addresses)}")

    def _expire(self, now: float) -> None:
        self._overrides = {a: o for a, o in self._overrides.items() if o.expires_at is None or now < o.expires_at}

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
        ttl = None if ttl_s is None else _finite_float(f"ttl_s for {address}", ttl_s)
        if ttl is not None and ttl <= 0:
            raise GuardrailError(f"ttl_s for {address} must be > 0, got {ttl_s!r}")
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
        self, address: str, current_share: float, ttl_s: float | None = None, reason: str = "", now: float | None = None
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
        w = _int_arg(f"weight for {address}", weight, 1, WEIGHT_SCALE)
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
