"""The xDS actor with a push audit: the fault suite's evidence that one controller pushed at a time."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from balanceiq.config import Settings
from balanceiq.exceptions import AssignmentError, XdsLeaseError
from balanceiq.xds.actor import XdsServerActor

AUDIT_SIZE = 1000  # lease-checked pushes remembered; at one per second, a quarter of an hour


class AuditedXdsServerActor(XdsServerActor):
    """The xDS actor that also remembers who pushed what under which lease, and each change of
    lease holder (``start_actor(..., actor_cls=AuditedXdsServerActor)``)."""

    def __init__(self, settings: Settings, state_dir: str | None = None) -> None:
        self._pushes: deque[dict[str, Any]] = deque(maxlen=AUDIT_SIZE)
        self._holders: deque[dict[str, Any]] = deque(maxlen=AUDIT_SIZE)
        super().__init__(settings, state_dir)

    def set_assignment(
        self,
        cluster: str,
        weights: Mapping[str, object] | None = None,
        health: Mapping[str, object] | None = None,
        lease_owner: str | None = None,
    ) -> str:
        if lease_owner is None:
            return super().set_assignment(cluster, weights, health)
        # The lock (reentrant) around check, publish and record: the audit's order is the
        # order versions were published in.
        with self._lock:
            term = self._lease.term(str(cluster))
            latest = self._server.store.latest()
            before = latest.version if latest is not None else None
            try:
                version = super().set_assignment(cluster, weights, health, lease_owner)
            except (XdsLeaseError, AssignmentError) as exc:
                self._record(lease_owner, term, None, cluster, accepted=False, reason=type(exc).__name__)
                raise
            self._record(lease_owner, term, version, cluster, accepted=True, changed=version != before)
            return version

    def _record(self, owner: str, term: int, version: str | None, cluster: str, **outcome: object) -> None:
        push = {"at": time.time(), "owner": owner, "term": term, "version": version, "cluster": cluster}
        self._pushes.append({**push, **outcome})

    def acquire_lease(self, owner: str, ttl_s: float, cluster: str | None = None) -> dict[str, Any]:
        with self._lock:
            granted = super().acquire_lease(owner, ttl_s, cluster)
            last = next((h["term"] for h in reversed(self._holders) if h.get("cluster") == cluster), None)
            if granted["granted"] and granted["term"] != last:
                self._holders.append({"at": time.time(), "holder": owner, "term": granted["term"], "cluster": cluster})
            return granted

    def audit(self) -> dict[str, Any]:
        """Lease-checked pushes and changes of lease holder, oldest first, since this actor (re)started."""
        with self._lock:
            return {"pid": os.getpid(), "pushes": list(self._pushes), "holders": list(self._holders)}
