"""`balanceiq envoy snippet` merged into a bootstrap that already has its own listener and
cluster, driving a real Envoy: BalanceIQ's cluster is steered, the operator's own cluster
and listener are untouched."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from balanceiq.config import Settings
from balanceiq.testbed.envoy import render_attach
from balanceiq.testbed.ports import free_ports
from balanceiq.xds.server import XdsServer
from balanceiq_lab.testbed.envoy import EnvoyProcess, endpoint_weights

pytestmark = pytest.mark.slow

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def existing_bootstrap(admin: int, listen: int, legacy_port: int) -> dict:  # type: ignore[type-arg]
    """An operator's bootstrap: a listener routing /legacy to a static cluster of theirs."""
    return {
        "node": {"id": "edge-1", "cluster": "edge"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "edge",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/legacy"},
                                                            "route": {"cluster": "legacy"},
                                                        },
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "legacy",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "legacy",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": legacy_port}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def merge(bootstrap: dict, snippet: dict) -> dict:  # type: ignore[type-arg]
    """What the snippet's comments tell an operator to do."""
    sr = bootstrap["static_resources"]
    sr["clusters"] += snippet["clusters"]
    if snippet["dynamic_resources"]:
        bootstrap.setdefault("dynamic_resources", {}).update(snippet["dynamic_resources"])
    hcm = sr["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.setdefault("access_log", []).extend(snippet["access_log"])
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": "my_service"}})
    return bootstrap


@pytest.mark.parametrize("api", ["ads-sotw", "eds-delta"])
def test_the_snippet_merged_into_an_existing_bootstrap_is_steered(
    ports_settings: Settings, tmp_path: Path, api: str
) -> None:
    # The printed snippet is what the test merges (YAML with its comments), not a re-render.
    cfg = tmp_path / "balanceiq.yaml"
    cfg.write_text(yaml.safe_dump(ports_settings.model_dump(mode="json"), sort_keys=False))
    printed = subprocess.run(
        [str(Path(sys.executable).parent / "balanceiq"), "envoy", "snippet", "-c", str(cfg), "--api", api],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    snippet = {"clusters": [], "dynamic_resources": None, "access_log": []}
    parsed = yaml.safe_load(printed)
    assert parsed is not None
    expected = render_attach(ports_settings, api=api)
    assert parsed["clusters"] == expected["clusters"]
    snippet.update({k: v for k, v in parsed.items() if k in snippet})
    admin, listen, legacy = free_ports(3)
    bootstrap = merge(existing_bootstrap(admin, listen, legacy), snippet)
    xds = XdsServer(ports_settings, state_dir=tmp_path / "state")
    xds.start()
    try:
        with EnvoyProcess(bootstrap, workdir=tmp_path / "envoy") as envoy:
            addrs = list(xds.assignment("my_service").weights)
            weights = dict(zip(addrs, [5, 17, 300]))
            version = xds.set_assignment("my_service", weights)
            assert xds.wait_for_ack(version, timeout=10), xds.status()
            deadline = time.monotonic() + 10
            seen: dict[str, int] = {}
            while time.monotonic() < deadline and seen != weights:
                seen = endpoint_weights(envoy.clusters_json(), "my_service")
                time.sleep(0.1)
            assert seen == weights
            # The operator's own cluster and listener are still there, as configured.
            names = {c["name"] for c in envoy.clusters_json()["cluster_statuses"]}
            assert {"legacy", "my_service", "xds_cluster"} <= names
            listeners = httpx.get(f"http://127.0.0.1:{admin}/listeners?format=json", timeout=5, trust_env=False).json()
            assert [ls["name"] for ls in listeners["listener_statuses"]] == ["edge"]
    finally:
        xds.stop()
