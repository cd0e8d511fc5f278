"""A real control plane for the API tests, with telemetry replayed by the test's own observer.

Real controller, guardrails, in-process gRPC xDS server and shipped policy: the API is
tested against what it serves in production, only without Envoy or Prometheus.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from balanceiq.config import Settings
from balanceiq.control.controller import Observer
from balanceiq.serve.plane import ControlPlane, PolicyClient, cluster_controllers
from balanceiq.serve.policy import PolicyModel
from balanceiq.telemetry.observation import EndpointObservation, Observation
from balanceiq.xds.client import LocalXdsClient
from balanceiq.xds.server import XdsServer
from balanceiq_lab.bench.settings import settings_on_free_ports


class ReplayObserver:
    """Answers every observe() with the current ``latency`` map (address -> p95 ms)."""

    def __init__(self, addresses: list[str]) -> None:
        self.latency = dict.fromkeys(addresses, 30.0)

    def observe(self, weights: Any = None) -> Observation:
        eps = tuple(
            EndpointObservation(
                address=a,
                p50_ms=lat / 2,
                p95_ms=lat,
                error_rate=0.0,
                saturation=0.3,
                inflight=2.0,
                rps=50.0,
                cost_per_million=0.4,
                weight=float((weights or {}).get(a, 1)),
                healthy=True,
                age_s=0.5,
            )
            for a, lat in self.latency.items()
        )
        return Observation(cluster="my_service", endpoints=eps, source="simulator", window_s=10.0)


def make_plane(
    settings: Settings, model: PolicyModel, xds: XdsServer, *, token: str, observer: Callable[[list[str]], Observer]
) -> ControlPlane:
    """``observer`` is given each cluster's endpoint addresses."""
    controllers = cluster_controllers(
        settings,
        LocalXdsClient(xds),
        lambda rows: model.score_many([rows])[0],
        lambda name: observer([ep.address for ep in settings.cluster(name).endpoints]),
    )
    return ControlPlane(settings, controllers, policy=PolicyClient(model.info, model.reload), token=token)


@contextlib.contextmanager
def plane_on_free_ports(
    tmp_path: Path,
    model: PolicyModel,
    endpoints: int,
    *,
    token: str,
    observer: Callable[[list[str]], Observer],
    clusters: int = 1,
) -> Iterator[ControlPlane]:
    """A plane over a started xDS server; both stop when the block ends. ``clusters=2``
    splits the endpoints between ``my_service`` and ``checkout``."""
    s = settings_on_free_ports(endpoints).model_copy(update={"state_dir": tmp_path / "state"})
    if clusters == 2:
        eps = s.clusters[0].endpoints
        half = len(eps) // 2
        s = s.model_copy(
            update={
                "clusters": [
                    s.clusters[0].model_copy(update={"endpoints": eps[:half]}),
                    s.clusters[0].model_copy(update={"name": "checkout", "endpoints": eps[half:]}),
                ]
            }
        )
    xds = XdsServer(s, state_dir=tmp_path / "state")
    xds.start()
    plane = make_plane(s, model, xds, token=token, observer=observer)
    try:
        yield plane
    finally:
        plane.stop()
        xds.stop()
