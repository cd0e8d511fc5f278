"""Reading Envoy's admin /clusters JSON (weights, and why an endpoint is not routable)."""

from __future__ import annotations

from balanceiq_lab.testbed.envoy import endpoint_health, endpoint_weights


def test_admin_json_parsing() -> None:
    doc = {
        "cluster_statuses": [
            {
                "name": "my_service",
                "host_statuses": [
                    {
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                        "weight": 7,
                        "health_status": {"eds_health_status": "DRAINING"},
                    },
                    {
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 2}},
                        "health_status": {"eds_health_status": "HEALTHY", "failed_outlier_check": True},
                    },
                    {
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 3}},
                        "weight": 2,
                        "health_status": {"eds_health_status": "HEALTHY"},
                    },
                ],
            },
            {"name": "other", "host_statuses": []},
        ]
    }
    assert endpoint_weights(doc, "my_service") == {"127.0.0.1:1": 7, "127.0.0.1:2": 1, "127.0.0.1:3": 2}
    assert endpoint_health(doc, "my_service") == {
        "127.0.0.1:1": ["eds_draining"],
        "127.0.0.1:2": ["failed_outlier_check"],
        "127.0.0.1:3": [],
    }
