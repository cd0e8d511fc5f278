"""Plackett-Luce over endpoint scores: K critical endpoints, ordered, without replacement.
Sampling (Gumbel-top-k) and ``logp`` are exact; entropy and KL have no closed form for K > 1,
so they are those of the K softmax choices along the greedy order (differentiable, for PPO)."""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import torch
from ray.rllib.core.distribution.distribution import Distribution

NEG = -1e9  # padding endpoints' score: drawn only when fewer than K are real


# RLlib's Distribution is typed for every framework; this one is torch-only, hence the override ignores.
class PlackettLuce(Distribution):
    """K ordered picks without replacement from ``logits`` (shape ``[..., N]``)."""

    k: int = 1

    def __init__(self, logits: torch.Tensor, k: int | None = None) -> None:
        super().__init__()
        self.logits = logits
        self.k = int(k or self.k)

    def sample(self, *, sample_shape: Any = None) -> torch.Tensor:  # type: ignore[override]  # torch-only
        u = torch.rand_like(self.logits).clamp_(1e-12, 1.0 - 1e-7)
        return torch.topk(self.logits - torch.log(-torch.log(u)), self.k, dim=-1).indices

    def rsample(self, *, sample_shape: Any = None) -> torch.Tensor:  # type: ignore[override]  # torch-only
        raise NotImplementedError("Plackett-Luce samples are discrete; use sample()")

    def _picked(self, order: torch.Tensor) -> list[torch.Tensor]:
        """The endpoints already picked before each of the K picks of ``order``."""
        picked = [torch.zeros_like(self.logits, dtype=torch.bool)]
        for j in range(self.k - 1):
            picked.append(picked[-1].scatter(-1, order[..., j : j + 1], True))
        return picked

    def logp(self, value: torch.Tensor) -> torch.Tensor:  # type: ignore[override]  # torch-only
        value = value.long()
        total = self.logits.new_zeros(self.logits.shape[:-1])
        for j, picked in enumerate(self._picked(value)):
            masked = self.logits.masked_fill(picked, NEG)
            total = total + masked.gather(-1, value[..., j : j + 1]).squeeze(-1) - torch.logsumexp(masked, dim=-1)
        return total

    def entropy(self) -> torch.Tensor:  # type: ignore[override]  # torch-only
        total = self.logits.new_zeros(self.logits.shape[:-1])
        for picked in self._picked(torch.topk(self.logits, self.k, dim=-1).indices):
            logp = torch.log_softmax(self.logits.masked_fill(picked, NEG), dim=-1)
            total = total - (logp.exp() * logp).sum(-1)
        return total

    def kl(self, other: Distribution) -> torch.Tensor:  # type: ignore[override]  # torch-only
        assert isinstance(other, PlackettLuce)
        total = self.logits.new_zeros(self.logits.shape[:-1])
        for picked in self._picked(torch.topk(self.logits, self.k, dim=-1).indices):
            p = torch.log_softmax(self.logits.masked_fill(picked, NEG), dim=-1)
            q = torch.log_softmax(other.logits.masked_fill(picked, NEG), dim=-1)
            total = total + (p.exp() * (p - q)).sum(-1)
        return total

    @classmethod
    def from_logits(cls, logits: torch.Tensor, **kwargs: Any) -> PlackettLuce:  # type: ignore[override]  # torch-only
        return cls(logits, k=kwargs.get("k"))

    @staticmethod
    def required_input_dim(space: gym.Space[Any], **kwargs: Any) -> int:
        assert isinstance(space, gym.spaces.MultiDiscrete)
        return int(space.nvec[0])

    def to_deterministic(self) -> _TopK:
        return _TopK(self.logits, self.k)


class _TopK(PlackettLuce):
    """The most likely ordered choice: the K highest scores (for inference)."""

    def sample(self, *, sample_shape: Any = None) -> torch.Tensor:  # type: ignore[override]  # torch-only
        return torch.topk(self.logits, self.k, dim=-1).indices


@functools.cache
def plackett_luce(k: int) -> type[PlackettLuce]:
    """The distribution class for K picks (RLlib builds distributions from logits only)."""
    return type(f"PlackettLuceK{k}", (PlackettLuce,), {"k": k, "__module__": __name__})
