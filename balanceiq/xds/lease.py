"""Who may push weights: a time-limited lease held by at most one controller.

Only the holder's pushes are accepted, so two controller replicas never fight over
Envoy's weights; a dead holder's lease expires after ``ttl_s``. :class:`LeaseTable` keeps
one lease per cluster beside the server-wide one: each excludes other owners of the
other, and a push needs its cluster's lease, or the server-wide one when nobody holds it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from balanceiq.exceptions import XdsLeaseError


@dataclass(frozen=True)
class LeaseState:
    holder: str | None
    expires_at: float  # time.monotonic() deadline
    term: int  # increments whenever the holder changes

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        live = self.holder is not None and self.expires_at > now
        return {
            "holder": self.holder if live else None,
            "expires_in_s": round(max(0.0, self.expires_at - now), 3) if live else 0.0,
            "term": self.term,
        }


class Lease:
    """Thread-safe single-holder lease with expiry."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._state = LeaseState(None, 0.0, 0)

    def acquire(self, owner: str, ttl_s: float) -> dict[str, Any]:
        """Take or renew the lease for ``owner``; ``granted`` says whether it holds it now."""
        if not owner or not isinstance(owner, str):
            raise XdsLeaseError("lease owner must be a non-empty string")
        if not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and 0 < ttl_s <= 3600):
            raise XdsLeaseError(f"lease ttl_s must be in (0, 3600], got {ttl_s!r}")
        with self._lock:
            now = self._clock()
            s = self._state
            free = s.holder is None or s.expires_at <= now
            if free or s.holder == owner:
                term = s.term if s.holder == owner and not free else s.term + 1
                self._state = LeaseState(owner, now + float(ttl_s), term)
                return {"granted": True, **self._state.to_json(now)}
            return {"granted": False, **s.to_json(now)}

    def release(self, owner: str) -> bool:
        with self._lock:
            if self._state.holder == owner:
                self._state = LeaseState(None, 0.0, self._state.term)
                return True
            return False

    def check(self, owner: str) -> None:
        """Raise unless ``owner`` holds an unexpired lease."""
        with self._lock:
            s = self._state
            if s.holder != owner or s.expires_at <= self._clock():
                holder = s.holder if s.holder and s.expires_at > self._clock() else "nobody"
                raise XdsLeaseError(f"push refused: {owner!r} does not hold the controller lease (held by {holder})")

    def state(self) -> dict[str, Any]:
        with self._lock:
            return self._state.to_json(self._clock())


class LeaseTable:
    """The server-wide lease (scope ``None``) and one lease per cluster, checked together."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._global = Lease(clock)
        self._scoped: dict[str, Lease] = {}

    def _lease(self, scope: str | None) -> Lease:
        if scope is None:
            return self._global
        if not isinstance(scope, str) or not scope:
            raise XdsLeaseError("lease cluster must be a non-empty string or None")
        return self._scoped.setdefault(scope, Lease(self._clock))

    def _blocker(self, owner: str, scope: str | None) -> str | None:
        """Another owner holding a lease that overlaps ``scope``, if any."""
        if scope is None:
            return next(
                (h for h in (lease.state()["holder"] for lease in self._scoped.values()) if h and h != owner), None
            )
        holder = self._global.state()["holder"]
        return holder if holder and holder != owner else None

    def acquire(self, owner: str, ttl_s: float, scope: str | None = None) -> dict[str, Any]:
        """Take or renew ``scope``'s lease (a cluster, or ``None`` for the whole server)."""
        with self._lock:
            lease = self._lease(scope)
            blocker = self._blocker(owner, scope)
            if blocker is not None:
                if not owner or not isinstance(owner, str):
                    raise XdsLeaseError("lease owner must be a non-empty string")
                return {"granted": False, **lease.state(), "holder": blocker, "cluster": scope}
            return {**lease.acquire(owner, ttl_s), "cluster": scope}

    def release(self, owner: str, scope: str | None = None) -> bool:
        with self._lock:
            return self._lease(scope).release(owner)

    def _governing(self, cluster: str) -> tuple[Lease, str | None]:
        """The cluster's lease while someone holds it, else the server-wide one."""
        scoped = self._scoped.get(cluster)
        if scoped is not None and scoped.state()["holder"] is not None:
            return scoped, cluster
        return self._global, None

    def check(self, owner: str, cluster: str) -> dict[str, Any]:
        """Raise unless ``owner`` may push to ``cluster``; the lease state that allowed it."""
        with self._lock:
            lease, scope = self._governing(cluster)
            lease.check(owner)
            return {**lease.state(), "cluster": scope}

    def term(self, cluster: str) -> int:
        """The term a push to ``cluster`` would be checked under."""
        with self._lock:
            return int(self._governing(cluster)[0].state()["term"])

    def state(self, scope: str | None = None) -> dict[str, Any]:
        with self._lock:
            lease = self._global if scope is None else self._scoped.get(scope)
            return lease.state() if lease is not None else {"holder": None, "expires_in_s": 0.0, "term": 0}

    def states(self) -> dict[str, dict[str, Any]]:
        """Every cluster lease ever taken, by cluster."""
        with self._lock:
            return {k: v.state() for k, v in sorted(self._scoped.items())}
