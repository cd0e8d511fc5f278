"""What a server's status says it serves, as the controller and LiveEnv read it."""

from __future__ import annotations

from balanceiq.xds.client import served


def test_served_reads_weights_and_drains_of_one_cluster() -> None:
    status = {
        "clusters": {
            "a": {
                "endpoints": [
                    {"address": "10.0.0.1:80", "weight": 3, "health": "HEALTHY"},
                    {"address": "10.0.0.2:80", "weight": 1, "health": "DRAINING"},
                    {"address": "10.0.0.3:80", "weight": 2, "health": "UNHEALTHY"},
                ]
            }
        }
    }
    weights, health = served(status, "a")
    assert weights == {"10.0.0.1:80": 3, "10.0.0.2:80": 1, "10.0.0.3:80": 2}
    assert health == {"10.0.0.1:80": "HEALTHY", "10.0.0.2:80": "DRAINING", "10.0.0.3:80": "HEALTHY"}
    assert served(status, "b") == ({}, {}) and served({}, "a") == ({}, {})
