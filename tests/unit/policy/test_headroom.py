"""The M/M/c reading of how busy a queueing endpoint is."""

from __future__ import annotations

import math

import pytest

from balanceiq.policy.headroom import erlang_wait, queue_utilisation


@pytest.mark.parametrize(("servers", "rho"), [(1, 0.4), (1, 0.6), (2, 0.6), (4, 0.7), (8, 0.85), (16, 0.9)])
def test_queueing_delay_and_load_give_back_the_utilisation(servers: int, rho: float) -> None:
    """The server count is not reported anywhere: inferred from how much it queues."""
    busy = servers * rho
    assert queue_utilisation(busy, erlang_wait(servers, busy)) == pytest.approx(rho)


def test_queue_utilisation_is_bounded_on_nonsense() -> None:
    assert queue_utilisation(0.5, 50.0) == pytest.approx(50 / 51)
    for busy, wait in ((math.nan, 1.0), (1.0, math.nan), (-1.0, 1.0), (1.0, 0.0), (300.0, 1e-9)):
        assert 0.3 <= queue_utilisation(busy, wait) <= 1.0
