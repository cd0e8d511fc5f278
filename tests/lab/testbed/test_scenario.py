"""Live scenario files: the shipped one loads; mistakes are named, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from balanceiq.config import default_settings
from balanceiq.exceptions import ConfigError
from balanceiq_lab.testbed.scenario import load_live_scenario


def test_shipped_scenario_loads_and_hits_the_sample_config() -> None:
    sc = load_live_scenario()
    assert sc.name == "degrade_and_dearer" and [e.name for e in sc.events] == [
        "gcp degrades",
        "azure gets dearer",
        "gcp recovers",
    ]
    eps = list(default_settings().clusters[0].endpoints)
    sc.check_targets(eps)
    assert sc.phase_at(0) == "start" and sc.phase_at(80) == "azure gets dearer"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "name: x\nduration_s: 10\nevents:\n  - {at_s: 1, name: a, cloud: aws, set: {extra_latency_ms: -5}}\n",
            "extra_latency_ms",
        ),
        (
            "name: x\nduration_s: 10\nevents:\n  - {at_s: 1, name: a, cloud: aws, set: {latency: 5}}\n",
            "unknown set field",
        ),
        (
            "name: x\nduration_s: 10\nevents:\n  - {at_s: 1, name: a, cloud: aws, region: r, reset: true}\n",
            "exactly one",
        ),
        ("name: x\nduration_s: 10\nevents:\n  - {at_s: 1, name: a, cloud: aws}\n", "set, cost_multiplier or reset"),
        ("name: x\nduration_s: 10\nevents:\n  - {at_s: 11, name: late, cloud: aws, reset: true}\n", "late"),
        ("name: x\nduration_s: 10\nevnts: []\n", "evnts"),
        ("name: x\nname: y\nduration_s: 10\n", "duplicate"),
        ("", "empty"),
    ],
)
def test_bad_scenarios_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_live_scenario(f)
    assert needle in str(info.value)


def test_unknown_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="degrade_and_dearer"):
        load_live_scenario("no_such_scenario")


def test_event_matching_no_endpoint_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("name: x\nduration_s: 10\nevents:\n  - {at_s: 1, name: oracle slows, cloud: oracle, reset: true}\n")
    with pytest.raises(ConfigError, match="oracle slows"):
        load_live_scenario(f).check_targets(list(default_settings().clusters[0].endpoints))
