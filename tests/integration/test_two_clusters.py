"""Every cluster in the config is steered (issue #15): two clusters on one real Envoy,
each with its own loop, lease, decisions and API views, both ACKed from one xDS server."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from livestack import TOKEN, live_stack, two_cluster_settings

from balanceiq_lab.testbed.envoy import endpoint_health, endpoint_weights

pytestmark = pytest.mark.slow


def _upstream_total(admin_url: str, cluster: str) -> int:
    r = httpx.get(
        f"{admin_url}/stats?filter=^cluster\\.{cluster}\\.upstream_rq_total$&format=json", timeout=2, trust_env=False
    )
    return int(
        next(
            (s["value"] for s in r.json().get("stats", []) if s.get("name") == f"cluster.{cluster}.upstream_rq_total"),
            0,
        )
    )


@pytest.mark.timeout(180)
def test_two_clusters_on_one_envoy_are_both_steered_and_acked(tmp_path: Path) -> None:
    settings = two_cluster_settings()
    with live_stack(settings, tmp_path, rate_rps=40, run_loop=True) as st:
        plane = st.plane
        assert list(plane.controllers) == ["my_service", "checkout"]
        # Both loops push and Envoy ACKs both, and traffic reaches both clusters through
        # the one listener.
        deadline = time.monotonic() + 60
        acked: dict[str, bool] = {}
        while time.monotonic() < deadline:
            acked = {n: any(d.pushed and d.acked for d in c.log.recent(50)) for n, c in plane.controllers.items()}
            if all(acked.values()):
                break
            time.sleep(0.2)
        assert all(acked.values()), {n: [d.to_json() for d in c.log.recent(3)] for n, c in plane.controllers.items()}
        envoy = st.testbed.envoy
        for name, c in plane.controllers.items():
            assert _upstream_total(envoy.admin_url, name) > 0, name
            assert set(endpoint_weights(envoy.clusters_json(), name)) == set(c.addresses)
        # Each loop holds its own cluster's lease, under its own owner.
        leases = plane.controller.xds.status()["leases"]
        holders = {n: leases[n]["holder"] for n in plane.controllers}
        assert holders == {n: c.owner for n, c in plane.controllers.items()} and len(set(holders.values())) == 2

        with st.client() as http:
            listed = http.get("/api/clusters").json()
            assert [c["cluster"] for c in listed["clusters"]] == ["my_service", "checkout"]
            assert listed["default"] == "my_service"
            w = http.get("/api/weights", params={"cluster": "checkout"}).json()
            assert w["cluster"] == "checkout"
            assert [e["address"] for e in w["endpoints"]] == plane.controllers["checkout"].addresses
            assert http.get("/api/weights").json()["cluster"] == "my_service"
            d = http.get("/api/decisions", params={"cluster": "checkout", "limit": 5}).json()
            assert d["cluster"] == "checkout" and d["decisions"]
            assert http.get("/api/timeline", params={"cluster": "checkout"}).json()["cluster"] == "checkout"
            missing = http.get("/api/weights", params={"cluster": "nope"})
            assert missing.status_code == 404 and "checkout" in missing.json()["detail"]
            status = http.get("/api/status", params={"cluster": "checkout"}).json()
            assert status["cluster"] == "checkout" and len(status["clusters"]) == 2

            # A drain of a checkout endpoint, its cluster found from the address: reaches
            # Envoy's checkout cluster; the other cluster is untouched.
            victim = plane.controllers["checkout"].addresses[0]
            before = endpoint_weights(envoy.clusters_json(), "my_service")
            t0 = time.monotonic()
            r = http.put(
                "/api/weights",
                json={"address": victim, "action": "drain", "reason": "test"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["override"]["cluster"] == "checkout"
            reasons: list[str] = []
            while time.monotonic() - t0 < 5:
                reasons = endpoint_health(envoy.clusters_json(), "checkout")[victim]
                if "eds_draining" in reasons:
                    break
                time.sleep(0.05)
            assert "eds_draining" in reasons, reasons
            assert victim not in endpoint_health(envoy.clusters_json(), "my_service")
            assert set(endpoint_weights(envoy.clusters_json(), "my_service")) == set(before)

            # A policy change for one cluster leaves the other's as it was.
            r = http.put(
                "/api/policy",
                params={"cluster": "checkout"},
                json={"cost_weight": 0.9},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert r.status_code == 200 and r.json()["cost_weight"] == 0.9
            assert http.get("/api/policy").json()["cost_weight"] != 0.9

            metrics = http.get("/metrics").text
            for name in plane.controllers:
                assert f'balanceiq_decisions_total{{cluster="{name}"' in metrics, name
