"""Fixtures for the dashboard's browser test.

The test only needs two things, so the server behind them can be swapped without
touching it:

* ``dashboard_url``: base URL (``http://127.0.0.1:PORT``) of a server that serves the
  dashboard at ``/``, its assets under ``/static`` and the JSON API under ``/api``.
* ``two_cluster_url``: the same with two clusters steered, for the cluster selector.
* ``live_values``: a callable returning what that API says *now*
  (``{"weights": <GET /api/weights>, "status": <GET /api/status>}``), so assertions compare
  the page with the API rather than with constants.

``dashboard_url`` runs the real API and control loop in this process (see
``tests/livestack.py``) over a real testbed, so every number on the page is live.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from livestack import fast_settings, live_stack, settings_on_free_ports, two_cluster_settings


@pytest.fixture(scope="module")
def dashboard_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real API and control loop over a real testbed (Envoy, Prometheus, 6 backends)."""
    settings = fast_settings(settings_on_free_ports(6), interval_s=1.0)
    with live_stack(settings, tmp_path_factory.mktemp("dashboard"), run_loop=True, max_load_s=120) as stack:
        # Panels show live numbers only once the loop has pushed and telemetry has data.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            last = stack.controller.log.last()
            if last is not None and last.mode in ("policy", "baseline") and stack.controller.weight_history:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"control loop made no decision within 30 s; last: {stack.controller.log.last()}")
        yield stack.api_url


@pytest.fixture(scope="module")
def two_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """As ``dashboard_url``, with two clusters (my_service, checkout) steered at once."""
    with live_stack(
        two_cluster_settings(), tmp_path_factory.mktemp("dashboard2"), run_loop=True, max_load_s=90
    ) as stack:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(c.weight_history for c in stack.plane.controllers.values()):
            time.sleep(0.2)
        yield stack.api_url


@pytest.fixture
def live_values(dashboard_url: str) -> Callable[[], dict[str, Any]]:
    """``live_values()`` -> ``{"weights": ..., "status": ...}`` fetched from the API now."""

    def fetch() -> dict[str, Any]:
        with httpx.Client(base_url=dashboard_url, timeout=5.0) as client:
            out = {}
            for key, path in (("weights", "/api/weights"), ("status", "/api/status")):
                r = client.get(path)
                r.raise_for_status()
                out[key] = r.json()
            return out

    return fetch
