"""`bench api-load` / `bench xds-soak` without the stack: the request mix and bad arguments."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from balanceiq_lab.bench.load import _Fanout, request_mix, run_api_load, run_xds_soak
from balanceiq_lab.errors import BenchError

EXE = str(Path(sys.executable).parent / "balanceiq")


def test_the_mix_covers_every_read_route_and_authenticated_writes() -> None:
    addresses = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    mix = request_mix(addresses)
    assert len(mix) == 100
    kinds = Counter((m, p.split("?")[0]) for m, p, _, _ in mix)
    assert kinds[("PUT", "/api/weights")] == 2 and kinds[("POST", "/api/policy/score")] == 8
    reads = {p for (m, p) in kinds if m == "GET"}
    assert reads == {
        "/api/health",
        "/api/status",
        "/api/weights",
        "/api/metrics/all",
        "/api/metrics/weights",
        "/api/metrics/training",
        "/api/decisions",
        "/api/policy",
        "/metrics",
    }
    # Only the writes carry the token; each write names a configured endpoint.
    assert all(authed == (m == "PUT") for m, _, _, authed in mix)
    assert all(body["address"] in addresses for m, _, body, _ in mix if m == "PUT")  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"rate_rps": 0}, "--rate"),
        ({"rate_rps": 5000}, "--rate"),
        ({"duration_s": -1}, "--duration"),
        ({"duration_s": 10_000}, "--duration"),
        ({"background_rps": -5}, "--background-rps"),
    ],
)
def test_api_load_refuses_bad_arguments_before_starting_anything(kwargs: dict, needle: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(BenchError, match=needle):
        run_api_load(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"api": "rest"}, "--api"),
        ({"streams": 0}, "--streams"),
        ({"endpoints": 0}, "--endpoints"),
        ({"push_interval_s": 0.0}, "--push-interval"),
        ({"duration_s": 10, "warmup_s": 10}, "--warmup"),
    ],
)
def test_xds_soak_refuses_bad_arguments_before_starting_anything(kwargs: dict, needle: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(BenchError, match=needle):
        run_xds_soak(**kwargs)


@pytest.mark.parametrize("args", [["api-load", "--rate", "0"], ["xds-soak", "--api", "rest"]])
def test_cli_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    res = subprocess.run([EXE, "bench", *args, "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ")


def test_acks_that_arrive_before_the_version_is_expected_still_count() -> None:
    # CI: a 21-stream soak saw "18/21 ACKs within 10 s": three streams ACKed the push
    # before set_assignment returned the version the bench then waited for.
    fanout = _Fanout(3)
    for node in ("a", "b"):
        fanout("n-" + node, "v1", 1.0)
    done = fanout.expect("v1")
    assert not done.is_set() and fanout.count() == (2, 1.0)
    fanout("n-c", "v1", 2.0)
    assert done.is_set() and fanout.count() == (3, 2.0)
    for node in "abc":
        fanout("n-" + node, "v2", 3.0)
    assert fanout.expect("v2").is_set()
    for v in range(10):  # only the last few versions are kept
        fanout("n-a", f"w{v}", 4.0)
    assert len(fanout._counts) == _Fanout.KEEP
