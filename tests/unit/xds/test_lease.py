"""The controller lease: one holder, expiry, and per-cluster leases under the server-wide one."""

from __future__ import annotations

import pytest

from balanceiq.exceptions import XdsLeaseError
from balanceiq.xds.lease import LeaseTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_holder_until_it_expires_and_the_term_counts_holders() -> None:
    clock = Clock()
    lease = LeaseTable(clock)
    assert lease.acquire("a", 5)["granted"] and lease.state()["term"] == 1
    assert lease.acquire("a", 5)["term"] == 1  # a renewal is the same term
    refused = lease.acquire("b", 5)
    assert not refused["granted"] and refused["holder"] == "a"
    with pytest.raises(XdsLeaseError, match="held by a"):
        lease.check("b", "svc")
    clock.now += 5.1
    assert lease.acquire("b", 5)["granted"]
    assert lease.state()["term"] == 2
    with pytest.raises(XdsLeaseError):
        lease.check("a", "svc")


@pytest.mark.parametrize("owner, ttl", [("", 5), ("a", 0), ("a", float("nan")), ("a", 3601)])
def test_bad_owner_or_ttl_is_refused(owner: str, ttl: float) -> None:
    with pytest.raises(XdsLeaseError):
        LeaseTable().acquire(owner, ttl)


def test_each_cluster_has_its_own_lease() -> None:
    t = LeaseTable(Clock())
    assert t.acquire("loop-a", 5, "a")["granted"]
    assert t.acquire("loop-b", 5, "b")["granted"]
    assert not t.acquire("loop-b", 5, "a")["granted"]
    t.check("loop-a", "a")
    t.check("loop-b", "b")
    with pytest.raises(XdsLeaseError, match="loop-a"):
        t.check("loop-b", "a")
    assert set(t.states()) == {"a", "b"} and t.states()["a"]["holder"] == "loop-a"


def test_the_server_wide_lease_and_a_cluster_lease_exclude_each_other() -> None:
    t = LeaseTable(Clock())
    assert t.acquire("trainer", 5)["granted"]
    refused = t.acquire("loop-a", 5, "a")
    assert not refused["granted"] and refused["holder"] == "trainer" and refused["cluster"] == "a"
    # The server-wide holder may push to any cluster nobody holds on its own.
    t.check("trainer", "a")
    assert t.release("trainer")
    assert t.acquire("loop-a", 5, "a")["granted"]
    assert not t.acquire("trainer", 5)["granted"]
    with pytest.raises(XdsLeaseError):
        t.check("trainer", "a")


def test_a_push_needs_the_cluster_lease_once_one_is_held_and_falls_back_when_it_expires() -> None:
    clock = Clock()
    t = LeaseTable(clock)
    assert t.acquire("loop", 5, "a")["granted"]
    assert t.term("a") == 1
    clock.now += 6  # the loop died
    with pytest.raises(XdsLeaseError, match="nobody"):
        t.check("loop", "a")
    assert t.acquire("trainer", 5)["granted"]
    t.check("trainer", "a")
    assert t.term("a") == 1  # the server-wide lease's first term


def test_a_bad_cluster_name_is_refused() -> None:
    with pytest.raises(XdsLeaseError, match="cluster"):
        LeaseTable().acquire("a", 5, "")
