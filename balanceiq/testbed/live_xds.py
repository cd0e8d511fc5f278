"""How LiveEnv pushes weights: its own in-process xDS server, or the named xDS actor."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from balanceiq.config import Settings
from balanceiq.exceptions import TestbedError, XdsError

log = logging.getLogger(__name__)


class LocalXds:
    """Private mode: the in-process XdsServer this env owns."""

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        from balanceiq.xds.server import XdsServer

        self.server = XdsServer(settings, state_dir=state_dir)
        self.server.start()

    def push(self, cluster: str, weights: Mapping[str, int], health: Mapping[str, str], timeout: float) -> bool:
        version = self.server.set_assignment(cluster, weights, health)
        return bool(self.server.wait_for_ack(version, None, timeout))

    def close(self) -> None:
        self.server.stop()


class ActorXds:
    """Attach mode: the named xDS actor, every push under the controller lease."""

    def __init__(self, ray_address: str, lease_ttl_s: float, timeout_s: float = 10.0) -> None:
        import ray

        from balanceiq.xds.actor import get_actor

        self.connected_here = False
        if not ray.is_initialized():
            try:
                ray.init(address=ray_address, log_to_driver=False)  # connect only: never start a cluster
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise TestbedError(f"attach mode: cannot connect to Ray at {ray_address!r}: {exc}") from exc
            self.connected_here = True
        try:
            self.handle = get_actor()
        except ValueError as exc:
            raise TestbedError(
                "attach mode: no xDS actor in this Ray cluster (start the stack with `balanceiq testbed up`, "
                f"and train on that cluster: `balanceiq train --address ...`): {exc}"
            ) from exc
        self.timeout_s = timeout_s
        self.ttl = lease_ttl_s
        self.owner = f"liveenv:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._leased: set[str] = set()  # clusters whose lease this env took

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        import ray

        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=timeout or self.timeout_s)
        except ray.exceptions.RayError as exc:
            raise XdsError(
                f"xDS actor {method}: {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"
            ) from exc

    def served(self, cluster: str) -> tuple[dict[str, int], dict[str, str]]:
        eps = self._call("status")["clusters"][cluster]["endpoints"]
        return (
            {e["address"]: int(e["weight"]) for e in eps},
            {e["address"]: ("DRAINING" if e.get("health") == "DRAINING" else "HEALTHY") for e in eps},
        )

    def push(self, cluster: str, weights: Mapping[str, int], health: Mapping[str, str], timeout: float) -> bool:
        lease = self._call("acquire_lease", self.owner, self.ttl, cluster)
        self._leased.add(cluster)
        if not lease.get("granted"):
            raise XdsError(
                f"the controller lease is held by {lease.get('holder')!r}: LiveEnv (attach) does not fight a running "
                "controller; stop it (or its loop) while training against this stack"
            )
        version = self._call("set_assignment", cluster, dict(weights), dict(health), self.owner)
        return bool(self._call("wait_for_ack", version, None, timeout, timeout=timeout + self.timeout_s))

    def close(self) -> None:
        try:
            for cluster in sorted(self._leased):
                self._call("release_lease", self.owner, cluster)
        except XdsError as exc:
            log.info("lease release failed (it expires by itself): %s", exc)
        if self.connected_here:
            import ray

            ray.shutdown()
