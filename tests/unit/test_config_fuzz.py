"""Config fuzzing: whatever a file holds, the answer is Settings or a ConfigError naming the field.

Four generators: arbitrary text, a valid config with one value replaced by arbitrary data
(wrong types, huge numbers, NaN, long strings, nested junk), a valid config with an unknown
key added, and a valid YAML file with one key line duplicated. ``balanceiq config check``
is driven through the real CLI entry point (and once as the installed console script), and
must exit 2 with the problems on stderr, never a traceback.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from balanceiq.cli import main
from balanceiq.config import Settings, default_settings, load_config, settings_from_dict
from balanceiq.exceptions import ConfigError

BASE: dict[str, Any] = default_settings().model_dump(mode="json")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def fmt(loc: list[str | int]) -> str:
    """The field path as ConfigError spells it (``clusters[0].endpoints[1].weight``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}" if out else part
        else:
            out += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out


def paths(data: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every path to a value in ``data`` (mappings and lists), root excluded."""
    out: list[tuple[str | int, ...]] = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out += paths(child, (*prefix, key))
    return out


def mapping_paths(data: Any) -> list[tuple[str | int, ...]]:
    return [()] + [p for p in paths(data) if isinstance(get(data, p), dict)]


def get(data: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


BASE_PATHS = paths(BASE)
BASE_MAPPINGS = mapping_paths(BASE)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(
        [
            0,
            -1,
            2**32,
            2**64,
            10**400,
            10**4000,
            -(10**4000),
            1e308,
            float("inf"),
            float("-inf"),
            float("nan"),
            "",
            " ",
            "127.0.0.1:0",
            "[::1]:99999",
            "0.0.0.0",
            "-----BEGIN PRIVATE KEY-----\nMIIE",
            "a\x00b",
            "\u202e\ufeff",
            "$cluster $window $",
            "http://",
            "aws/us/east",
        ]
    ),
)
junk = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=8
)


def validate(data: Any) -> Settings | ConfigError:
    """Settings, or the ConfigError; any other exception fails the test by propagating."""
    try:
        return settings_from_dict(data, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must carry at least one problem"
        for field, message in exc.problems:
            assert isinstance(field, str) and isinstance(message, str) and message.strip()
        assert "Traceback" not in str(exc)
        return exc


# -- generators ------------------------------------------------------------------------------


@FUZZ
@given(text=st.text(max_size=400))
def test_arbitrary_text_is_settings_or_config_error(text: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        assert isinstance(load_config(path), Settings)
    except ConfigError as exc:
        assert exc.problems and exc.source == str(path)


yaml_fragments = st.lists(
    st.sampled_from(
        [
            "clusters:",
            "- name: x",
            "  endpoints:",
            "  - address: 10.0.0.1:80",
            "    cloud: aws",
            "    region: r",
            "    weight: 0x" + "f" * 5000,
            "    weight: " + "9" * 5000,
            "xds: {port: 99999}",
            "xds:",
            "  host: 0.0.0.0",
            "api: {token: short}",
            "state_dir: 2020-13-45",
            "control: {interval_s: .nan}",
            "x: &a [*a]",
            "y: *b",
            "  tls: {enabled: true}",
            "? [a, b]\n: c",
            "!!binary zz",
            "%YAML 1.1",
            "---",
            "...",
            "\t",
            "'",
            '"\\x',
            "{",
            "- - - -",
            "a: !!int 12x",
            "a: !!float 1.2.3",
            "a: !!timestamp nope",
            "<<: *a",
            "envoy: {admin_url: 'http://10.1.1.1:9901'}",
        ]
    ),
    max_size=12,
)


@FUZZ
@given(lines=yaml_fragments)
def test_yaml_like_text_is_settings_or_config_error(lines: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text("\n".join(lines) + "\n")
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.problems


@FUZZ
@given(where=st.sampled_from(BASE_PATHS), value=junk)
def test_one_bad_value_is_reported_in_its_section(where: tuple[str | int, ...], value: Any) -> None:
    data = copy.deepcopy(BASE)
    parent = get(data, where[:-1])
    parent[where[-1]] = value
    result = validate(data)
    if isinstance(result, ConfigError):
        # The problem is named in the section that was changed (a cross-field rule may
        # name a sibling of the changed value, never another section).
        section = fmt(list(where[:1]))
        assert any(field.startswith(section) for field, _ in result.problems), (where, result.problems)


@FUZZ
@given(where=st.sampled_from(BASE_MAPPINGS), key=st.text(min_size=1, max_size=12), value=junk)
def test_unknown_key_is_named_with_its_path(where: tuple[str | int, ...], key: str, value: Any) -> None:
    data = copy.deepcopy(BASE)
    target = get(data, where)
    assume(key not in target and key != "[key]")  # "[key]" is pydantic's own marker in error paths
    if where and where[-1] in ("queries", "base_latency_ms", "overrides"):
        return  # free-form mappings: a new key is an entry, not a typo (covered by the value test)
    target[key] = value
    result = validate(data)
    assert isinstance(result, ConfigError)
    named = fmt([*where, key])
    assert any(field == named and message.startswith("unknown key") for field, message in result.problems), (
        named,
        result.problems,
    )


@FUZZ
@given(data=st.data())
def test_a_duplicated_key_is_an_error_with_its_line(
    data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    text = yaml.safe_dump(BASE, sort_keys=False, width=10_000)
    lines = text.splitlines()
    # A line "key: ..." that does not start a list item; "key: 1" put just above it is
    # the same key, twice, in one mapping (found at the original line, now one lower).
    candidates = [i for i, line in enumerate(lines) if re.match(r"^\s*[A-Za-z_][\w.]*:( |$)", line)]
    i = data.draw(st.sampled_from(candidates))
    key = lines[i].split(":")[0].strip()
    dup = lines[:i] + [lines[i].split(":")[0] + ": 1"] + lines[i:]
    path = tmp_path_factory.mktemp("dup") / "c.yaml"
    path.write_text("\n".join(dup) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert f"duplicate key {key!r}" in problem[1] and f"line {i + 2}," in problem[1]


# -- examples that used to escape as another exception -------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "needle"),
    [
        ("state_dir: 2020-13-45\n", "", "cannot read timestamp value"),  # was ValueError
        ("a: !!timestamp nope\n", "", "cannot read timestamp value"),  # was AttributeError
        ("a: !!int 12x\n", "", "cannot read int value"),
        (
            "clusters:\n- name: a\n  endpoints:\n  - {address: '1.2.3.4:5', cloud: a, region: b, weight: "
            + "9" * 5000
            + "}\n",
            "clusters[0].endpoints[0].weight",
            "a number with 5000 digits",
        ),  # was ValueError (int digits limit)
        (
            "clusters:\n- name: a\n  endpoints:\n  - {address: '1.2.3.4:5', cloud: a, region: b, weight: 0x"
            + "f" * 5000
            + "}\n",
            "clusters[0].endpoints[0].weight",
            "less than or equal to 4294967295",
        ),  # was ValueError in repr()
        ("telemetry:\n  queries: {1: x, a: y}\n", "telemetry.queries", "unknown signal(s) 1, a"),  # was TypeError
        ("clusters: &a [*a]\n", "clusters[0]", "refers to itself"),
        ('state_dir: "a\\0b"\n', "state_dir", "NUL"),
        ("state_dir: " + "a" * 70_000 + "\n", "state_dir", "at most 65536"),
        (
            'xds:\n  tls:\n    enabled: true\n    cert_file: c.pem\n    key_file: "-----BEGIN PRIVATE KEY-----\\nMIIEv"\n',
            "xds.tls.key_file",
            "looks like PEM content",
        ),
    ],
)
def test_inputs_that_used_to_escape(tmp_path: Path, text: str, field: str, needle: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(f == field and needle in m for f, m in info.value.problems), info.value.problems


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\ntestbed: {base_latency_ms: {aws: *a8}}\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="more than 100000 values"):
        load_config(path)
    assert time.monotonic() - t0 < 5


def test_thousands_of_problems_are_capped(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text("clusters: [" + ", ".join(["1"] * 5000) + "]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 101 and info.value.problems[-1][1] == "... and 4900 more problem(s) not shown"


def test_files_over_one_mebibyte_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(path)


# -- the CLI ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(lines=yaml_fragments)
def test_config_check_exits_0_or_2_without_traceback(
    lines: list[str], tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path_factory.mktemp("cli") / "c.yaml"
    path.write_text("\n".join(lines) + "\n")
    code = main(["config", "check", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 0:
        assert out.startswith("OK: ")
    else:
        assert code == 2 and err.splitlines()[0].startswith(f"{path}: ") and len(err.splitlines()) >= 2


@pytest.mark.parametrize(
    "text",
    ["state_dir: 2020-13-45\n", "api: {token: hunter2short}\n", "xds: {host: 0.0.0.0}\n", "x: &a [*a]\n"],
)
def test_installed_console_script_exits_2_without_traceback(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    exe = Path(sys.executable).with_name("balanceiq")
    proc = subprocess.run([str(exe), "config", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{path}: 1 problem\n")
    assert "hunter2" not in proc.stderr
