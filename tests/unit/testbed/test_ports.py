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


def _settings_with_api_on(port: int):  # type: ignore[no-untyped-def]
    from balanceiq_lab.bench.settings import settings_on_free_ports

    s = settings_on_free_ports()
    return s.model_copy(update={"api": s.api.model_copy(update={"host": "127.0.0.1", "port": port})})


def test_check_ports_free_names_a_listener_but_not_the_last_runs_time_wait() -> None:
    import pytest

    from balanceiq.exceptions import TestbedError
    from balanceiq.testbed.ports import check_ports_free

    port = free_ports(1)[0]
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    settings = _settings_with_api_on(port)
    with pytest.raises(TestbedError, match=f"API 127.0.0.1:{port}"):
        check_ports_free(settings, api=True)
    # The server end closes first, so its side of the connection sits in TIME_WAIT, as
    # after a demo stops: the port is free for the next one.
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()
    server.close()
    client.close()
    check_ports_free(settings, api=True)
