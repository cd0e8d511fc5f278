"""The critical set: SLO breachers first, then the policy's own K."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from balanceiq.policy.decide import with_forced


def test_breachers_come_first_and_the_policy_still_adds_k() -> None:
    assert with_forced([5, 1, 2, 0], [2, 7], 2) == [2, 7, 5, 1]
    assert with_forced([5, 1, 2, 0], [], 2) == [5, 1]
    # Every pick already forced: nothing left to add, no repeats.
    assert with_forced([2, 7], [7, 2, 7], 3) == [7, 2]


@given(
    ranked=st.lists(st.integers(0, 30), max_size=20),
    forced=st.lists(st.integers(0, 30), max_size=10),
    k=st.integers(0, 8),
)
def test_critical_set_properties(ranked: list[int], forced: list[int], k: int) -> None:
    out = with_forced(ranked, forced, k)
    unique_forced = list(dict.fromkeys(forced))
    extras = [i for i in dict.fromkeys(ranked) if i not in unique_forced]
    assert len(out) == len(set(out))
    assert out[: len(unique_forced)] == unique_forced
    # The policy's picks keep their order and number: K of them (or all there are).
    assert out[len(unique_forced) :] == extras[:k]
