"""The fault suite's audits, on hand-made inputs: they must catch what they exist to
catch, or "0 invalid weights" and "0 double pushes" from the fault runs would mean
nothing. (The scenarios themselves run in tests/integration/test_faults.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from balanceiq.config import default_settings
from balanceiq.exceptions import TestbedError
from balanceiq.xds.assignment import Assignment, EndpointAssignment
from balanceiq.xds.snapshot import cluster_load_assignment
from balanceiq_lab.bench.faults import FAULTS, check_assignment, lease_audit, parse_faults, parse_version
from balanceiq_lab.errors import BenchError
from balanceiq_lab.testbed.testbed import Testbed

ADDRS = ["127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003"]


def _cla(weights: list[int], health: list[str] | None = None) -> endpoint_pb2.ClusterLoadAssignment:
    """What the xDS server sends, built the way it builds it."""
    eps = tuple(
        EndpointAssignment(
            address=a,
            host=a.split(":")[0],
            port=int(a.split(":")[1]),
            weight=1,
            cloud="aws",
            region="r",
            health=(health or ["HEALTHY"] * len(ADDRS))[i],
        )
        for i, a in enumerate(ADDRS)
    )
    cla = cluster_load_assignment(Assignment("my_service", eps))
    lbs = [lb for loc in cla.endpoints for lb in loc.lb_endpoints]
    for lb, w in zip(lbs, weights):
        lb.load_balancing_weight.value = w  # past the Assignment's own validation
    return cla


def test_a_valid_assignment_passes() -> None:
    assert check_assignment(_cla([5000, 3000, 2000]), "my_service", ADDRS) == []


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c.endpoints[0].lb_endpoints[0].load_balancing_weight.__setattr__("value", 0), "weight 0 outside"),
        (lambda c: c.endpoints[0].lb_endpoints[0].ClearField("load_balancing_weight"), "no load_balancing_weight"),
        (
            lambda c: [lb.load_balancing_weight.__setattr__("value", 2**31) for lb in c.endpoints[0].lb_endpoints],
            "> uint32",
        ),
        (lambda c: c.endpoints[0].lb_endpoints.pop(), "missing or unknown"),
        (lambda c: c.__setattr__("cluster_name", "other"), "cluster_name 'other'"),
        (
            lambda c: [
                lb.__setattr__("health_status", health_check_pb2.DRAINING)
                for loc in c.endpoints
                for lb in loc.lb_endpoints
            ],
            "no endpoint routable",
        ),
    ],
)
def test_invalid_assignments_are_caught(mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    cla = _cla([5000, 3000, 2000])
    mutate(cla)
    problems = check_assignment(cla, "my_service", ADDRS)
    assert any(needle in p for p in problems), problems


def test_versions_compare_by_epoch_then_sequence() -> None:
    assert parse_version("1700000000000.9") < parse_version("1700000000000.10") < parse_version("1700000000001.1")
    assert parse_version("v1") is None and parse_version("1.x") is None


def _push(at: float, owner: str, term: int, version: str | None, accepted: bool = True) -> dict:  # type: ignore[type-arg]
    return {"at": at, "owner": owner, "term": term, "version": version, "accepted": accepted, "changed": accepted}


def test_lease_audit_accepts_a_clean_takeover() -> None:
    audit = {
        "holders": [{"at": 0, "holder": "a", "term": 1}, {"at": 10, "holder": "b", "term": 2}],
        "pushes": [
            _push(1, "a", 1, "5.1"),
            _push(2, "a", 1, "5.2"),
            _push(9, "b", 1, None, accepted=False),
            _push(11, "b", 2, "5.3"),
        ],
    }
    out = lease_audit(audit)
    assert out["violations"] == [] and out["accepted"] == 3 and out["refused"] == 1
    assert out["owners"] == ["a", "b"] and out["terms"] == [1, 2]


def test_lease_audit_catches_double_pushes() -> None:
    holders = [{"at": 0, "holder": "a", "term": 1}, {"at": 10, "holder": "b", "term": 2}]
    # The old holder pushing after the takeover: two loops at once.
    stale = lease_audit({"holders": holders, "pushes": [_push(11, "b", 2, "5.3"), _push(12, "a", 1, "5.4")]})
    assert any("old term" in v for v in stale["violations"])
    # A push by someone who did not hold that term.
    wrong = lease_audit({"holders": holders, "pushes": [_push(11, "c", 2, "5.3")]})
    assert any("is b's" in v for v in wrong["violations"])
    # A version that does not grow.
    back = lease_audit({"holders": holders, "pushes": [_push(1, "a", 1, "5.3"), _push(2, "a", 1, "5.2")]})
    assert any("not above" in v for v in back["violations"])


def test_fault_names_are_checked_and_run_in_order() -> None:
    assert parse_faults(None) == list(FAULTS)
    assert parse_faults("ray_head_restart, envoy_restarted") == ["envoy_restarted", "ray_head_restart"]
    with pytest.raises(BenchError, match=r"unknown fault.*nope"):
        parse_faults("nope,envoy_restarted")


def test_cli_refuses_an_unknown_fault_before_starting_anything() -> None:
    exe = str(Path(sys.executable).parent / "balanceiq")
    res = subprocess.run(
        [exe, "bench", "faults", "--faults", "nope", "--json"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "unknown fault(s) nope" in res.stderr and res.stdout == ""
    assert "Traceback" not in res.stderr


def test_testbed_isolates_only_known_backends(tmp_path: Path) -> None:
    s = default_settings()
    victim = s.clusters[0].endpoints[1].address
    tb = Testbed(s, tmp_path, isolate=[victim])
    assert list(tb.isolated) == [victim] and victim not in [b["name"] for b in tb.backends.specs]
    with pytest.raises(TestbedError, match="unknown endpoint"):
        Testbed(s, tmp_path, isolate=["127.0.0.1:1"])


def test_exempt_moves_are_read_from_the_guardrails_notes() -> None:
    """The swing check subtracts only what the guardrails say they moved at once."""
    from balanceiq_lab.bench.faults import _exempt

    class Rec:
        notes = (
            "breaching: moved 0.00252 of traffic off 127.0.0.1:1 at once (exempt from max_shift)",
            "unavailable: moved 0.25 of traffic off 127.0.0.1:2, 127.0.0.1:3 at once (exempt from max_shift)",
            "max_shift: proposal moved 0.361 of traffic, limited to 0.25",
        )

    assert _exempt(Rec) == pytest.approx(0.25252)  # type: ignore[arg-type]
    Rec.notes = ("max_shift: proposal moved 0.361 of traffic, limited to 0.25",)
    assert _exempt(Rec) == 0  # type: ignore[arg-type]


def test_moves_are_measured_on_the_split_not_on_least_request_weights() -> None:
    """Under LEAST_REQUEST the weights pushed are scaled by each endpoint's requests in
    flight, so they differ from the split; a move is the split's. (The head-restart fault
    once read 0.2534 against max_shift 0.25 from the compensated weights.)"""
    from balanceiq.sim.calibrate.recording import DecisionRecord
    from balanceiq_lab.bench.faults import _moves

    a, b = ADDRS[:2]

    def rec(
        seq: int, previous: dict[str, int], weights: dict[str, int], shares: dict[str, float] | None
    ) -> DecisionRecord:
        return DecisionRecord(
            seq=seq, timestamp=float(seq), mode="baseline", weights=weights, previous=previous, shares=shares
        )

    adopted = {a: 5000, b: 5000}
    first = rec(1, adopted, {a: 7400, b: 2600}, {a: 0.75, b: 0.25})  # 0.25 moved, weights say 0.24
    hold = rec(2, first.weights, first.weights, None)  # telemetry blind: weights held
    # The same split, compensated afresh: no traffic moved, though the weights changed.
    again = rec(3, first.weights, {a: 8000, b: 2000}, {a: 0.75, b: 0.25})
    moved = _moves([first, hold, again], [a, b])
    assert moved == pytest.approx([0.25, 0.0, 0.0])
    # A record whose previous weights are not the last pushed starts from those weights.
    stranger = rec(4, {a: 1, b: 1}, {a: 3, b: 1}, {a: 0.6, b: 0.4})
    assert _moves([again, stranger], [a, b])[1] == pytest.approx(0.1)
