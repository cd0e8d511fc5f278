"""Shared fixtures. Slow tests (real Envoy, Prometheus, Ray) run after the fast ones."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings as hypothesis_settings

from balanceiq.config import Settings

# Property tests run derandomised (the same examples every run), so CI never fails by
# chance; each find becomes a fixed example. HYPOTHESIS_PROFILE=explore searches afresh.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# LiveEnv, live evaluation and `record` take their sample fleet from the lab (inherited by
# the Ray workers and subprocesses tests start).
os.environ.setdefault("BALANCEIQ_FLEET", "balanceiq_lab.testbed.fleet:provider")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Fast feedback first: a broken unit test should not wait behind Envoy start-ups.
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


# Defined beside the live stack so test packages with their own conftest can import it.
from livestack import settings_on_free_ports  # noqa: E402
from localray import init_local_ray  # noqa: E402

from balanceiq.testbed.ports import free_ports  # noqa: E402,F401  (re-exported for tests)


@pytest.fixture
def ports_settings() -> Settings:
    return settings_on_free_ports()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    # Module scope: the local cluster is gone before tests that start their own Ray
    # (``testbed up`` runs ``ray start --head``) so the two never meet.
    ray = pytest.importorskip("ray")
    init_local_ray("balanceiq-tests")
    try:
        yield
    finally:
        ray.shutdown()
