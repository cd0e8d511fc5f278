"""cluster.yaml (AWS) and cluster-local.yaml (fake multi-node): valid by Ray's own checks,
offline; broken copies give readable problems; `balanceiq cluster check` exits 2 on them."""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from balanceiq.cluster import AUTOSCALER_REQUIRED_KEYS, check_cluster_config, check_ray_address
from balanceiq.testbed.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
AWS = ROOT / "cluster.yaml"
LOCAL = ROOT / "cluster-local.yaml"
EXE = str(Path(sys.executable).parent / "balanceiq")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def write(tmp_path: Path, config: dict[str, Any], name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (AWS, anything) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access during an offline check: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_shipped_configs_pass_rays_own_checks_offline(no_network: None) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it calls AWS: merge aws/defaults.yaml, then validate.
    prepared = prepare_config(copy.deepcopy(load(AWS)))
    validate_config(prepared)
    assert prepared["available_node_types"]["ray.head.default"]["max_workers"] == 0  # filled in by prepare_config
    # The autoscaler reads the fake cluster's file as written: validate it as is.
    validate_config(load(LOCAL))
    assert check_cluster_config(AWS) == []
    assert check_cluster_config(LOCAL) == []


def test_aws_config_matches_the_design() -> None:
    cfg = load(AWS)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"] == "us-west-2"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert head["node_config"]["InstanceType"] == "m7i.large" and head["resources"] == {"CPU": 0}
    assert [w["node_config"]["InstanceType"] for w in workers.values()] == ["c7i.xlarge"]
    assert [(w["min_workers"], w["max_workers"]) for w in workers.values()] == [(0, 4)]
    assert cfg["max_workers"] == 4 and cfg["idle_timeout_minutes"] > 0
    # make setup's order: CPU torch 2.13.0 first, then the package (editable).
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    pkg_at = next(i for i, c in enumerate(setup) if "pip install" in c and "-e ~/balanceiq" in c)
    assert torch_at < pkg_at and "download.pytorch.org/whl/cpu" in setup[torch_at]
    assert any("boto3" in c for c in cfg["head_setup_commands"])
    # Every local path it mounts exists in the checkout (relative to the repo root,
    # where `ray up` runs), and the token is shipped; token auth is forced on.
    for remote, local in cfg["file_mounts"].items():
        if remote != "~/.ray/auth_token":
            assert (ROOT / local).exists(), local
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmd in (cfg["head_start_ray_commands"][-1], cfg["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token" in cmd and "~/venv/bin/ray start" in cmd
    assert "RAY_AUTH_MODE=disabled" not in AWS.read_text()


def test_local_config_fits_this_machine() -> None:
    cfg = load(LOCAL)
    assert cfg["provider"]["type"] == "fake_multinode"
    assert cfg["head_node_type"] == "ray.head.default"
    assert all(k in cfg for k in AUTOSCALER_REQUIRED_KEYS)
    types = cfg["available_node_types"]
    assert types["ray.head.default"]["resources"]["CPU"] == 0
    worker = types["ray.worker.cpu"]
    assert worker["resources"]["CPU"] == 1 and worker["min_workers"] >= 2
    assert worker["max_workers"] * worker["resources"]["CPU"] <= 3  # logical CPUs on 2 cores


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda c: c["available_node_types"]["ray.worker.cpu"].update(max_wokers=2),
            "available_node_types[ray.worker.cpu].max_wokers: unknown key (did you mean 'max_workers'?)",
        ),
        (
            lambda c: c.update(idle_timout_minutes=5),
            "idle_timout_minutes: unknown key (did you mean 'idle_timeout_minutes'?)",
        ),
        (lambda c: c.update(max_workers="four"), "max_workers: 'four' is not of type 'integer'"),
        (
            lambda c: c["available_node_types"]["ray.worker.cpu"]["resources"].update(CPU=1.5),
            "available_node_types[ray.worker.cpu].resources.CPU: 1.5 is not of type 'integer'",
        ),
        (
            lambda c: c["available_node_types"]["ray.worker.cpu"].pop("node_config"),
            "available_node_types[ray.worker.cpu]: 'node_config' is a required property",
        ),
        (
            lambda c: c["available_node_types"]["ray.worker.cpu"].update(min_workers=5),
            "available_node_types[ray.worker.cpu]: min_workers 5 > max_workers 4",
        ),
        (lambda c: c.update(head_node_type="ray.head.gpu"), "`head_node_type` must be one of `available_node_types`."),
        (lambda c: c["provider"].update(type="aws2"), "provider.type: Unsupported node provider: aws2"),
        (
            lambda c: c["available_node_types"]["ray.worker.cpu"]["node_config"].pop("InstanceType"),
            "available_node_types[ray.worker.cpu].node_config.InstanceType: required",
        ),
    ],
)
def test_broken_aws_config_names_the_problem(tmp_path: Path, no_network: None, edit: Any, expected: str) -> None:
    cfg = load(AWS)
    edit(cfg)
    assert expected in check_cluster_config(write(tmp_path, cfg))


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg = load(AWS)
    cfg["max_wokers"] = cfg.pop("max_workers")
    cfg["available_node_types"]["ray.worker.cpu"]["min_workers"] = "0"
    problems = check_cluster_config(write(tmp_path, cfg))
    assert len(problems) == 2, problems
    assert problems[0].startswith("max_wokers: unknown key (did you mean 'max_workers'?)")
    assert problems[1] == "available_node_types[ray.worker.cpu].min_workers: '0' is not of type 'integer'"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c.pop("worker_start_ray_commands"), "worker_start_ray_commands: required"),
        (
            lambda c: c.update(
                head_node_type="head",
                available_node_types={
                    "head" if k == "ray.head.default" else k: v for k, v in c["available_node_types"].items()
                },
            ),
            "head_node_type: the fake provider registers the head as 'ray.head.default'",
        ),
        (
            lambda c: c["available_node_types"]["ray.worker.cpu"].update(resources={}),
            "available_node_types[ray.worker.cpu].resources: fake nodes have only the resources listed; give CPU",
        ),
        (
            lambda c: c["available_node_types"]["ray.worker.cpu"].update(min_workers=4),
            "The specified global `max_workers` is smaller than the sum of `min_workers`",
        ),
    ],
)
def test_broken_local_config_names_the_problem(tmp_path: Path, edit: Any, expected: str) -> None:
    cfg = load(LOCAL)
    edit(cfg)
    problems = check_cluster_config(write(tmp_path, cfg))
    assert any(expected in p for p in problems), problems


