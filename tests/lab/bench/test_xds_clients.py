"""The xDS benchmarks' ACK hook on the product's StatusRegistry."""

from __future__ import annotations

import time

from balanceiq_lab.bench.xds_clients import AckListeningRegistry


def test_ack_listener_sees_each_ack_after_it_is_recorded() -> None:
    seen: list[tuple[str, str, float, int]] = []
    reg = AckListeningRegistry(lambda n, v, t: seen.append((n, v, t, reg.to_json()["nodes"][0]["acks"])))
    t0 = time.monotonic()
    reg.ack("x", "1.1")
    reg.ack("x", "1.2")
    assert [(n, v, acks) for n, v, _t, acks in seen] == [("x", "1.1", 1), ("x", "1.2", 2)]
    assert all(t0 <= t <= time.monotonic() for *_, t, _ in seen)
    assert reg.wait_for(lambda nodes: nodes["x"].last_acked_version == "1.2", timeout=1)
