"""The sample backends' behaviour from the config's ``testbed:`` section."""

from __future__ import annotations

from balanceiq.config import EndpointConfig
from balanceiq.config import TestbedConfig as TestbedCfg  # alias: not a pytest test class
from balanceiq_lab.testbed.profiles import profile_for


def test_profile_for_prefers_override_then_cloud_region_then_cloud_then_default() -> None:
    testbed = TestbedCfg(
        base_latency_ms={"gcp": 25.0, "gcp/europe-west1": 90.0},
        default_latency_ms=7.0,
        concurrency=8,
        overrides={"10.0.0.4:80": {"concurrency": 2, "error_rate": 0.5}},
    )
    gcp_us = EndpointConfig(address="10.0.0.1:80", cloud="gcp", region="us-central1")
    gcp_eu = EndpointConfig(address="10.0.0.2:80", cloud="gcp", region="europe-west1")
    other = EndpointConfig(address="10.0.0.3:80", cloud="oci", region="x")
    overridden = EndpointConfig(address="10.0.0.4:80", cloud="gcp", region="europe-west1")
    assert profile_for(testbed, gcp_us) == (25.0, 8, 0.0)
    assert profile_for(testbed, gcp_eu) == (90.0, 8, 0.0)
    assert profile_for(testbed, other) == (7.0, 8, 0.0)
    assert profile_for(testbed, overridden) == (90.0, 2, 0.5)