def test_unreadable_files(tmp_path: Path) -> None:
    assert check_cluster_config(tmp_path / "missing.yaml") == [
        f"cannot read {tmp_path / 'missing.yaml'}: No such file or directory"
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    assert check_cluster_config(bad)[0].startswith("not valid YAML:")
    bad.write_text("- a list\n")
    assert check_cluster_config(bad) == ["<root>: must be a mapping of keys, got list"]
    bad.write_text("max_workers: 2\n")
    assert check_cluster_config(bad) == [
        "<root>: 'cluster_name' is a required property",
        "<root>: 'provider' is a required property",
    ]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_cluster_check_ok_and_problems(tmp_path: Path) -> None:
    res = run("cluster", "check", "cluster.yaml")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "OK: cluster.yaml (provider aws, head ray.head.default, workers ray.worker.cpu 0-4)\n"
    res = run("cluster", "check", "cluster-local.yaml")
    assert res.returncode == 0 and res.stdout.startswith("OK: cluster-local.yaml (provider fake_multinode")

    cfg = load(AWS)
    cfg["available_node_types"]["ray.worker.cpu"]["max_wokers"] = cfg["available_node_types"]["ray.worker.cpu"].pop(
        "max_workers"
    )
    res = run("cluster", "check", str(write(tmp_path, cfg, "typo.yaml")))
    assert res.returncode == 2 and res.stdout == ""
    assert "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [
        f"{tmp_path / 'typo.yaml'}: 1 problem",
        "  available_node_types[ray.worker.cpu].max_wokers: unknown key (did you mean 'max_workers'?)",
    ]
    res = run("cluster", "check", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "No such file or directory" in res.stderr and "Traceback" not in res.stderr


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


def test_the_aws_launcher_loads_from_this_venv() -> None:
    # `ray up cluster.yaml` imports Ray's AWS node provider locally, which needs boto3
    # (the `aws` extra); without it the launcher dies before asking for credentials.
    import boto3  # noqa: F401
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.providers import _get_node_provider_cls

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    assert _get_node_provider_cls(config["provider"]) is AWSNodeProvider
