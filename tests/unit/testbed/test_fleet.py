"""The sample fleet is injected: a clear error without one, the caller's or the named one otherwise."""

from __future__ import annotations

import pytest

from balanceiq.exceptions import ConfigError
from balanceiq.testbed.fleet import ENV_VAR, resolve_fleet
from balanceiq.testbed.live_env import LiveEnv


def test_missing_fleet_names_what_to_install_and_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match=rf"(?s)pip install -e lab.*{ENV_VAR}=balanceiq_lab"):
        resolve_fleet(None, "balanceiq record")
    with pytest.raises(ConfigError, match="LiveEnv"):
        LiveEnv({"scenario": "degrade_and_dearer"})
    LiveEnv({})  # no scenario: nothing needs the fleet before reset


def test_fleet_from_the_caller_or_a_named_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = object()
    assert resolve_fleet(mine, "x") is mine  # type: ignore[arg-type]
    monkeypatch.setenv(ENV_VAR, "balanceiq_lab.testbed.fleet:provider")
    from balanceiq_lab.testbed.fleet import SampleFleet

    assert isinstance(resolve_fleet(None, "x"), SampleFleet)
    with pytest.raises(ConfigError, match="cannot load the fleet provider"):
        resolve_fleet("no_such_module:provider", "x")
