"""Scenario files: every shipped one loads, and a bad file names the offending field."""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from balanceiq.exceptions import ConfigError
from balanceiq.sim.scenario import SCENARIOS, Scenario, load_scenario, scenario_from_dict, scenario_text

REQUIRED = {"steady", "heterogeneous", "degrade", "failure", "brownout", "cost_shift", "flash_crowd", "many_endpoints"}


def _dump(tmp_path: Path, data: Any, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _problems(source: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        if isinstance(source, Path):
            load_scenario(source)
        else:
            scenario_from_dict(source)
    return info.value.problems


@pytest.fixture
def failure_dict() -> dict[str, Any]:
    return yaml.safe_load(scenario_text("failure"))


def test_shipped_names_match_the_files() -> None:
    files = {
        p.name.removesuffix(".yaml")
        for p in resources.files("balanceiq.sim").joinpath("scenarios").iterdir()
        if p.name.endswith(".yaml")
    }
    assert set(SCENARIOS) == files
    assert set(SCENARIOS) >= REQUIRED


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_shipped_scenario_loads_and_is_realistic(name: str) -> None:
    sc = load_scenario(name)
    assert sc.name == name
    assert scenario_text(name).startswith("#"), "each file explains itself in a comment header"
    assert {e.cloud for e in sc.endpoints} == {"aws", "gcp", "azure"}
    if name == "many_endpoints":
        assert len(sc.endpoints) >= 100
    else:
        assert 6 <= len(sc.endpoints) <= 8
    for e in sc.endpoints:
        assert 80 <= e.capacity_rps <= 400
        assert 10 <= e.base_latency_ms <= 80
        assert 0.1 <= e.cost_per_million <= 0.6
    # Demand peaks near 50-75% of capacity: a bad split can overload, a good one need not.
    peak_load = sc.demand.base_rps * (1 + sc.demand.diurnal_amplitude) / sum(e.capacity_rps for e in sc.endpoints)
    assert 0.5 <= peak_load <= 0.76
    assert sc.duration_s == 600 and sc.step_s == 1


def test_event_scenarios_have_the_documented_events() -> None:
    ev = {name: load_scenario(name).events for name in SCENARIOS}
    assert ev["steady"] == [] and ev["heterogeneous"] == []
    (d,) = ev["degrade"]
    degrade = load_scenario("degrade")
    biggest = max(degrade.endpoints, key=lambda e: e.capacity_rps)
    cheapest = min(degrade.endpoints, key=lambda e: e.cost_per_million)
    assert (d.kind, d.value, d.at_s, d.duration_s) == ("capacity", 0.5, 150, None)
    assert d.target == biggest.name == cheapest.name
    (f,) = ev["failure"]
    assert (f.kind, f.at_s, f.duration_s) == ("fail", 150, 120)
    (b,) = ev["brownout"]
    assert (b.kind, b.value, b.at_s) == ("tail_latency", 300, 150)
    (c,) = ev["cost_shift"]
    assert (c.kind, c.value, c.at_s, c.target) == ("cost", 3.0, 200, "cloud:aws")
    (fc,) = ev["flash_crowd"]
    assert (fc.kind, fc.value, fc.at_s, fc.duration_s, fc.target) == ("burst", 1.6, 200, 60, "all")


def test_readme_documents_every_kind_and_its_example_loads() -> None:
    text = resources.files("balanceiq.sim").joinpath("scenarios", "README.md").read_text(encoding="utf-8")
    for kind in ("capacity", "fail", "tail_latency", "cost", "demand", "burst"):
        assert f"`{kind}`" in text
    example = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert example is not None
    sc = scenario_from_dict(yaml.safe_load(example.group(1)))
    assert [e.kind for e in sc.events] == ["tail_latency", "fail", "burst"]


def test_load_by_path_and_name_defaults_to_file_stem(tmp_path: Path, failure_dict: dict[str, Any]) -> None:
    del failure_dict["name"]
    sc = load_scenario(_dump(tmp_path, failure_dict, "my-outage.yaml"))
    assert isinstance(sc, Scenario) and sc.name == "my-outage"
    assert sc == load_scenario(str(tmp_path / "my-outage.yaml"))


def test_fail_event_needs_no_value_but_others_do(failure_dict: dict[str, Any]) -> None:
    assert "value" not in failure_dict["events"][0]
    scenario_from_dict(failure_dict)
    failure_dict["events"][0]["kind"] = "capacity"
    assert _problems(failure_dict) == [("events[0].value", "required key is missing")]


def test_unknown_target_is_named_with_a_suggestion(tmp_path: Path, failure_dict: dict[str, Any]) -> None:
    failure_dict["events"][0]["target"] = "aws-use1-q"
    ((path, message),) = _problems(_dump(tmp_path, failure_dict))
    assert path == "events[0].target"
    assert "'aws-use1-q'" in message and "did you mean" in message


def test_unknown_cloud_target(failure_dict: dict[str, Any]) -> None:
    failure_dict["events"][0]["target"] = "cloud:oracle"
    ((path, message),) = _problems(failure_dict)
    assert path == "events[0].target" and "oracle" in message and "aws" in message


def test_unknown_key_names_path_and_suggests(tmp_path: Path, failure_dict: dict[str, Any]) -> None:
    failure_dict["endpoints"][3]["capacity"] = 5
    failure_dict["demand"]["nosie"] = 0.1
    failure_dict["colour"] = "blue"
    problems = dict(_problems(_dump(tmp_path, failure_dict)))
    assert "did you mean 'capacity_rps'" in problems["endpoints[3].capacity"]
    assert "did you mean 'noise'" in problems["demand.nosie"]
    assert problems["colour"].startswith("unknown key")


@pytest.mark.parametrize(
    ("edit", "path", "fragment"),
    [
        (lambda d: d["endpoints"][2].update(capacity_rps=0), "endpoints[2].capacity_rps", "greater than 0"),
        (lambda d: d["endpoints"][2].update(capacity_rps="100"), "endpoints[2].capacity_rps", "number"),
        (lambda d: d["endpoints"][1].update(name=d["endpoints"][0]["name"]), "endpoints[1].name", "duplicate"),
        (lambda d: d["endpoints"][1].update(name="all"), "endpoints[1].name", "reserved"),
        (lambda d: d["endpoints"][1].update(weight=0), "endpoints[1].weight", "greater than or equal to 1"),
        (lambda d: d["demand"].update(diurnal_amplitude=1.0), "demand.diurnal_amplitude", "less than 1"),
        (lambda d: d.update(endpoints=[]), "endpoints", "at least 1"),
        (lambda d: d.update(step_s=0), "step_s", "greater than 0"),
        (lambda d: d.update(duration_s=0.5), "duration_s", "shorter than one step"),
        (lambda d: d["events"][0].update(kind="explode"), "events[0].kind", "'burst'"),
        (lambda d: d["events"][0].update(duration_s=-1), "events[0].duration_s", "greater than 0"),
        (lambda d: d["events"][0].update(at_s=600), "events[0].at_s", "not before the end"),
        (lambda d: d["events"][0].update(kind="capacity", value=0), "events[0].value", "> 0"),
        (lambda d: d["events"][0].update(kind="tail_latency", value=-5), "events[0].value", ">= 0"),
        (lambda d: d["events"][0].update(kind="demand", value=2), "events[0].target", "must target 'all'"),
        (lambda d: d["events"][0].update(kind="errors", value=1.5), "events[0].value", "share of requests that fail"),
        (lambda d: d["events"][0].update(kind="servers", value=0), "events[0].value", "> 0"),
        (lambda d: d["endpoints"][1].update(servers=0), "endpoints[1].servers", "greater than or equal to 1"),
        (lambda d: d["endpoints"][1].update(service_cv=1.5), "endpoints[1].service_cv", "less than or equal to 1"),
        (
            lambda d: d["endpoints"][1].update(capacity_rps=100, tail_prob=0.5, tail_ms=50),
            "endpoints[1].tail_ms",
            "must be below the mean service time servers / capacity_rps (10 ms)",
        ),
        (lambda d: d.update(timeout_ms=0), "timeout_ms", "greater than 0"),
        (lambda d: d.pop("demand"), "demand", "required key is missing"),
    ],
)
def test_invalid_fields_are_reported_by_path(failure_dict: dict[str, Any], edit: Any, path: str, fragment: str) -> None:
    data = copy.deepcopy(failure_dict)
    edit(data)
    problems = dict(_problems(data))
    assert path in problems, problems
    assert fragment in problems[path]


def test_every_problem_is_reported_at_once(failure_dict: dict[str, Any]) -> None:
    failure_dict["endpoints"][0]["capacity_rps"] = -1
    failure_dict["endpoints"][5]["cost_per_million"] = -1
    failure_dict["seed"] = "x"
    paths = {p for p, _ in _problems(failure_dict)}
    assert {"endpoints[0].capacity_rps", "endpoints[5].cost_per_million", "seed"} <= paths


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: x\ndemand: [\n", "YAML syntax error at line"),
        ("- 1\n- 2\n", "top level must be a mapping"),
        ("", "empty"),
        ("name: a\nname: b\n", "duplicate key"),
    ],
)
def test_bad_yaml_is_a_config_error_not_a_traceback(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    ((field, message),) = _problems(path)
    assert field == "" and fragment in message
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert str(path) in str(info.value)


def test_unknown_name_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shipped: steady"):
        load_scenario("stedy")
    with pytest.raises(ConfigError, match="file not found"):
        load_scenario(tmp_path / "nope.yaml")
