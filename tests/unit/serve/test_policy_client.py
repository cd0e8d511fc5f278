"""The controller's copy of the policy and the Policy deployment swap together."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from balanceiq.exceptions import PolicyError
from balanceiq.policy.checkpoint import SHIPPED
from balanceiq.serve.plane import PolicyClient
from balanceiq.serve.policy import PolicyModel


@pytest.fixture(scope="module")
def models() -> tuple[PolicyModel, PolicyModel]:
    return PolicyModel(), PolicyModel()  # the deployment's, the controller's


def test_reload_swaps_both_and_info_says_they_agree(models: tuple[PolicyModel, PolicyModel], tmp_path: Path) -> None:
    deployment, local = models
    client = PolicyClient(deployment.info, deployment.reload, local=local)
    info = client.info()
    assert info["in_sync"] is True and info["controller_checkpoint"] == info["checkpoint"] == str(SHIPPED)
    assert info["forward"] == info["controller_forward"] == "numpy"
    copy = tmp_path / "copy"
    shutil.copytree(SHIPPED, copy)
    client.reload(str(copy))
    assert str(deployment.checkpoint) == str(local.checkpoint) == str(copy)
    assert client.info()["in_sync"] is True
    client.reload(str(SHIPPED))


def test_a_bad_checkpoint_changes_neither(models: tuple[PolicyModel, PolicyModel], tmp_path: Path) -> None:
    deployment, local = models
    client = PolicyClient(deployment.info, deployment.reload, local=local)
    with pytest.raises(PolicyError):
        client.reload(str(tmp_path / "missing"))
    assert str(deployment.checkpoint) == str(local.checkpoint) == str(SHIPPED)


def test_if_the_controller_copy_fails_the_deployment_goes_back(
    models: tuple[PolicyModel, PolicyModel], tmp_path: Path
) -> None:
    deployment, local = models

    class Broken:
        checkpoint = local.checkpoint

        def reload(self, checkpoint: str) -> None:
            raise PolicyError("disk full")

    client = PolicyClient(deployment.info, deployment.reload, local=Broken())
    shutil.copytree(SHIPPED, tmp_path / "copy")
    with pytest.raises(PolicyError, match="disk full"):
        client.reload(str(tmp_path / "copy"))
    assert str(deployment.checkpoint) == str(SHIPPED)


def test_the_model_scores_in_numpy_as_torch_would_and_keeps_it_across_a_swap(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from ray.rllib.core.columns import Columns

    from balanceiq.policy.features import N_FEATURES

    model = PolicyModel(SHIPPED)
    assert model.info()["forward"] == "numpy"
    rows = [np.random.default_rng(i).normal(size=(n, N_FEATURES)).astype(np.float32) for i, n in enumerate((5, 5, 9))]
    for r in rows:
        r[:, -1] = 1.0
    got = model.score_many([r.copy() for r in rows])
    with torch.no_grad():
        for r, g in zip(rows, got):
            want = model.module._forward({Columns.OBS: torch.from_numpy(r[None])})[Columns.ACTION_DIST_INPUTS].numpy()
            np.testing.assert_allclose(g, want[0], atol=1e-5, rtol=1e-5)
    copy = tmp_path / "ckpt"
    shutil.copytree(SHIPPED, copy)
    model.reload(copy)
    assert model.info()["forward"] == "numpy" and model.fast is not None
