"""How the controller, LiveEnv and the CLI reach the xDS server: the named Ray actor, or one
in this process. Both clients raise only :class:`~balanceiq.exceptions.XdsError`: to the loop a
dead actor, a timeout and a refused push are alike (record, retry next interval)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from balanceiq.exceptions import AssignmentError, TestbedError, XdsError
from balanceiq.xds.lease import LeaseTable

if TYPE_CHECKING:
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
        self, cluster: str, weights: Mapping[str, int], health: Mapping[str, str], lease_owner: str | None = None
    ) -> str:
        """Without ``lease_owner``: an operator's push, which no lease holds back."""
        return str(self._call("set_assignment", cluster, dict(weights), dict(health), lease_owner))

    def wait_for_ack(self, version: str, timeout: float) -> bool:
        return bool(self._call("wait_for_ack", version, None, timeout, timeout=timeout + self.timeout_s))

    def status(self) -> dict[str, Any]:
        return dict(self._call("status"))


class LocalXdsClient:
    """An in-process :class:`XdsServer` with its own leases (tests, benchmarks, LiveEnv's
    private stack); clients given the same ``lease`` table compete as replicas would at the actor."""

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


def served(status: Mapping[str, Any], cluster: str) -> tuple[dict[str, int], dict[str, str]]:
    """The weights and health (HEALTHY or DRAINING) a server's ``status()`` serves for ``cluster``."""
    eps = status.get("clusters", {}).get(cluster, {}).get("endpoints", [])
    weights = {e["address"]: int(e["weight"]) for e in eps}
    return weights, {e["address"]: "DRAINING" if e.get("health") == "DRAINING" else "HEALTHY" for e in eps}


def connect_ray() -> None:
    """Connect this driver to the local Ray cluster (TestbedError if none is running)."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address="auto", namespace="balanceiq", log_to_driver=False)
    except ConnectionError:
        raise TestbedError("no Ray cluster is running (start one with `balanceiq testbed up`)") from None


def running_actor(timeout_s: float = 30.0) -> ActorXdsClient:
    """The running xDS actor of the local Ray cluster (``balanceiq xds ...``)."""
    from balanceiq.xds.actor import get_actor

    connect_ray()
    try:
        return ActorXdsClient(get_actor(), timeout_s)
    except ValueError as exc:
        raise TestbedError("no xDS actor is running (start it with `balanceiq testbed up`)") from exc
