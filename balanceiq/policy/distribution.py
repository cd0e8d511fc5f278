"""Plackett-Luce over endpoint scores: K critical endpoints, ordered, without replacement.

Sampling uses the Gumbel-top-k trick (perturb each score with Gumbel noise, take the K
largest), which draws exactly from the Plackett-Luce distribution. The log-probability
of an ordered choice (a_1, ..., a_K) is exact:

    log p = sum_k [ s_{a_k} - logsumexp(s_j for j not in {a_1..a_{k-1}}) ]

Padding scores ``-1e9`` (set by the module), so it is drawn only when fewer than K real
endpoints exist (the environment ignores those picks). Entropy and KL have no cheap closed
form for K > 1: the sequential ones of the K softmax choices along the greedy order are
deterministic and differentiable, which is what PPO needs.
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import torch
from ray.rllib.core.distribution.distribution import Distribution

NEG = -1e9


def _masked(logits: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(picked, NEG)


# RLlib's Distribution is typed for every framework (numpy/jax/tf/torch tensors, extra
# **kwargs, sample(return_logp=...)); this one is torch-only, hence the override ignores.
class PlackettLuce(Distribution):
    """K ordered picks without replacement from ``logits`` (shape ``[..., N]``)."""

    k: int = 1

    def __init__(self, logits: torch.Tensor, k: int | None = None) -> None:
        super().__init__()
        self.logits = logits
        self.k = int(k or self.k)

    def sample(self, *, sample_shape: Any = None) -> torch.Tensor:  # type: ignore[override]  # torch-only
        u = torch.rand_like(self.logits).clamp_(1e-12, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        return torch.topk(self.logits + gumbel, self.k, dim=-1).indices

    def rsample(self, *, sample_shape: Any = None) -> torch.Tensor:  # type: ignore[override]  # torch-only
        raise NotImplementedError("Plackett-Luce samples are discrete; use sample()")

    def logp(self, value: torch.Tensor) -> torch.Tensor:  # type: ignore[override]  # torch-only
        value = value.long()
        picked = torch.zeros_like(self.logits, dtype=torch.bool)
        total = torch.zeros(self.logits.shape[:-1], dtype=self.logits.dtype, device=self.logits.device)
        for j in range(self.k):
            idx = value[..., j : j + 1]
            masked = _masked(self.logits, picked)
            total = total + masked.gather(-1, idx).squeeze(-1) - torch.logsumexp(masked, dim=-1)
            picked = picked.scatter(-1, idx, True)
        return total

    def _greedy_steps(self) -> list[torch.Tensor]:
        """Masked logits at each of the K steps along the greedy (top-k) order."""
        order = torch.topk(self.logits, self.k, dim=-1).indices
        picked = torch.zeros_like(self.logits, dtype=torch.bool)
        steps = []
        for j in range(self.k):
            steps.append(_masked(self.logits, picked))
            picked = picked.scatter(-1, order[..., j : j + 1], True)
        return steps

    def entropy(self) -> torch.Tensor:  # type: ignore[override]  # torch-only
        total = torch.zeros(self.logits.shape[:-1], dtype=self.logits.dtype, device=self.logits.device)
        for masked in self._greedy_steps():
            logp = torch.log_softmax(masked, dim=-1)
            total = total - (logp.exp() * logp).sum(-1)
        return total

    def kl(self, other: Distribution) -> torch.Tensor:  # type: ignore[override]  # torch-only
        assert isinstance(other, PlackettLuce)
        total = torch.zeros(self.logits.shape[:-1], dtype=self.logits.dtype, device=self.logits.device)
        order = torch.topk(self.logits, self.k, dim=-1).indices
        picked = torch.zeros_like(self.logits, dtype=torch.bool)
        for j in range(self.k):
            p = torch.log_softmax(_masked(self.logits, picked), dim=-1)
            q = torch.log_softmax(_masked(other.logits, picked), dim=-1)
            total = total + (p.exp() * (p - q)).sum(-1)
            picked = picked.scatter(-1, order[..., j : j + 1], True)
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

    def to_deterministic(self) -> _TopK:
        return self


@functools.cache
def plackett_luce(k: int) -> type[PlackettLuce]:
    """The distribution class for K picks (RLlib builds distributions from logits only)."""
    return type(f"PlackettLuceK{k}", (PlackettLuce,), {"k": k, "__module__": __name__})
