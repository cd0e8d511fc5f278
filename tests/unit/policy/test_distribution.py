"""Plackett-Luce: exact log-probabilities, and samples that follow them."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balanceiq.policy.distribution import NEG, PlackettLuce, plackett_luce


def brute_logp(logits: list[float], order: tuple[int, ...]) -> float:
    remaining = list(range(len(logits)))
    total = 0.0
    for a in order:
        z = math.log(sum(math.exp(logits[j]) for j in remaining))
        total += logits[a] - z
        remaining.remove(a)
    return total


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=6), st.integers(1, 3))
@settings(max_examples=50, deadline=None)
def test_logp_is_exact_and_sums_to_one(logits: list[float], k: int) -> None:
    k = min(k, len(logits))
    dist = PlackettLuce(torch.tensor([logits], dtype=torch.float64), k=k)
    orders = list(itertools.permutations(range(len(logits)), k))
    values = torch.tensor(orders)
    lp = torch.stack([dist.logp(v.unsqueeze(0))[0] for v in values])
    for order, got in zip(orders, lp.tolist()):
        assert abs(got - brute_logp(logits, order)) < 1e-9
    assert abs(float(lp.exp().sum()) - 1.0) < 1e-9


def test_gumbel_top_k_samples_follow_plackett_luce() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64).expand(40000, 4)
    dist = PlackettLuce(logits, k=2)
    samples = dist.sample()
    assert (samples[:, 0] != samples[:, 1]).all()  # without replacement
    counts: dict[tuple[int, int], int] = {}
    for a, b in samples.tolist():
        counts[(a, b)] = counts.get((a, b), 0) + 1
    for pair, n in counts.items():
        expected = math.exp(brute_logp([2.0, 1.0, 0.0, -1.0], pair))
        assert abs(n / 40000 - expected) < 0.01, (pair, n / 40000, expected)


def test_padding_is_never_drawn_and_deterministic_is_top_k() -> None:
    logits = torch.tensor([[0.1, NEG, 3.0, 1.0, NEG]])
    cls = plackett_luce(3)
    dist = cls.from_logits(logits)
    for _ in range(200):
        s = dist.sample()[0].tolist()
        assert set(s) == {0, 2, 3}
    assert dist.to_deterministic().sample()[0].tolist() == [2, 3, 0]


def test_entropy_and_kl_are_finite_and_kl_of_self_is_zero() -> None:
    logits = torch.randn(8, 10, dtype=torch.float64, requires_grad=True)
    dist = PlackettLuce(logits, k=3)
    ent = dist.entropy()
    assert torch.isfinite(ent).all() and (ent > 0).all()
    assert torch.allclose(dist.kl(PlackettLuce(logits.detach(), k=3)), torch.zeros(8, dtype=torch.float64), atol=1e-12)
    ent.sum().backward()  # differentiable, as PPO's entropy bonus needs
    assert logits.grad is not None
