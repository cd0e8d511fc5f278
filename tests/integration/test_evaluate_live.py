"""The live half of the promotion gate, on a real Envoy and real backends.

Two checkpoints that pick differently in a way that shows on the fleet: the shipped
policy and the same with its scores negated (it re-optimises the endpoints the trained
one would leave alone). With SLO breachers not forced into the critical set, only the
policy decides which endpoints the LP may touch, so the gate's verdict rests on the
policy alone. Which of the two is better is the gate's to find: the shipped checkpoint
was trained before the decision core (issue #13), and on this scenario under the new
core its inversion scored better (-0.94 vs -1.15); the gate must promote whichever
scores higher, and only that one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from balanceiq.exceptions import BalanceIQError
from balanceiq.policy.checkpoint import SHIPPED, load_module
from balanceiq.sim.evaluate import promotion_decision
from balanceiq.testbed.evaluate_live import evaluate_checkpoints_live, live_eval_config

pytestmark = pytest.mark.slow


def _inverted(tmp_path: Path) -> Path:
    import torch

    module = load_module(SHIPPED)
    with torch.no_grad():
        last = module._scorer[-1]
        last.weight.mul_(-1.0)
        last.bias.mul_(-1.0)
    out = tmp_path / "inverted"
    module.save_to_path(str(out))
    return out


def test_live_gate_promotes_the_better_and_refuses_the_worse(tmp_path: Path) -> None:
    worse = _inverted(tmp_path)
    episodes: list[dict] = []
    ev = evaluate_checkpoints_live(SHIPPED, worse, {"force_breaching": False}, episodes=2, on_episode=episodes.append)
    print({k: ev[k] for k in ("scenarios", "seconds")}, episodes)
    # Paired and alternated: candidate first in episode 0, serving first in episode 1.
    assert [(e["episode"], e["checkpoint"]) for e in episodes] == [
        (0, "candidate"),
        (0, "serving"),
        (1, "serving"),
        (1, "candidate"),
    ]
    assert all(e["blind_steps"] <= 2 for e in episodes), "the testbed's load should make every step measurable"
    assert list(ev["scenarios"]) == ["live:degrade_and_dearer"]
    swapped = {
        "scenarios": {k: {"candidate": v["serving"], "serving": v["candidate"]} for k, v in ev["scenarios"].items()},
        "candidate": ev["serving"],
        "serving": ev["candidate"],
    }
    scores = ev["scenarios"]["live:degrade_and_dearer"]
    better, worse_way = (ev, swapped) if scores["candidate"] > scores["serving"] else (swapped, ev)
    ok, why = promotion_decision(better)
    assert ok, why
    ok, why = promotion_decision(worse_way)
    assert not ok and why.startswith("rejected"), why


def test_live_eval_config_refuses_what_would_touch_a_fleet_or_cannot_run() -> None:
    with pytest.raises(BalanceIQError, match="mode: private"):
        live_eval_config({"mode": "attach", "config": "balanceiq.yaml"})
    with pytest.raises(BalanceIQError, match="episode_steps"):
        live_eval_config({"episode_steps": 0})
    with pytest.raises(BalanceIQError, match="no_such_scenario"):
        live_eval_config({"scenario": "no_such_scenario"})
