"""A real control plane for the API tests, with telemetry replayed by the test's own observer.

Real controller, guardrails, in-process gRPC xDS server and shipped policy: the API is
tested against what it serves in production, only without Envoy or Prometheus.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from balanceiq.config import Settings
from balanceiq.control.controller import Controller, Observer
from balanceiq.control.xds_client import LocalXdsClient
from balanceiq.serve.plane import ControlPlane, PolicyClient
from balanceiq.serve.policy import PolicyModel
from balanceiq.testbed.ports import settings_on_free_ports
from balanceiq.xds.server import XdsServer


def make_plane(
    settings: Settings, model: PolicyModel, xds: XdsServer, *, token: str, observer: Callable[[list[str]], Observer]
) -> ControlPlane:
    """``observer`` is given the configured endpoint addresses."""
    addresses = [ep.address for ep in settings.clusters[0].endpoints]
    controller = Controller(settings, observer(addresses), LocalXdsClient(xds), lambda rows: model.score_many([rows])[0])
    return ControlPlane(settings, controller, policy=PolicyClient(model.info, model.reload), token=token)


@contextlib.contextmanager
def plane_on_free_ports(
    tmp_path: Path, model: PolicyModel, endpoints: int, *, token: str, observer: Callable[[list[str]], Observer]
) -> Iterator[ControlPlane]:
    """A plane over a started xDS server; both stop when the block ends."""
    s = settings_on_free_ports(endpoints).model_copy(update={"state_dir": tmp_path / "state"})
    xds = XdsServer(s, state_dir=tmp_path / "state")
    xds.start()
    plane = make_plane(s, model, xds, token=token, observer=observer)
    try:
        yield plane
    finally:
        plane.stop()
        xds.stop()
