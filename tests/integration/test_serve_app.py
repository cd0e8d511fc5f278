"""The Serve application on a real local Ray: HTTP through Serve's proxy, the Policy
deployment's batching and hot swap, one active loop, and training started over the API."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import ray
from livestack import fast_settings, settings_on_free_ports
from ray import serve

from balanceiq.config import Settings
from balanceiq.control.controller import Controller
from balanceiq.policy.checkpoint import SHIPPED
from balanceiq.policy.features import N_FEATURES
from balanceiq.serve.app import build_app
from balanceiq.sim.scenario import SCENARIOS
from balanceiq.testbed.ports import free_ports
from balanceiq.xds.actor import get_actor
from balanceiq.xds.client import ActorXdsClient
from balanceiq_lab.testbed.load import run_load_sync
from balanceiq_lab.testbed.testbed import Testbed

pytestmark = pytest.mark.slow

TOKEN = "serve-test-token-0123456789"
APP = "biq"


@dataclass
class App:
    settings: Settings
    url: str

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, trust_env=False, **kw)

    def wait(self, path: str, pred, timeout: float, what: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                r = self.get(path)
                last = r.json() if r.status_code == 200 else r.text
                if r.status_code == 200 and pred(last):
                    return last  # type: ignore[no-any-return]
            except (httpx.HTTPError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise AssertionError(f"{what} not seen within {timeout}s; last: {str(last)[:2000]}")


@pytest.fixture(scope="module")
def app(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    work = tmp_path_factory.mktemp("serve")
    base = fast_settings(settings_on_free_ports(4), interval_s=1.0)
    s = base.model_copy(update={"state_dir": work / "state", "api": base.api.model_copy(update={"token": TOKEN})})
    port = free_ports(1)[0]
    stop = threading.Event()
    with Testbed(s, work / "tb", health_check_interval_s=60) as tb:
        loader = threading.Thread(
            target=run_load_sync,
            args=(tb.envoy.listen_url,),
            kwargs={"total": 100 * 400, "concurrency": 6, "max_seconds": 400, "rate_rps": 100, "stop": stop},
            daemon=True,
        )
        loader.start()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(build_app({"settings": s}), name=APP, route_prefix="/")
            yield App(s, f"http://127.0.0.1:{port}")
        finally:
            stop.set()
            serve.shutdown()
            try:
                ray.kill(get_actor(), no_restart=True)
            except ValueError:
                pass
            loader.join(15)


def test_api_and_loop_over_serve(app: App) -> None:
    status = app.wait(
        "/api/status",
        lambda s: s["components"]["controller"]["state"] == "up" and s["components"]["xds"]["state"] == "up",
        timeout=60,
        what="controller and xDS up",
    )
    assert status["components"]["policy"]["state"] == "up"
    assert status["components"]["policy"]["module_class"] == "CriticalEndpointModule"
    weights = app.get("/api/weights").json()
    assert sum(e["weight"] for e in weights["endpoints"]) == 10000
    decisions = app.get("/api/decisions", params={"limit": 50}).json()["decisions"]
    assert any(d["pushed"] and d["acked"] for d in decisions)
    r = httpx.put(app.url + "/api/policy", json={"k": 2}, timeout=10, trust_env=False)
    assert r.status_code == 401
    assert "balanceiq_decisions_total" in app.get("/metrics").text
    assert app.get("/").status_code == 200 and app.get("/docs").status_code == 200


def test_policy_batches_and_hot_swaps_without_dropping_requests(app: App) -> None:
    handle = serve.get_deployment_handle("Policy", app_name=APP)
    rows = np.random.default_rng(0).random((64, N_FEATURES), dtype=np.float32)
    before = handle.info.remote().result(timeout_s=10)

    def call(_: int) -> np.ndarray:
        return handle.score.remote(rows).result(timeout_s=30)  # type: ignore[no-any-return]

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(call, i) for i in range(400)]
        time.sleep(0.05)
        swapped = handle.reload.remote(str(SHIPPED)).result(timeout_s=60)
        results = [f.result() for f in futures]
    assert len(results) == 400 and all(r.shape == (64,) and np.all(np.isfinite(r)) for r in results)
    assert swapped["swaps"] == before["swaps"] + 1
    info = handle.info.remote().result(timeout_s=10)
    assert info["max_batch"] > 1, info  # concurrent callers shared forward passes
    bad = httpx.put(
        app.url + "/api/policy",
        json={"checkpoint": "/nonexistent"},
        timeout=30,
        trust_env=False,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert bad.status_code == 400 and "/nonexistent" in bad.text
    assert handle.info.remote().result(timeout_s=10)["checkpoint"] == str(SHIPPED)


def test_a_second_controller_stands_by(app: App) -> None:
    app.wait("/api/status", lambda s: s["lease"].get("granted"), timeout=30, what="lease held")
    second = Controller(app.settings, observer=None, xds=ActorXdsClient(get_actor()), scorer=None)  # type: ignore[arg-type]
    rec = second.step()
    assert rec.mode == "standby" and not rec.pushed and "lease held by" in rec.notes[0]
    holder = app.get("/api/status").json()["lease"]["holder"]
    assert holder and holder != second.owner


@pytest.mark.timeout(600)  # the run's own wait is 420 s: training, then the gate's 8 scenarios twice and live
def test_train_evaluate_promote_over_the_api(app: App) -> None:
    """POST /api/train runs train -> evaluate -> promote and reports each stage; a
    2-iteration policy is no better than the shipped one, so it must not be promoted."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    handle = serve.get_deployment_handle("Policy", app_name=APP)
    serving_before = handle.info.remote().result(timeout_s=10)["checkpoint"]
    bad = httpx.post(
        app.url + "/api/train",
        json={"iterations": 1, "scenarios": ["no_such"]},
        headers=auth,
        timeout=30,
        trust_env=False,
    )
    assert bad.status_code == 409 and "no_such" in bad.text
    # With a short live evaluation too: the gate's live half runs inside the training actor.
    live = {"episodes": 1, "episode_steps": 4, "decision_interval_s": 1.0, "scenario_speed": 40.0}
    r = httpx.post(
        app.url + "/api/train",
        json={"iterations": 2, "num_env_runners": 0, "scenarios": ["degrade"], "live_eval": live},
        headers=auth,
        timeout=30,
        trust_env=False,
    )
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    again = httpx.post(app.url + "/api/train", json={"iterations": 1}, headers=auth, timeout=30, trust_env=False)
    assert again.status_code == 409 and "one run at a time" in again.text
    done = app.wait(
        "/api/metrics/training",
        lambda t: t["runs"] and t["runs"][0]["id"] == run_id and t["runs"][0]["state"] in ("done", "failed"),
        timeout=420,
        what="training run finished",
    )
    run = done["runs"][0]
    assert run["state"] == "done", run
    assert done["training_iterations"] >= 2 and len(done["recent_rewards"]) == 2 and done["buffer_size"] > 0
    assert done["last_update"].endswith("Z")
    stages = run["stages"]
    assert stages["train"]["state"] == "done"
    ev = stages["evaluate"]
    assert ev["state"] == "done" and set(ev["scenarios"]) == {*SCENARIOS, "live:degrade_and_dearer"}
    ev_live = stages["evaluate_live"]
    assert ev_live["state"] == "done" and [(e["episode"], e["checkpoint"]) for e in ev_live["episodes"]] == [
        (0, "candidate"),
        (0, "serving"),
    ]
    assert all(e["steps"] == 4 for e in ev_live["episodes"])
    serving_after = handle.info.remote().result(timeout_s=10)["checkpoint"]
    if ev["verdict"].startswith("promoted"):
        assert stages["promote"]["state"] == "done" and serving_after == run["checkpoint"]
    else:
        assert stages["promote"]["state"] == "skipped" and serving_after == serving_before
