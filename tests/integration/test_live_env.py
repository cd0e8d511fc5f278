"""LiveEnv on real parts: Envoy, sample backends, the ALS exporter, xDS, and RLlib on Ray.

Every test is bounded (pytest-timeout, bounded load, short intervals) and checks that
nothing it started outlives it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import yaml

from balanceiq.config import settings_from_dict
from balanceiq.exceptions import XdsError
from balanceiq.testbed.live_config import (
    DEFAULT_LAYOUT,
    fast_windows,
    live_rllib_overrides,
    ports_needed,
    reallocate_ports,
)
from balanceiq.testbed.live_env import LiveEnv
from balanceiq.testbed.ports import free_ports
from balanceiq_lab.testbed.envoy import endpoint_weights
from balanceiq_lab.testbed.testbed import Testbed

pytestmark = pytest.mark.slow

PPO_YAML = Path(__file__).resolve().parents[2] / "rllib_configs" / "ppo.yaml"
FAST = {"decision_interval_s": 1.0, "load_rps": 40, "episode_steps": 10}


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def envoy_weights(env: LiveEnv) -> dict[str, int]:
    assert env.settings is not None
    r = httpx.get(env.settings.envoy.admin_url + "/clusters?format=json", timeout=5, trust_env=False)
    r.raise_for_status()
    return endpoint_weights(r.json(), env.cluster_name)


def ports_of(env: LiveEnv) -> set[int]:
    s = env.settings
    assert s is not None
    return {ep.port for ep in s.clusters[0].endpoints} | {
        s.xds.port,
        s.envoy.listen_port,
        httpx.URL(s.envoy.admin_url).port,
        httpx.URL(s.prometheus.url).port,
        s.telemetry.als_grpc_port,
        s.telemetry.als_metrics_port,
    }


def wait_weights(env: LiveEnv, timeout: float = 5.0) -> dict[str, int]:
    """Envoy applies an ACKed assignment at once; allow a moment for the admin view."""
    deadline = time.monotonic() + timeout
    got = envoy_weights(env)
    while got != env.weights and time.monotonic() < deadline:
        time.sleep(0.1)
        got = envoy_weights(env)
    return got


@pytest.mark.timeout(120)
def test_two_live_envs_side_by_side() -> None:
    envs = [LiveEnv(dict(FAST, seed=i)) for i in range(2)]
    results: dict[int, list[Any]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        env = envs[i]
        try:
            obs, info = env.reset()
            results[i].append((obs, None, info))
            for step in range(3):
                # Distinct in-range endpoints: the LP re-splits them, so weights change.
                obs, r, _term, _trunc, info = env.step(np.array([step, step + 3]))
                results[i].append((obs, r, info))
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    pids: list[int] = []
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        elapsed = time.monotonic() - t0
        assert not errors, errors
        assert all(not t.is_alive() for t in threads)
        pids = envs[0].owned_pids + envs[1].owned_pids
        assert len(pids) == 8 and len(alive(pids)) == 8  # backends, ALS, Envoy + reaper, each
        assert not ports_of(envs[0]) & ports_of(envs[1])
        for i, env in enumerate(envs):
            assert len(results[i]) == 4
            for obs, r, _info in results[i]:
                assert env.observation_space.contains(obs)
                assert r is None or math.isfinite(r)
            assert all(info["reward_measured"] for _, r, info in results[i][1:]), [x[2] for x in results[i]]
            assert any(info["lp_status"] is not None for _, _, info in results[i][1:])
            assert env.weights != {a: 1 for a in env.addresses}  # the LP's weights, not the config's
            assert wait_weights(env) == env.weights  # ... applied in this env's own Envoy
        # Concurrent, not one after the other: 3 decisions of 1 s each plus start-up.
        print(
            f"two envs: reset + 3 steps each in {elapsed:.1f}s; step_s "
            f"{[round(x[2]['step_s'], 2) for i in results for x in results[i][1:]]}"
        )
    finally:
        for env in envs:
            env.close()
    assert wait_gone(pids) == []
    for env in envs:
        assert env._owned.workdir is not None and not env._owned.workdir.exists()


@pytest.mark.timeout(120)
def test_reset_restores_backends_weights_and_prices_after_a_scenario() -> None:
    # 1 s decisions, 36 scenario seconds each: the first step crosses two events.
    env = LiveEnv(
        dict(FAST, scenario="degrade_and_dearer", scenario_offset_s=34.5, scenario_speed=36, reset_settle_s=1.0)
    )
    try:
        _, info = env.reset()
        assert info["phase"] == "start"
        _, _, _, _, info = env.step(np.array([2, 3]))
        assert info["scenario_events"] == ["gcp degrades", "azure gets dearer"]
        clouds = {a: ep.cloud for a, ep in zip(env.addresses, env.settings.clusters[0].endpoints)}  # type: ignore[union-attr]
        driver = env._owned.driver
        assert driver is not None

        def extra_ms(a: str) -> float:
            return float(
                httpx.get(driver.backend_urls[a] + "/control", timeout=5, trust_env=False).json()["extra_latency_ms"]
            )

        gcp = [a for a, c in clouds.items() if c == "gcp"]
        assert all(extra_ms(a) == 150 for a in gcp)
        assert env.last_obs is not None
        assert [e.cost_per_million for e in env.last_obs.endpoints if clouds[e.address] == "azure"] == pytest.approx(
            [2.2, 2.2]
        )
        _, info = env.reset()
        assert all(extra_ms(a) == 0 for a in gcp)
        assert [e.cost_per_million for e in env.last_obs.endpoints if clouds[e.address] == "azure"] == pytest.approx(
            [0.55, 0.55]
        )
        assert info["weights"] == [1] * 6 and wait_weights(env) == env.weights
    finally:
        env.close()


@pytest.mark.timeout(60)
def test_an_unclosed_env_is_cleaned_up_when_collected() -> None:
    import gc

    env = LiveEnv({"decision_interval_s": 0.5, "load_rps": 20, "scenario": "degrade_and_dearer"})
    env.reset()
    pids, workdir = env.owned_pids, env._owned.workdir
    assert len(alive(pids)) == 4
    del env
    gc.collect()
    assert wait_gone(pids) == [] and workdir is not None and not workdir.exists()


@pytest.mark.timeout(120)
def test_gymnasium_env_checker() -> None:
    from gymnasium.utils.env_checker import check_env

    env = LiveEnv({"decision_interval_s": 0.5, "load_rps": 40})
    try:
        t0 = time.monotonic()
        check_env(env, skip_render_check=True)  # ~8 resets and a step, and a make/close of its spec
        print(f"check_env took {time.monotonic() - t0:.1f}s")
    finally:
        env.close()
    assert wait_gone(env.owned_pids) == []


@pytest.mark.timeout(90)
def test_reaper_stops_the_stack_of_a_killed_env_runner(tmp_path: Path) -> None:
    """SIGKILL skips close(), atexit and finalizers: the reaper still stops the stack."""
    script = textwrap.dedent(
        """
        import json, sys, time
        from balanceiq.testbed.live_env import LiveEnv
        env = LiveEnv({"decision_interval_s": 0.5, "load_rps": 20})
        env.reset()
        print(json.dumps([env.owned_pids, str(env._owned.workdir)]), flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        pids, workdir = json.loads(line)
        assert len(alive(pids)) == 4 and Path(workdir).is_dir()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone(pids, 20) == []
        deadline = time.monotonic() + 10
        while Path(workdir).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(workdir).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- on Ray: attach mode and RLlib ------------------------------------------------------------


# ``ray_local`` is tests/conftest.py's: a local cluster of this module's own, its start tried twice.


@pytest.mark.timeout(120)
def test_attach_mode_drives_a_staging_stack_and_leaves_it_running(ray_local: None, tmp_path: Path) -> None:
    import ray

    from balanceiq.xds.actor import start_actor

    base = settings_from_dict(DEFAULT_LAYOUT)
    settings, _ = reallocate_ports(base, free_ports(ports_needed(base)))
    settings = fast_windows(settings, 1.0).model_copy(update={"state_dir": tmp_path / "state"})
    actor = start_actor(settings, state_dir=tmp_path / "state")
    env = None
    try:
        with Testbed(settings, tmp_path / "tb", prometheus=False) as tb:
            staging = [tb.backends.pid, tb.als.pid, tb.envoy.pid]  # type: ignore[union-attr]
            # A running controller holds the lease: attach mode must not fight it.
            assert ray.get(actor.acquire_lease.remote("staging-controller", 60))["granted"]
            cfg_file = tmp_path / "staging.yaml"
            cfg_file.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
            env = LiveEnv({"mode": "attach", "config": str(cfg_file), "decision_interval_s": 1.0, "load_rps": 40})
            with pytest.raises(XdsError, match="staging-controller"):
                env.reset()
            ray.get(actor.release_lease.remote("staging-controller"))
            obs, _ = env.reset()
            assert env.observation_space.contains(obs)
            for step in range(2):
                obs, r, _, _, _info = env.step(np.array([step, step + 3]))
                assert env.observation_space.contains(obs) and math.isfinite(r)
            assert env.weights != {a: 1 for a in env.addresses}
            assert wait_weights(env) == env.weights
            env.close()
            # It restored what it found and let the lease go; the stack it drove still runs.
            status = ray.get(actor.status.remote())
            assert status["lease"].get("holder") in (None, "")
            assert wait_weights(env) == {a: 1 for a in env.addresses}
            assert alive(staging) == staging and env.owned_pids == []
            assert ray.is_initialized()
    finally:
        if env is not None:
            env.close()
        ray.kill(actor)


@pytest.mark.timeout(240)
def test_rllib_trains_on_two_live_env_runners(ray_local: None) -> None:
    from balanceiq.train import build_algo_config, load_algo_config

    cfg = load_algo_config(None)
    over = live_rllib_overrides(cfg["env_config"], {"decision_interval_s": 1.0, "episode_steps": 6, "load_rps": 40}, 2)
    # Test-sized: 8 decisions per runner per iteration.
    over["env_runners"]["rollout_fragment_length"] = 8
    over["training"].update(train_batch_size_per_learner=16, minibatch_size=8, num_epochs=2)
    algo = build_algo_config(cfg, scenarios=None, num_env_runners=2, env=LiveEnv, env_overrides=over).build_algo()
    pids: list[int] = []
    try:
        t0 = time.monotonic()
        results = [algo.train() for _ in range(2)]
        elapsed = time.monotonic() - t0
        sampled = (
            results[-1].get("num_env_steps_sampled_lifetime")
            or results[-1]["env_runners"]["num_env_steps_sampled_lifetime"]
        )
        assert sampled >= 32
        per_runner = algo.env_runner_group.foreach_env_runner(
            lambda r: [
                {
                    "worker_index": e.unwrapped.worker_index,
                    "pid": os.getpid(),
                    "steps": e.unwrapped.total_steps,
                    "listen_port": e.unwrapped.settings.envoy.listen_port,
                    "envoy_admin": e.unwrapped.settings.envoy.admin_url,
                    "pids": e.unwrapped.owned_pids,
                }
                for e in r.env.unwrapped.envs
            ],
            local_env_runner=False,
        )
        envs = [e for runner in per_runner for e in runner]
        print(f"2 live runners: {sampled:.0f} env steps in {elapsed:.1f}s; {json.dumps(envs)[:600]}")
        assert len(envs) == 2
        assert {e["worker_index"] for e in envs} == {1, 2} and len({e["pid"] for e in envs}) == 2
        assert all(e["steps"] >= 16 for e in envs)  # both runners stepped their own env
        assert len({e["listen_port"] for e in envs}) == 2 and len({e["envoy_admin"] for e in envs}) == 2
        pids = [p for e in envs for p in e["pids"]]
        assert len(alive(pids)) == 8
    finally:
        algo.stop()
    assert wait_gone(pids, 30) == []
