"""The Policy deployment's replica yields the CPU to the control loop (api.policy_niceness)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from balanceiq.config import Settings

# In a child process: raising niceness cannot be undone without privilege.
PROBE = """
import os
from balanceiq.serve.policy import PolicyDeployment
cls = PolicyDeployment.func_or_class
before = os.getpriority(os.PRIO_PROCESS, 0)
cls(None, {niceness})
print(before, os.getpriority(os.PRIO_PROCESS, 0))
"""


@pytest.mark.parametrize(("niceness", "expected"), [(10, 10), (0, 0)])
def test_the_replica_runs_at_the_configured_niceness(niceness: int, expected: int) -> None:
    res = subprocess.run(
        [sys.executable, "-c", PROBE.format(niceness=niceness)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    before, after = map(int, res.stdout.split()[-2:])
    assert before == 0 and after == expected


def test_niceness_is_bounded_and_defaults_to_10() -> None:
    assert Settings().api.policy_niceness == 10
    for bad in (-1, 20, "5"):
        with pytest.raises(ValueError, match="policy_niceness"):
            Settings.model_validate({"api": {"policy_niceness": bad}})
