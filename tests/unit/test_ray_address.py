"""`balanceiq train --address`: a dead or wrong Ray address is refused in seconds, not retried for minutes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from balanceiq.cluster import check_ray_address
from balanceiq.testbed.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).parent / "balanceiq")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_ray_address_is_checked_in_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a dead address, ray.init retries for ~14 minutes; the check answers at once.
    closed = free_ports(1)[0]
    assert f"nothing answers at 127.0.0.1:{closed} (Connection refused)" in (
        check_ray_address(f"127.0.0.1:{closed}") or ""
    )
    assert "nothing answers" in (check_ray_address(f"ray://127.0.0.1:{closed}") or "")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        # Something listens but never speaks gRPC (a web server, a reused port): refused
        # in the timeout, not after pages of GCS retries.
        assert "does not answer gRPC" in (check_ray_address(f"127.0.0.1:{port}", timeout=0.5) or "")
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    server = grpc.server(ThreadPoolExecutor(1), options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert check_ray_address(f"127.0.0.1:{port}") is None
        assert check_ray_address(f"ray://127.0.0.1:{port}") is None
    finally:
        server.stop(None)
    for bad in ("http://127.0.0.1:8265", "127.0.0.1", "127.0.0.1:http", "ray://:10001"):
        assert "expected auto, HOST:PORT or ray://HOST:PORT" in (check_ray_address(bad) or ""), bad
    # `auto` is resolved by Ray's rules, then probed. RAY_ADDRESS comes first:
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed}")
    assert f":{closed} (Connection refused)" in (check_ray_address("auto") or "")  # Ray swaps 127.0.0.1 for the node IP
    # Then the address file `ray start` left, here a stale one. (Ray prefers a lone
    # running GCS to the file; other engineers' Ray may be running, so pretend none is.)
    import ray._private.services

    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", lambda: frozenset())
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed}")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    problem = check_ray_address("auto") or ""
    assert problem.startswith("auto (=") and str(tmp_path / "ray" / "ray_current_cluster") in problem
    assert f":{closed} (Connection refused)" in problem


def test_cli_train_address(tmp_path: Path) -> None:
    res = run("train", "--help")
    assert res.returncode == 0 and "--address" in res.stdout
    closed = free_ports(1)[0]
    res = run("train", "--address", f"127.0.0.1:{closed}", "--iterations", "1", "--checkpoint-dir", str(tmp_path / "c"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"nothing answers at 127.0.0.1:{closed}" in res.stderr and "--address" in res.stderr
    assert not (tmp_path / "c").exists()
