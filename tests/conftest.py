"""Shared fixtures. Slow tests (real Envoy, Prometheus, Ray) run after the fast ones."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from balanceiq.config import Settings, default_settings


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Fast feedback first: a broken unit test should not wait behind Envoy start-ups.
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


from balanceiq.testbed.ports import free_port, free_ports  # noqa: E402  (re-exported for tests)


def settings_on_free_ports(n_endpoints: int = 3, base: Settings | None = None) -> Settings:
    """Default settings with every endpoint, xDS and Envoy port free right now."""
    s = base or default_settings()
    ports = iter(free_ports(n_endpoints + 7))
    clouds = [("aws", "us-east-1"), ("gcp", "us-central1"), ("azure", "eastus")]
    template = s.clusters[0].endpoints[0]
    endpoints = [
        template.model_copy(
            update={
                "address": f"127.0.0.1:{next(ports)}",
                "cloud": clouds[i % 3][0],
                "region": clouds[i % 3][1],
                "zone": None,
            }
        )
        for i in range(n_endpoints)
    ]
    cluster = s.clusters[0].model_copy(update={"endpoints": endpoints})
    return s.model_copy(
        update={
            "clusters": [cluster],
            "xds": s.xds.model_copy(update={"port": next(ports)}),
            "envoy": s.envoy.model_copy(
                update={"admin_url": f"http://127.0.0.1:{next(ports)}", "listen_port": next(ports)}
            ),
            "prometheus": s.prometheus.model_copy(update={"url": f"http://127.0.0.1:{next(ports)}"}),
            "telemetry": s.telemetry.model_copy(
                update={"als_grpc_port": next(ports), "als_metrics_port": next(ports)}
            ),
        }
    )


@pytest.fixture
def ports_settings() -> Settings:
    return settings_on_free_ports()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    # Module scope: the local cluster is gone before tests that start their own Ray
    # (``testbed up`` runs ``ray start --head``) so the two never meet.
    ray = pytest.importorskip("ray")
    # address="local": a new cluster even if `ray start` left one running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="balanceiq-tests")
    try:
        yield
    finally:
        ray.shutdown()
