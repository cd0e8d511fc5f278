"""Who may push weights: time-limited leases, each held by at most one controller, so two
controller replicas never fight over Envoy's weights; a dead holder's lease expires after ``ttl_s``."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from balanceiq.exceptions import XdsLeaseError


@dataclass(frozen=True)
class LeaseState:
    holder: str | None
    expires_at: float  # time.monotonic() deadline
    term: int  # increments whenever the holder changes

    def live_holder(self, now: float) -> str | None:
        return self.holder if self.expires_at > now else None

    def to_json(self, now: float) -> dict[str, Any]:
        live = self.live_holder(now)
        expires_in_s = round(max(0.0, self.expires_at - now), 3) if live else 0.0
        return {"holder": live, "expires_in_s": expires_in_s, "term": self.term}


_FREE = LeaseState(None, 0.0, 0)


class LeaseTable:
    """The server-wide lease (scope ``None``) and one per cluster, thread-safe, each excluding other owners
    of the other: a push needs its cluster's lease, or the server-wide one while nobody holds the cluster's."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._leases: dict[str | None, LeaseState] = {None: _FREE}

    def _lease(self, scope: str | None) -> LeaseState:
        if scope is not None and (not isinstance(scope, str) or not scope):
            raise XdsLeaseError("lease cluster must be a non-empty string or None")
        return self._leases.setdefault(scope, _FREE)

    def _governing(self, cluster: str, now: float) -> str | None:
        """The cluster's scope while someone holds its lease, else the server-wide one (``None``)."""
        scoped = self._leases.get(cluster)
        return cluster if scoped is not None and scoped.live_holder(now) else None

    def acquire(self, owner: str, ttl_s: float, scope: str | None = None) -> dict[str, Any]:
        """Take or renew ``scope``'s lease (a cluster, or ``None`` for the whole server);
        ``granted`` says whether ``owner`` holds it now."""
        with self._lock:
            lease = self._lease(scope)
            if not owner or not isinstance(owner, str):
                raise XdsLeaseError("lease owner must be a non-empty string")
            now = self._clock()
            # Another owner holding a lease that overlaps this one blocks it.
            overlapping = (v for k, v in self._leases.items() if (k is None) != (scope is None))
            blocker = next((h for s in overlapping if (h := s.live_holder(now)) and h != owner), None)
            if blocker is not None:
                return {"granted": False, **lease.to_json(now), "holder": blocker, "cluster": scope}
            if not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and 0 < ttl_s <= 3600):
                raise XdsLeaseError(f"lease ttl_s must be in (0, 3600], got {ttl_s!r}")
            holder = lease.live_holder(now)
            granted = holder in (None, owner)
            if granted:
                term = lease.term if holder == owner else lease.term + 1
                lease = self._leases[scope] = LeaseState(owner, now + float(ttl_s), term)
            return {"granted": granted, **lease.to_json(now), "cluster": scope}

    def release(self, owner: str, scope: str | None = None) -> bool:
        with self._lock:
            lease = self._lease(scope)
            if lease.holder != owner:
                return False
            self._leases[scope] = LeaseState(None, 0.0, lease.term)
            return True

    def check(self, owner: str, cluster: str) -> dict[str, Any]:
        """Raise unless ``owner`` may push to ``cluster``; the lease state that allowed it."""
        with self._lock:
            now = self._clock()
            scope = self._governing(cluster, now)
            lease = self._leases[scope]
            holder = lease.live_holder(now)
            if holder != owner:
                raise XdsLeaseError(
                    f"push refused: {owner!r} does not hold the controller lease (held by {holder or 'nobody'})"
                )
            return {**lease.to_json(now), "cluster": scope}

    def term(self, cluster: str) -> int:
        """The term a push to ``cluster`` would be checked under."""
        with self._lock:
            return self._leases[self._governing(cluster, self._clock())].term

    def state(self, scope: str | None = None) -> dict[str, Any]:
        with self._lock:
            return self._leases.get(scope, _FREE).to_json(self._clock())

    def states(self) -> dict[str, dict[str, Any]]:
        """Every cluster lease ever taken, by cluster."""
        with self._lock:
            now = self._clock()
            return {k: self._leases[k].to_json(now) for k in sorted(k for k in self._leases if k is not None)}
