"""The CFR-RL policy as an RLlib RLModule, one network for any number of endpoints: a shared
per-endpoint MLP, mean-pooled into a context that each score reads beside the endpoint's own
embedding (the value head reads it alone). Action: K indices (:mod:`.distribution`)."""

from __future__ import annotations

from typing import Any, cast

import gymnasium as gym
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from balanceiq.policy.distribution import NEG, plackett_luce


class CriticalEndpointModule(TorchRLModule, ValueFunctionAPI):
    """Scores endpoints with shared per-endpoint layers plus pooled context."""

    def setup(self) -> None:
        # RLlib sets the spaces (Box [N_max, F], MultiDiscrete [K]) before setup().
        obs_space = cast(gym.spaces.Box, self.observation_space)
        act_space = cast(gym.spaces.MultiDiscrete, self.action_space)
        model_config = cast("dict[str, Any]", self.model_config)
        features = obs_space.shape[-1]
        hidden = int(model_config.get("hidden_dim", 64))
        self.k = int(act_space.nvec.shape[0])
        self._encoder = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden), torch.nn.Tanh()
        )
        self._scorer = torch.nn.Sequential(
            torch.nn.Linear(2 * hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )
        self._value = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        # RLlib builds the action distribution from logits alone, so K is baked into the class.
        self.action_dist_cls = plackett_luce(self.k)

    def _embed(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        present = obs[..., -1:]  # [B, N, 1]
        h = self._encoder(obs)  # [B, N, H]
        context = (h * present).sum(-2) / present.sum(-2).clamp(min=1.0)  # [B, H]
        return h, context, present.squeeze(-1)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        h, context, present = self._embed(batch[Columns.OBS])
        both = torch.cat([h, context.unsqueeze(-2).expand_as(h)], dim=-1)
        scores = self._scorer(both).squeeze(-1)
        return {Columns.ACTION_DIST_INPUTS: scores.masked_fill(present < 0.5, NEG)}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        _, context, _ = self._embed(batch[Columns.OBS])
        return cast(torch.Tensor, self._value(context).squeeze(-1))
