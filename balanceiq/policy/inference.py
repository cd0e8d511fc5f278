"""The trained network's forward pass in numpy: torch hands the GIL back at every op, so a
busy thread of the same process (the Controller's API server) stalls it; numpy keeps the GIL
for the whole pass. Exported only when it reproduces the module's scores on a probe."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from balanceiq.policy.distribution import NEG

log = logging.getLogger(__name__)

Layer = Callable[[np.ndarray], np.ndarray]


def _affine(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(x @ w + b)


def _layers(seq: Any) -> list[Layer] | None:
    """A ``Sequential`` of ``Linear`` and ``Tanh`` as numpy steps; None for anything else."""
    import torch

    steps: list[Layer] = []
    for layer in seq:
        if isinstance(layer, torch.nn.Linear):
            w = layer.weight.detach().cpu().numpy().astype(np.float32).T.copy()
            b = np.zeros(w.shape[1], np.float32) if layer.bias is None else layer.bias.detach().cpu().numpy()
            steps.append(functools.partial(_affine, w, b.astype(np.float32)))
        elif isinstance(layer, torch.nn.Tanh):
            steps.append(np.tanh)
        else:
            return None
    return steps


def _run(steps: list[Layer], x: np.ndarray) -> np.ndarray:
    for step in steps:
        x = step(x)
    return x


@dataclass(frozen=True)
class NumpyScorer:
    """Scores ``[B, N, F]`` rows as the module does: shared encoder, mean-pooled context over
    present endpoints (last feature), scorer head, absent endpoints at ``NEG``."""

    encoder: list[Layer]
    scorer: list[Layer]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        present = obs[..., -1:]
        h = _run(self.encoder, obs)
        context = (h * present).sum(-2) / np.maximum(present.sum(-2), np.float32(1.0))
        both = np.concatenate([h, np.broadcast_to(context[..., None, :], h.shape)], axis=-1)
        scores = _run(self.scorer, both)[..., 0]
        return np.where(present[..., 0] < 0.5, np.float32(NEG), scores).astype(np.float32)


def export(module: Any, features: int, *, atol: float = 1e-4) -> NumpyScorer | None:
    """``module``'s forward pass in numpy, or None when its layers are not the expected ones
    or the result differs from torch's on a probe batch (some endpoints absent)."""
    import torch
    from ray.rllib.core.columns import Columns

    encoder, scorer = _layers(getattr(module, "_encoder", ())), _layers(getattr(module, "_scorer", ()))
    if not encoder or not scorer:
        log.info("policy scores through torch: %s is not an encoder/scorer MLP", type(module).__name__)
        return None
    fast = NumpyScorer(encoder, scorer)
    probe = np.random.default_rng(0).uniform(-1.0, 2.0, size=(2, 7, features)).astype(np.float32)
    probe[..., -1] = 1.0
    probe[1, 4:, -1] = 0.0
    with torch.no_grad():
        want = module._forward({Columns.OBS: torch.from_numpy(probe)})[Columns.ACTION_DIST_INPUTS].numpy()
    got = fast(probe)
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=1e-4):
        log.warning("policy scores through torch: the numpy forward pass disagrees with the module's")
        return None
    return fast
