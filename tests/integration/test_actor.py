"""The xDS server as a Ray actor (real local Ray) driving a real Envoy."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray

from balanceiq.config import Settings
from balanceiq.xds.actor import ACTOR_NAME, NAMESPACE, get_actor, start_actor
from balanceiq_lab.testbed.load import LoadResult, run_load_sync
from balanceiq_lab.testbed.testbed import Testbed

pytestmark = pytest.mark.slow


def _epoch(version: str) -> int:
    return int(version.split(".")[0])


def _wait_status(actor: ray.actor.ActorHandle, pred, timeout: float) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = ray.get(actor.status.remote(), timeout=2)
            if pred(last):
                return last
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s; last status {last}")


def test_actor_is_named_pinned_and_serves(ray_local: None, ports_settings: Settings, tmp_path: Path) -> None:
    actor = start_actor(ports_settings, state_dir=tmp_path / "state")
    try:
        assert get_actor()._actor_id == actor._actor_id
        # Asking again returns the same actor rather than a second server on the port.
        assert start_actor(ports_settings, state_dir=tmp_path / "state")._actor_id == actor._actor_id
        status = ray.get(actor.status.remote())
        assert status["listening"] == f"127.0.0.1:{ports_settings.xds.port}"
        head = next(n for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
        assert status["node_id"] == head["NodeID"]
        assert ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)._actor_id == actor._actor_id
    finally:
        ray.kill(actor, no_restart=True)


def test_killed_actor_restarts_without_failed_requests(
    ray_local: None, ports_settings: Settings, tmp_path: Path
) -> None:
    actor = start_actor(ports_settings, state_dir=tmp_path / "state")
    try:
        with Testbed(ports_settings, tmp_path / "tb", health_check_interval_s=60) as tb:
            addrs = [ep.address for ep in ports_settings.clusters[0].endpoints]
            weights = dict(zip(addrs, [6, 3, 1]))
            before = ray.get(actor.set_assignment.remote("my_service", weights))
            assert ray.get(actor.wait_for_ack.remote(before, None, 5.0))
            old_pid = ray.get(actor.status.remote())["pid"]

            # A bounded load (<= 3000 requests, <= 20 s) runs across the kill.
            result: list[LoadResult] = []
            load = threading.Thread(
                target=lambda: result.append(
                    run_load_sync(tb.envoy.listen_url, total=3000, concurrency=4, max_seconds=20, rate_rps=250)
                )
            )
            load_start = time.time()
            load.start()
            time.sleep(2.0)
            killed_at = time.time()
            ray.kill(actor, no_restart=False)  # a crash: Ray must bring it back

            restarted = _wait_status(actor, lambda s: s["pid"] != old_pid, timeout=30)
            restart_t = restarted["started_at"]  # set in __init__, before the port is bound
            after = restarted["version"]
            # Resync: Envoy reconnects and ACKs the restored snapshot's new version.
            synced = _wait_status(
                actor,
                lambda s: any(n["last_acked_version"] == after for n in s["nodes"]),
                timeout=5,
            )
            # Server-side timestamps: the test's own polling must not count as resync time.
            listening = restarted["listening_since"]
            node = next(n for n in synced["nodes"] if n["last_acked_version"] == after)
            reconnect_s = node["first_seen"] - listening
            resync_s = node["last_acked_at"] - listening
            load.join(40)
            assert not load.is_alive()

            assert restarted["restored_from_state"] is True
            assert restarted["clusters"]["my_service"]["endpoints"][0]["weight"] == 6
            assert {e["address"]: e["weight"] for e in synced["clusters"]["my_service"]["endpoints"]} == weights
            # Versions never repeat across the restart: a new, larger epoch.
            assert after != before and _epoch(after) > _epoch(before)
            res = result[0]
            load_end = load_start + res.elapsed_s
            print(  # -rP
                f"restart_s={restart_t - killed_at:.3f} bind_s={listening - restart_t:.3f} "
                f"reconnect_s={reconnect_s:.3f} resync_s={resync_s:.3f} load_s={res.elapsed_s:.1f}"
            )
            # The load spans the crash, the restart and the resync.
            assert load_start < killed_at and load_end > listening + resync_s
            assert resync_s <= 2.0, f"Envoy resynced {resync_s:.2f}s after the restart"
            assert res.sent >= 1000 and res.failed == 0, res.to_json()
    finally:
        ray.kill(actor, no_restart=True)
