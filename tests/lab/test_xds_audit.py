"""The fault suite's audited xDS actor, called in-process (no Ray): every lease-checked push
and every change of lease holder, in publishing order."""

from __future__ import annotations

from pathlib import Path

import pytest

from balanceiq.config import Settings
from balanceiq.exceptions import XdsLeaseError
from balanceiq_lab.xds_audit import AuditedXdsServerActor


def test_audit_records_pushes_and_holders(ports_settings: Settings, tmp_path: Path) -> None:
    actor = AuditedXdsServerActor(ports_settings, str(tmp_path / "state"))
    try:
        cluster = ports_settings.clusters[0].name
        addrs = [ep.address for ep in ports_settings.clusters[0].endpoints]
        assert actor.acquire_lease("a", 60, cluster)["granted"]
        assert actor.acquire_lease("a", 60, cluster)["granted"]  # a renewal: no new holder
        v1 = actor.set_assignment(cluster, dict.fromkeys(addrs, 5), {}, "a")
        v2 = actor.set_assignment(cluster, dict.fromkeys(addrs, 5), {}, "a")  # same weights
        with pytest.raises(XdsLeaseError):
            actor.set_assignment(cluster, dict.fromkeys(addrs, 7), {}, "b")
        actor.set_assignment(cluster, dict.fromkeys(addrs, 9), {})  # an operator's: not audited
        audit = actor.audit()
        assert [(h["holder"], h["term"], h["cluster"]) for h in audit["holders"]] == [("a", 1, cluster)]
        pushes = [(p["owner"], p["version"], p["accepted"], p.get("changed"), p.get("reason")) for p in audit["pushes"]]
        assert pushes == [
            ("a", v1, True, True, None),
            ("a", v2, True, v2 != v1, None),
            ("b", None, False, None, "XdsLeaseError"),
        ]
        assert all(p["term"] == 1 and p["cluster"] == cluster for p in audit["pushes"])
    finally:
        actor._server.stop()
