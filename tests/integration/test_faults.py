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


def _audited(r: FaultResult, at_least: int) -> None:
    # Measured from both ends, and enough versions seen for "0 invalid" to mean something.
    assert r.invalid_weights_sent == 0 and r.envoy_rejected_updates == 0, _show(r)
    assert r.assignments_checked >= at_least, _show(r)


def test_envoy_restart_fetches_the_latest_weights(tmp_path: Path) -> None:
    r = faults.envoy_restarted(workdir=tmp_path)
    _show(r)
    assert r.pushes_before_restart >= 1  # something beyond the config's weights to fetch
    assert r.envoy_acked_version is not None and r.envoy_acked_version == r.latest_version
    assert r.weights_match and len(r.envoy_weights) == faults.ENDPOINTS
    assert r.recovery_s is not None and r.recovery_s < 5.0, _show(r)
    # Only the outage itself may fail requests: none before the stop or after it is back.
    assert r.failed_requests == 0 and r.requests >= 500, _show(r)
    _audited(r, 2)
    assert r.ok


def test_prometheus_killed_falls_back_without_weight_swings(tmp_path: Path) -> None:
    r = faults.prometheus_killed(workdir=tmp_path)
    _show(r)
    assert r.by_source.get("envoy-admin", 0) >= 1 and set(r.by_source) <= {"envoy-admin", "prometheus", "none"}
    assert r.recovery_s is not None and r.recovery_s < 10.0, _show(r)  # retry_s 5 s + an interval
    assert r.decisions_after >= 8 and r.by_mode.get("policy", 0) + r.by_mode.get("baseline", 0) >= 1
    # A backend slowed during the outage: the fallback's decisions move traffic, and
    # none beyond max_shift except what the guardrails moved at once off a breacher.
    assert r.swings_beyond_max_shift == 0 and r.max_limited_move <= r.max_shift + 1e-3, _show(r)
    assert r.slowed_share_after < r.slowed_share_before, _show(r)
    assert r.failed_requests == 0 and r.requests >= 500, _show(r)
    _audited(r, 2)
    assert r.ok


def test_backend_killed_loses_its_traffic_within_two_intervals(tmp_path: Path) -> None:
    r = faults.backend_killed(workdir=tmp_path)
    _show(r)
    assert r.traffic_off_intervals is not None and r.traffic_off_intervals <= 2.0, _show(r)
    assert r.first_decision is not None and r.first_decision["weights"][r.victim] == 1
    # Errors below 1% within 10 s of the kill, and over everything after that.
    assert r.errors_settled_s is not None and r.errors_settled_s <= 10.0, _show(r)
    assert r.error_rate_after_10s is not None and r.error_rate_after_10s < 0.01, _show(r)
    assert r.requests_after_10s >= 300, _show(r)
    _audited(r, 2)
    assert r.ok


def test_actor_killed_under_load_resyncs_without_failures(ray_local: None, tmp_path: Path) -> None:
    r = faults.actor_killed(workdir=tmp_path)
    _show(r)
    assert r.failed_requests == 0 and r.requests >= 500, _show(r)
    assert r.restored_from_state and r.weights_restored
    assert r.resync_s <= 2.0, _show(r)
    assert r.epoch_after > r.epoch_before and r.versions_repeated == 0, _show(r)
    _audited(r, 2)
    assert r.ok


def test_serve_replica_killed_resumes_with_one_loop(ray_local: None, tmp_path: Path) -> None:
    r = faults.serve_replica_killed(workdir=tmp_path)
    _show(r)
    assert r.recovery_s is not None and len(r.owners) == 2 and r.lease_terms == [1, 2], _show(r)
    # The old holder's lease must expire (ttl 5 s) before anyone else may push.
    assert 0 < r.recovery_s < 60.0
    assert r.double_pushes == 0 and r.owners_after_takeover <= 1 and r.running_replicas == 1, _show(r)
    assert r.pushes_accepted >= 1 and r.versions_repeated == 0
    assert r.failed_requests == 0, _show(r)
    _audited(r, 2)
    assert r.ok


def test_ray_head_restart_envoy_keeps_serving_and_state_is_restored(ray_local: None, tmp_path: Path) -> None:
    """The documented behaviour (README "Reliability", BENCHMARKS): while Ray is gone
    Envoy serves its last weights; a new cluster's xDS actor restores them from
    ``state_dir`` under a new epoch and Envoy resyncs."""
    r = faults.ray_head_restart(workdir=tmp_path)
    _show(r)
    assert r.failed_requests == 0 and r.requests >= 500, _show(r)
    assert r.envoy_weights_held and r.polls_during_outage >= 5, _show(r)
    assert r.restored_from_state and r.weights_restored
    assert r.epoch_after > r.epoch_before and r.versions_repeated == 0
    assert r.resync_s <= 2.0, _show(r)
    # A controller started afterwards: nothing of the old lease left, and it starts from
    # the restored split instead of the config's, moving at most max_shift from it.
    assert r.controller_adopted and r.controller_lease_term == 1, _show(r)
    assert r.controller_mode != "standby" and r.controller_first_move <= 0.25 + 1e-3, _show(r)
    _audited(r, 2)
    assert r.ok


@pytest.mark.timeout(300)
def test_a_head_that_crashes_comes_back_by_itself_with_the_gcs_in_redis(tmp_path: Path) -> None:
    # Issue #17: every process of the head SIGKILLed, `ray start --head` again and
    # nothing else; Redis keeps the GCS's tables, so the xDS actor, the Serve app and the
    # control loop return on their own.
    r = faults.head_crash(workdir=tmp_path, gcs_ft=True, wait_s=60)
    _show(r)
    assert r.processes_killed >= 5  # gcs_server, raylet, the actors' workers
    assert r.recovery_s is not None and r.recovery_s <= 30 and r.operator_commands == 0, _show(r)
    assert r.failed_requests == 0 and r.envoy_weights_held and r.versions_repeated == 0, _show(r)
    _audited(r, 2)
    assert r.ok, _show(r)
