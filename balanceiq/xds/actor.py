"""The xDS server as a named, detached Ray actor, one per Ray cluster: named so the controller, the CLI
and ``serve run`` find the same server; ``num_cpus=0`` (I/O bound, it must never wait behind training);
pinned to the head, whose address Envoy's bootstrap names; restarted after a crash, serving the persisted
weights under a new epoch. Ray's token authentication stays on (see README "Ray")."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import ray

from balanceiq.config import Settings
from balanceiq.exceptions import XdsBindError
from balanceiq.xds.lease import LeaseTable
from balanceiq.xds.server import XdsServer

NAMESPACE = "balanceiq"
ACTOR_NAME = "xds_server"
HEAD_RESOURCE = "node:__internal_head__"
BIND_RETRY_S = 5.0


class XdsServerActor:
    """Ray actor body; wrap with :func:`start_actor`, not ``ray.remote`` by hand."""

    def __init__(self, settings: Settings, state_dir: str | None = None) -> None:
        self._server = XdsServer(settings, state_dir=state_dir or settings.state_dir)
        # Not persisted: after a restart the controller simply acquires it again.
        self._lease = LeaseTable()
        # Lease check and publish are one step against acquire_lease: a push checked under a
        # lease taken over meanwhile cannot publish. Reentrant for subclasses that record pushes.
        self._lock = threading.RLock()
        # After a crash the dead worker's socket may linger (SO_REUSEPORT is off): retry.
        deadline = time.monotonic() + BIND_RETRY_S
        while True:
            try:
                self._server.start()
                break
            except XdsBindError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def set_assignment(
        self,
        cluster: str,
        weights: Mapping[str, object] | None = None,
        health: Mapping[str, object] | None = None,
        lease_owner: str | None = None,
    ) -> str:
        """With ``lease_owner`` (operators' manual pushes pass none): refused (XdsLeaseError)
        unless that owner holds the cluster's lease, or the server-wide one."""
        if lease_owner is None:
            return self._server.set_assignment(cluster, weights, health)
        with self._lock:
            self._lease.check(lease_owner, str(cluster))
            return self._server.set_assignment(cluster, weights, health)

    def acquire_lease(self, owner: str, ttl_s: float, cluster: str | None = None) -> dict[str, Any]:
        """Take or renew ``cluster``'s lease, or the server-wide one (``None``)."""
        with self._lock:
            return self._lease.acquire(owner, ttl_s, cluster)

    def release_lease(self, owner: str, cluster: str | None = None) -> bool:
        return self._lease.release(owner, cluster)

    def status(self) -> dict[str, Any]:
        return {
            **self._server.status(),
            "lease": self._lease.state(),
            "leases": self._lease.states(),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def wait_for_ack(self, version: str, node_id: str | None = None, timeout: float = 5.0) -> bool:
        return self._server.wait_for_ack(version, node_id, timeout)

    def port(self) -> int | None:
        return self._server.port


def start_actor(
    settings: Settings, state_dir: str | Path | None = None, *, actor_cls: type[XdsServerActor] = XdsServerActor
) -> ray.actor.ActorHandle[Any]:
    """Get the named xDS actor, creating it (pinned to the head) if it does not exist."""
    cls = ray.remote(actor_cls)
    created = cls.options(
        name=ACTOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=3,
        max_concurrency=4,  # status() must not queue behind a slow set_assignment()
        resources={HEAD_RESOURCE: 0.001},
    ).remote(settings, str(state_dir) if state_dir else None)
    # Ray types ActorClass.remote() as ActorHandle[T] | type[T]; what it returns is the handle.
    handle = cast("ray.actor.ActorHandle[Any]", created)
    ray.get(handle.port.remote())  # surfaces bind errors from __init__ here
    return handle


def get_actor() -> ray.actor.ActorHandle[Any]:
    """The running xDS actor; raises ValueError if there is none."""
    return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
