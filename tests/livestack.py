"""A whole control plane in this process, on real parts, for integration tests.

The lab's :class:`~balanceiq_lab.stack.Stack`: backends, ALS, Envoy and Prometheus from
the real testbed; the xDS server, telemetry, controllers and API are the real classes.
Only Ray Serve is left out (the Serve tests cover it), so a test can step the controller
deterministically and read its state directly as well as over HTTP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from balanceiq.config import Settings
from balanceiq.serve.plane import PolicyClient
from balanceiq.serve.policy import PolicyModel
from balanceiq_lab.bench.settings import settings_on_free_ports
from balanceiq_lab.stack import Stack, serve_asgi

__all__ = ["TOKEN", "LiveStack", "fast_settings", "live_stack", "serve_asgi", "settings_on_free_ports"]
__all__ += ["two_cluster_settings"]

TOKEN = "test-token-0123456789abcdef"


def fast_settings(base: Settings, interval_s: float = 1.0) -> Settings:
    """Short windows so a test sees a change within seconds, not the production 10 s."""
    return base.model_copy(
        update={
            "prometheus": base.prometheus.model_copy(update={"scrape_interval_s": 0.5}),
            "telemetry": base.telemetry.model_copy(update={"window_s": 2.0, "stale_after_s": 4.0}),
            "control": base.control.model_copy(update={"interval_s": interval_s}),
        }
    )


def two_cluster_settings(n: int = 6, interval_s: float = 1.0) -> Settings:
    """``n`` endpoints on free ports split in two clusters: ``my_service`` and ``checkout``."""
    s = settings_on_free_ports(n)
    eps = s.clusters[0].endpoints
    first = s.clusters[0].model_copy(update={"endpoints": eps[: n // 2]})
    second = s.clusters[0].model_copy(update={"name": "checkout", "endpoints": eps[n // 2 :]})
    return fast_settings(s.model_copy(update={"clusters": [first, second]}), interval_s)


LiveStack = Stack  # what live_stack yields


@contextlib.contextmanager
def live_stack(
    settings: Settings, workdir: Path, *, rate_rps: float = 120, run_loop: bool = False, max_load_s: float = 240
) -> Iterator[Stack]:
    """Everything up, a bounded load running through Envoy; all stopped on exit."""
    settings = settings.model_copy(update={"state_dir": workdir / "state"})
    with Stack(settings, workdir, health_check_interval_s=60) as stack:
        # The same load on every cluster: the first behind "/", the others behind "/<name>/".
        for c in settings.clusters:
            stack.bounded_load(c.name, rate_rps=rate_rps, max_s=max_load_s, concurrency=8)
        model = PolicyModel()
        plane = stack.control_plane(
            lambda rows: model.score_many([rows])[0],
            token=TOKEN,
            policy=PolicyClient(model.info, model.reload),
            retry_s=0.5,
        )
        if run_loop:
            plane.start()
        stack.serve_api()
        yield stack
