"""How the controller reaches the xDS server: the Ray actor, or one in this process.
Both raise only :class:`~balanceiq.exceptions.XdsError`: to the loop a dead actor, a
timeout and a refused push are alike (record, retry next interval)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from balanceiq.exceptions import AssignmentError, XdsError
from balanceiq.xds.lease import LeaseTable
from balanceiq.xds.server import XdsServer


class ActorXdsClient:
    """Calls on the named xDS actor, each bounded by ``timeout_s``."""

    def __init__(self, handle: Any, timeout_s: float = 5.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        import ray

        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=timeout or self.timeout_s)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()  # type: ignore[no-untyped-call]
            if isinstance(cause, (XdsError, AssignmentError)):
                raise XdsError(str(cause).splitlines()[-1]) from exc
            raise XdsError(f"xDS actor {method} failed: {type(cause).__name__}") from exc
        except ray.exceptions.GetTimeoutError as exc:
            raise XdsError(f"xDS actor did not answer {method} within {timeout or self.timeout_s:.1f}s") from exc
        except ray.exceptions.RayError as exc:  # actor dead or restarting
            raise XdsError(f"xDS actor unavailable ({type(exc).__name__})") from exc

    def acquire_lease(self, owner: str, ttl_s: float, cluster: str | None = None) -> dict[str, Any]:
        return dict(self._call("acquire_lease", owner, ttl_s, cluster))

    def release_lease(self, owner: str, cluster: str | None = None) -> bool:
        return bool(self._call("release_lease", owner, cluster))

    def set_assignment(
        self, cluster: str, weights: Mapping[str, int], health: Mapping[str, str], lease_owner: str
    ) -> str:
        return str(self._call("set_assignment", cluster, dict(weights), dict(health), lease_owner))

    def wait_for_ack(self, version: str, timeout: float) -> bool:
        return bool(self._call("wait_for_ack", version, None, timeout, timeout=timeout + self.timeout_s))

    def status(self) -> dict[str, Any]:
        return dict(self._call("status"))


class LocalXdsClient:
    """An in-process :class:`XdsServer` with its own leases (tests, benchmarks); clients
    given the same ``lease`` table compete as replicas would at the actor."""

    def __init__(self, server: XdsServer, lease: LeaseTable | None = None) -> None:
        self.server = server
        self.lease = lease or LeaseTable()

    def acquire_lease(self, owner: str, ttl_s: float, cluster: str | None = None) -> dict[str, Any]:
        return self.lease.acquire(owner, ttl_s, cluster)

    def release_lease(self, owner: str, cluster: str | None = None) -> bool:
        return self.lease.release(owner, cluster)

    def set_assignment(
        self, cluster: str, weights: Mapping[str, int], health: Mapping[str, str], lease_owner: str
    ) -> str:
        self.lease.check(lease_owner, cluster)
        try:
            return self.server.set_assignment(cluster, weights, health)
        except AssignmentError as exc:
            raise XdsError(str(exc)) from exc

    def wait_for_ack(self, version: str, timeout: float) -> bool:
        return self.server.wait_for_ack(version, None, timeout)

    def status(self) -> dict[str, Any]:
        return {**self.server.status(), "lease": self.lease.state(), "leases": self.lease.states()}
