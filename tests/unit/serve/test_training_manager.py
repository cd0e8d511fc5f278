"""Asking for a training run: bad requests fail at once, before any Ray actor starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from balanceiq.exceptions import ControlError
from balanceiq.serve.api import TrainRequest
from balanceiq.serve.training import TrainingManager
from balanceiq.sim.evaluate import merge_evaluations, promotion_decision


def test_live_eval_with_an_unknown_scenario_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match=r"(?s)live_eval: .*no_such_live_scenario"):
        TrainingManager(tmp_path).start(1, None, 1, live_eval={"scenario": "no_such_live_scenario"})


def test_live_eval_needs_the_evaluation_it_belongs_to(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="needs evaluate"):
        TrainingManager(tmp_path).start(1, None, 1, evaluate=False, live_eval={})


def test_live_eval_request_accepts_only_safe_fields() -> None:
    # A file path or another mode over the API would let a caller aim the evaluation at
    # a real fleet or read files; only shipped scenario names and bounds are accepted.
    with pytest.raises(ValueError, match="mode"):
        TrainRequest.model_validate({"live_eval": {"mode": "attach"}})
    with pytest.raises(ValueError, match="scenario"):
        TrainRequest.model_validate({"live_eval": {"scenario": "../../etc/passwd"}})
    req = TrainRequest.model_validate({"live_eval": {"episodes": 3, "load_rps": 50}})
    assert req.live_eval is not None and req.live_eval.episodes == 3


def test_merged_sim_and_live_evaluations_weigh_every_scenario_alike() -> None:
    sim = {
        "scenarios": {
            "brownout": {"candidate": -2.0, "serving": -2.0},
            "many_endpoints": {"candidate": -10.0, "serving": -10.0},
        },
        "candidate": -6.0,
        "serving": -6.0,
        "seeds": [0],
    }
    live = {
        "scenarios": {"live:degrade_and_dearer": {"candidate": -1.0, "serving": -1.5}},
        "candidate": -1.0,
        "serving": -1.5,
        "episodes": [],
    }
    ev = merge_evaluations(sim, live)
    assert list(ev["scenarios"]) == ["brownout", "many_endpoints", "live:degrade_and_dearer"]
    assert ev["candidate"] == pytest.approx(-13.0 / 3) and ev["seeds"] == [0] and ev["episodes"] == []
    # Equal in simulation, 33% better live: +11% on average, promoted.
    assert promotion_decision(ev)[0]
    # A live regression beyond 25% blocks promotion however good the simulation looks.
    worse_live = {**live, "scenarios": {"live:degrade_and_dearer": {"candidate": -2.0, "serving": -1.5}}}
    ok, why = promotion_decision(merge_evaluations(sim, worse_live))
    assert not ok and "live:degrade_and_dearer" in why
    with pytest.raises(ValueError, match="twice"):
        merge_evaluations(sim, sim)
