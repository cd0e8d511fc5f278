"""Free ports come from below the ephemeral range, distinct, and really free."""

from __future__ import annotations

import socket

from balanceiq.testbed.ports import _ephemeral_range, free_ports


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low, _ = _ephemeral_range()
    ports = free_ports(40)
    assert len(set(ports)) == 40
    # Outgoing connections take their local ports from the ephemeral range; ours must
    # not be there, or a connection can take one before a backend binds it.
    assert all(p < low for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_port_in_use_is_never_handed_out() -> None:
    held = []
    try:
        for p in free_ports(5):
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            s.listen()
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
        for _ in range(20):
            assert not taken & set(free_ports(30))
    finally:
        for s in held:
            s.close()
