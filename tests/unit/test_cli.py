"""The CLI's contract: clear messages and exit 2 on bad input, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).parent / "balanceiq")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_config_check_ok() -> None:
    res = run("config", "check", "balanceiq.yaml")
    assert res.returncode == 0
    assert res.stdout.startswith("OK: balanceiq.yaml (1 cluster, 6 endpoints)")


def test_config_check_reports_every_problem_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "clusters:\n"
        "  - name: my_service\n"
        "    endpoints:\n"
        "      - {address: 127.0.0.1:1, cloud: aws, region: r, weight: 0}\n"
        "      - {address: 127.0.0.1:1, cloud: aws, region: r}\n"
        "      - {address: backend.local:80, cloud: aws, region: r, wieght: 3}\n"
    )
    res = run("config", "check", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "clusters[0].endpoints[0].weight" in res.stderr
    assert "clusters[0].endpoints[2].address" in res.stderr
    assert "clusters[0].endpoints[2].wieght: unknown key" in res.stderr


def test_config_check_missing_file() -> None:
    res = run("config", "check", "/nonexistent/balanceiq.yaml")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "nonexistent" in res.stderr


def test_envoy_bootstrap_prints_yaml() -> None:
    res = run("envoy", "bootstrap", "--api", "eds-delta")
    assert res.returncode == 0
    doc = yaml.safe_load(res.stdout)
    assert doc["static_resources"]["clusters"][1]["name"] == "my_service"


def test_bad_options_exit_2_with_a_message() -> None:
    res = run("envoy", "bootstrap", "--api", "grpc")
    assert res.returncode == 2 and "unknown xDS api 'grpc'" in res.stderr and "Traceback" not in res.stderr
    res = run("xds", "set", "127.0.0.1:18001")
    assert res.returncode == 2 and "ADDRESS=WEIGHT" in res.stderr and "Traceback" not in res.stderr
    res = run("xds", "set", "127.0.0.1:18001=heavy")
    assert res.returncode == 2 and "not an integer" in res.stderr
    res = run("bench", "xds", "--api", "rest", "--json")
    assert res.returncode == 2 and "--api must be" in res.stderr and res.stdout == ""


def test_bad_config_for_any_command_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("xds: {port: 70000}\n")
    res = run("envoy", "bootstrap", "--config", str(bad))
    assert res.returncode == 2 and "xds.port" in res.stderr and "Traceback" not in res.stderr


def test_version_prints_the_package_version() -> None:
    from balanceiq import __version__

    res = run("--version")
    assert res.returncode == 0 and res.stdout == f"balanceiq {__version__}\n", res
