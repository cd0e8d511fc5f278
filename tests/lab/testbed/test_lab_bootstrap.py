"""The lab's bootstrap overrides: other ports than the settings', and CSWRR by extension."""

from __future__ import annotations

from balanceiq.config import default_settings
from balanceiq.testbed.envoy import render_bootstrap
from balanceiq_lab.testbed.envoy import CSWRR, lab_bootstrap


def test_without_overrides_it_is_the_product_bootstrap() -> None:
    s = default_settings()
    assert lab_bootstrap(s) == render_bootstrap(s)
    assert lab_bootstrap(s, api="eds-delta", node_id="n", health_check_interval_s=60) == render_bootstrap(
        s, api="eds-delta", node_id="n", health_check_interval_s=60
    )


def test_ports_override_the_settings() -> None:
    b = lab_bootstrap(default_settings(), admin_port=19901, listen_port=19000, xds_port=19002)
    assert b["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    assert b["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 19000
    xds = b["static_resources"]["clusters"][0]
    assert xds["name"] == "xds_cluster"
    assert xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19002,
    }


def test_cswrr_replaces_lb_policy_in_place() -> None:
    s = default_settings()
    plain = render_bootstrap(s)["static_resources"]["clusters"]
    cswrr = lab_bootstrap(s, lb_policy=CSWRR)["static_resources"]["clusters"]
    for before, after in zip(plain, cswrr):
        if before["type"] != "EDS":
            assert after == before
            continue
        assert "lb_policy" not in after
        keys = list(before)
        assert list(after) == [("load_balancing_policy" if k == "lb_policy" else k) for k in keys]
        ext = after["load_balancing_policy"]["policies"][0]["typed_extension_config"]
        assert ext["name"] == "envoy.load_balancing_policies.client_side_weighted_round_robin"
    assert lab_bootstrap(s, lb_policy="ROUND_ROBIN")["static_resources"]["clusters"][1]["lb_policy"] == "ROUND_ROBIN"
