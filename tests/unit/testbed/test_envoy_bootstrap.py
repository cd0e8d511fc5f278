"""Bootstraps: what we ship equals what we render, and a real Envoy accepts each flavour."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from balanceiq.config import default_settings, load_config
from balanceiq.exceptions import EnvoyError
from balanceiq.testbed.envoy import API_TYPES, render_bootstrap
from balanceiq_lab.testbed.envoy import validate_bootstrap

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("api", API_TYPES)
def test_shipped_bootstrap_matches_rendering(api: str) -> None:
    shipped = yaml.safe_load((ROOT / "envoy" / f"envoy-{api}.yaml").read_text())
    assert shipped == render_bootstrap(load_config(ROOT / "balanceiq.yaml"), api=api), (
        f"envoy/envoy-{api}.yaml is stale: regenerate with "
        f"`balanceiq envoy bootstrap --config balanceiq.yaml --api {api}`"
    )


@pytest.mark.slow  # runs the real Envoy binary (--mode validate)
@pytest.mark.parametrize("api", API_TYPES)
def test_real_envoy_accepts_each_flavour(api: str) -> None:
    validate_bootstrap(render_bootstrap(default_settings(), api=api))


def test_bootstrap_choices() -> None:
    b = render_bootstrap(default_settings(), api="ads-delta")
    ads = b["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "DELTA_GRPC"
    # Where Envoy reads the xDS stream's back-off (not GrpcService.retry_policy).
    assert ads["grpc_services"][0]["envoy_grpc"]["retry_policy"]["retry_back_off"]["max_interval"] == "1s"
    cluster = b["static_resources"]["clusters"][1]
    assert cluster["eds_cluster_config"]["eds_config"] == {"ads": {}, "resource_api_version": "V3"}
    assert cluster["common_lb_config"]["update_merge_window"] == "0s"
    assert cluster["track_cluster_stats"]["per_endpoint_stats"] is True
    assert b["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    eds = render_bootstrap(default_settings(), api="eds-sotw")
    assert "dynamic_resources" not in eds
    src = eds["static_resources"]["clusters"][1]["eds_cluster_config"]["eds_config"]["api_config_source"]
    assert src["api_type"] == "GRPC"


def test_unknown_api_is_a_clear_error() -> None:
    with pytest.raises(EnvoyError, match="unknown xDS api 'grpc'"):
        render_bootstrap(default_settings(), api="grpc")


@pytest.mark.slow  # runs the real Envoy binary (--mode validate)
def test_invalid_bootstrap_is_reported_with_envoys_reason() -> None:
    b = render_bootstrap(default_settings())
    b["static_resources"]["clusters"][1]["lb_policy"] = "NOT_A_POLICY"
    with pytest.raises(EnvoyError, match="NOT_A_POLICY"):
        validate_bootstrap(b)
