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
