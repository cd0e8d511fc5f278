"""The numpy forward pass scores exactly as the RLModule does, or is not used."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from balanceiq.policy.checkpoint import SHIPPED, load_module
from balanceiq.policy.distribution import NEG
from balanceiq.policy.features import N_FEATURES
from balanceiq.policy.inference import export


@pytest.fixture(scope="module")
def module() -> torch.nn.Module:
    return load_module(SHIPPED)


def _torch_scores(module: torch.nn.Module, obs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module._forward({Columns.OBS: torch.from_numpy(obs)})[Columns.ACTION_DIST_INPUTS].numpy()


@pytest.mark.parametrize(("batch", "n"), [(1, 1), (1, 6), (3, 40), (2, 120)])
def test_numpy_scores_match_torch_for_any_fleet_size(module: torch.nn.Module, batch: int, n: int) -> None:
    rng = np.random.default_rng(n)
    obs = rng.normal(size=(batch, n, N_FEATURES)).astype(np.float32)
    obs[..., -1] = 1.0
    if n > 1:
        obs[0, n // 2 :, -1] = 0.0  # padding rows, as FleetEnv pads to N_max
    fast = export(module, N_FEATURES)
    assert fast is not None
    got, want = fast(obs), _torch_scores(module, obs)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # The ranking the controller takes from them is the same.
    assert (np.argsort(-got, kind="stable") == np.argsort(-want, kind="stable")).all()
    assert (got[obs[..., -1] < 0.5] == np.float32(NEG)).all()


def test_a_module_of_another_shape_keeps_torch(module: torch.nn.Module) -> None:
    class Other(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._encoder = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 8), torch.nn.ReLU())
            self._scorer = torch.nn.Sequential(torch.nn.Linear(16, 1))

    assert export(Other(), N_FEATURES) is None


def test_a_forward_pass_that_disagrees_keeps_torch(module: torch.nn.Module) -> None:
    class Shifted(torch.nn.Module):
        """The same layers, but a forward pass the numpy twin does not reproduce."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._encoder, self._scorer, self.inner = inner._encoder, inner._scorer, inner

        def _forward(self, batch: dict, **kw: object) -> dict:
            out = self.inner._forward(batch)
            return {Columns.ACTION_DIST_INPUTS: out[Columns.ACTION_DIST_INPUTS] + 0.5}

    assert export(Shifted(module), N_FEATURES) is None
