"""The fault suite (issue #8): one part of a running control plane broken at a time,
on real parts (Envoy, Prometheus, backends, Ray, Serve), under a bounded open-loop
load to loopback (100 req/s, each scenario under a minute).

The scenarios are :mod:`balanceiq_lab.bench.faults`, the same functions ``balanceiq bench
faults`` runs, so these tests and the benchmark measure the same thing. Times come from
the xDS server's and Envoy's own clocks where one exists; a poll on a loaded machine
must not count as recovery time. Ray scenarios come last: the head restart replaces the
module's Ray cluster with a new one (which the ``ray_local`` fixture then shuts down).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from balanceiq_lab.bench import faults
from balanceiq_lab.bench.faults import FaultResult

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _show(r: FaultResult) -> str:
    out = json.dumps(r.to_json())
    print(out)  # -rP
    return out


def _met(r: FaultResult) -> None:
    """Every target of the fault (``FaultResult.checks``: the same thresholds `balanceiq
    bench faults` reports), named when missed."""
    missed = {k: v for k, v in r.to_json()["targets"].items() if not v["met"]}
    assert not missed, f"missed {missed}; {_show(r)}"
    assert r.ok


def test_envoy_restart_fetches_the_latest_weights(tmp_path: Path) -> None:
    r = faults.envoy_restarted(workdir=tmp_path)
    _show(r)
    assert len(r.envoy_weights) == faults.ENDPOINTS
    _met(r)


def test_prometheus_killed_falls_back_without_weight_swings(tmp_path: Path) -> None:
    r = faults.prometheus_killed(workdir=tmp_path)
    _show(r)
    assert set(r.by_source) <= {"envoy-admin", "prometheus", "none"}
    assert r.by_mode.get("policy", 0) + r.by_mode.get("baseline", 0) >= 1
    _met(r)


def test_backend_killed_loses_its_traffic_within_two_intervals(tmp_path: Path) -> None:
    r = faults.backend_killed(workdir=tmp_path)
    _show(r)
    assert r.first_decision is not None and r.first_decision["weights"][r.victim] == 1
    _met(r)


def test_actor_killed_under_load_resyncs_without_failures(ray_local: None, tmp_path: Path) -> None:
    r = faults.actor_killed(workdir=tmp_path)
    _show(r)
    _met(r)


def test_serve_replica_killed_resumes_with_one_loop(ray_local: None, tmp_path: Path) -> None:
    r = faults.serve_replica_killed(workdir=tmp_path)
    _show(r)
    _met(r)


def test_ray_head_restart_envoy_keeps_serving_and_state_is_restored(ray_local: None, tmp_path: Path) -> None:
    """The documented behaviour (README "Reliability", BENCHMARKS): while Ray is gone
    Envoy serves its last weights; a new cluster's xDS actor restores them from
    ``state_dir`` under a new epoch and Envoy resyncs; a controller started afterwards
    starts from the restored split."""
    r = faults.ray_head_restart(workdir=tmp_path)
    _show(r)
    _met(r)


@pytest.mark.timeout(300)
def test_a_head_that_crashes_comes_back_by_itself_with_the_gcs_in_redis(tmp_path: Path) -> None:
    # Issue #17: every process of the head SIGKILLed, `ray start --head` again and
    # nothing else; Redis keeps the GCS's tables, so the xDS actor, the Serve app and the
    # control loop return on their own.
    r = faults.head_crash(workdir=tmp_path, gcs_ft=True, wait_s=60)
    _show(r)
    assert "recovery_s" in r.checks() and "processes_killed" in r.checks()
    _met(r)
