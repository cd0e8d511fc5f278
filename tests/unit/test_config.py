"""Config loading and validation: every error names its field, never a traceback."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from balanceiq import config as cfg
from balanceiq.config import (
    UINT32_MAX,
    ClusterConfig,
    ControlConfig,
    EndpointConfig,
    Settings,
    check_config_command,
    default_settings,
    load_config,
    settings_from_dict,
    split_address,
)
from balanceiq.config import TestbedConfig as TestbedCfg  # alias: not a pytest test class
from balanceiq.exceptions import ConfigError
from balanceiq_lab.testbed.profiles import profile_for

SAMPLE = Path(__file__).resolve().parents[2] / "balanceiq.yaml"


def _endpoint(address: str, **extra: Any) -> dict[str, Any]:
    return {"address": address, "cloud": "aws", "region": "us-east-1", **extra}


def _minimal(*endpoints: dict[str, Any]) -> dict[str, Any]:
    endpoints = endpoints or (_endpoint("127.0.0.1:18001"),)
    return {"clusters": [{"name": "svc", "endpoints": list(endpoints)}]}


def _write(tmp_path: Path, data: Any, name: str = "balanceiq.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _problems(data: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(data, "test.yaml")
    assert info.value.source == "test.yaml"
    return dict(info.value.problems)


def _load_problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    return info.value.problems


# --------------------------------------------------------------------------- valid files


def test_sample_file_loads() -> None:
    settings = load_config(SAMPLE)

    (cluster,) = settings.clusters
    assert cluster.name == "my_service"
    addresses = [ep.address for ep in cluster.endpoints]
    assert addresses == [f"127.0.0.1:{port}" for port in range(18001, 18007)]
    assert {ep.cloud for ep in cluster.endpoints} == {"aws", "gcp", "azure"}
    assert {(ep.cloud, ep.region) for ep in cluster.endpoints} >= {
        ("gcp", "us-central1"),
        ("gcp", "europe-west1"),
    }
    costs = {ep.cloud: ep.cost_per_million_requests for ep in cluster.endpoints}
    assert len(set(costs.values())) == 3
    assert all(ep.capacity_rps for ep in cluster.endpoints)
    assert settings.xds.port == 50051 and settings.envoy.listen_port == 10000
    assert settings.envoy.admin_url == "http://127.0.0.1:9901"
    assert settings.prometheus.url == "http://127.0.0.1:9090"
    assert settings.control.interval_s == 5
    # Relative state_dir is anchored at the file's directory, not the process's cwd.
    assert settings.state_dir == SAMPLE.parent / ".state"
    latencies = [profile_for(settings.testbed, ep)[0] for ep in cluster.endpoints]
    assert max(latencies) == settings.testbed.overrides["127.0.0.1:18006"].base_latency_ms


def test_sample_file_passes_check_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config_command(SAMPLE) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"OK: {SAMPLE} (1 cluster, 6 endpoints)"
    assert err == ""


def test_default_settings_are_valid_and_match_the_original_three_backends() -> None:
    settings = default_settings()
    assert settings_from_dict(settings.model_dump(mode="json")) == settings
    cluster = settings.cluster("my_service")
    assert [(ep.address, ep.cloud, ep.region) for ep in cluster.endpoints] == [
        ("127.0.0.1:18001", "aws", "us-east-1"),
        ("127.0.0.1:18002", "gcp", "us-central1"),
        ("127.0.0.1:18003", "azure", "eastus"),
    ]
    assert all(ep.weight == 1 for ep in cluster.endpoints)
    assert settings.control.interval_s == 5.0
    assert settings.xds.api == "ads-sotw"
    assert settings.state_dir == Path(".state")


def test_models_are_frozen() -> None:
    settings = default_settings()
    with pytest.raises(ValidationError):
        settings.control.interval_s = 1.0  # type: ignore[misc]


def test_every_field_is_documented() -> None:
    models = [
        cfg.EndpointConfig,
        cfg.ClusterConfig,
        cfg.TlsConfig,
        cfg.XdsConfig,
        cfg.EnvoyConfig,
        cfg.PrometheusConfig,
        cfg.ControlConfig,
        cfg.BackendProfile,
        TestbedCfg,
        cfg.Settings,
    ]
    for model in models:
        assert model.model_config.get("extra") == "forbid" and model.model_config.get("frozen")
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_cluster_lookup_names_known_clusters() -> None:
    settings = settings_from_dict(
        {
            "clusters": [
                {"name": "a", "endpoints": [_endpoint("10.0.0.1:80")]},
                {"name": "b", "endpoints": [_endpoint("10.0.0.1:80")]},
            ]
        }
    )
    assert settings.cluster("b").name == "b"
    with pytest.raises(KeyError, match=r"no cluster named 'c'; configured clusters: a, b"):
        settings.cluster("c")


def test_ipv6_address_properties_strip_brackets_and_canonicalise() -> None:
    ep = EndpointConfig(address="[::0:1]:8080", cloud="gcp", region="us-central1")
    assert ep.address == "[::1]:8080"
    assert (ep.host, ep.port) == ("::1", 8080)


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (3, 2), (5, 2), (10, 2), (20, 4), (300, 60)])
def test_k_critical_defaults_to_about_a_fifth(n: int, expected: int) -> None:
    assert ControlConfig().critical_count(n) == expected


def test_k_critical_is_clamped_to_n() -> None:
    assert ControlConfig(k_critical=4).critical_count(3) == 3
    assert ControlConfig(k_critical=2).critical_count(10) == 2


def test_override_keys_are_canonical_addresses() -> None:
    data = _minimal(_endpoint("[::1]:80"))
    data["testbed"] = {"overrides": {"[0::1]:080": {"base_latency_ms": 50}}}
    settings = settings_from_dict(data)
    ep = settings.clusters[0].endpoints[0]
    assert profile_for(settings.testbed, ep)[0] == 50.0


# --------------------------------------------------------------------------- field errors


def test_duplicate_endpoint_addresses_name_both_indices() -> None:
    data = _minimal(_endpoint("10.0.0.1:80"), _endpoint("10.0.0.2:80"), _endpoint("10.0.0.1:80"))
    problems = _problems(data)
    assert list(problems) == ["clusters[0].endpoints[2].address"]
    message = problems["clusters[0].endpoints[2].address"]
    assert "10.0.0.1:80" in message and "endpoints[0]" in message and "endpoints[2]" in message


def test_duplicate_detection_sees_through_ipv6_spelling() -> None:
    problems = _problems(_minimal(_endpoint("[::1]:80"), _endpoint("[0:0::1]:80")))
    assert "duplicate address [::1]:80" in problems["clusters[0].endpoints[1].address"]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("not-an-address", "not host:port"),
        ("127.0.0.1", "not host:port"),
        ("127.0.0.1:", "has no port"),
        (":8080", "has no host"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:0", "out of range 1..65535"),
        ("127.0.0.1:65536", "out of range 1..65535"),
        ("256.1.1.1:80", "not a valid IPv4 address"),
        ("::1:80", "IPv6 addresses need brackets"),
        ("[::1:80", "without ']'"),
        ("[127.0.0.1]:80", "brackets are only for IPv6"),
        ("bad_host!:80", "not an IPv4 or IPv6 address"),
    ],
)
def test_bad_address_is_reported_at_its_field(address: str, expected: str) -> None:
    problems = _problems(_minimal(_endpoint(address)))
    assert expected in problems["clusters[0].endpoints[0].address"]


@pytest.mark.parametrize("address", ["backend.internal:8080", "localhost:80", "api.example.com.:443"])
def test_hostname_is_refused_with_the_reason(address: str) -> None:
    message = _problems(_minimal(_endpoint(address)))["clusters[0].endpoints[0].address"]
    assert "is a hostname" in message
    assert "Envoy does not resolve names in EDS" in message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("weight", 0, "greater than or equal to 1"),
        ("weight", -3, "greater than or equal to 1"),
        ("weight", UINT32_MAX + 1, "less than or equal to 4294967295"),
        ("weight", "5", "valid integer"),
        ("weight", True, "valid integer"),
        ("cost_per_million_requests", -0.1, "greater than or equal to 0"),
        ("cost_per_million_requests", float("inf"), "finite number"),
        ("capacity_rps", 0, "greater than 0"),
        ("cloud", "", "must not be empty"),
        ("cloud", "aws/x", "must not contain '/'"),
        ("region", "  ", "must not be empty"),
        ("zone", "", "must not be empty"),
    ],
)
def test_bad_endpoint_field_is_reported(field: str, value: Any, expected: str) -> None:
    problems = _problems(_minimal(_endpoint("10.0.0.1:80", **{field: value})))
    assert expected in problems[f"clusters[0].endpoints[0].{field}"]


def test_unknown_key_is_reported_with_its_path_and_a_suggestion() -> None:
    data = _minimal(_endpoint("10.0.0.1:80"), _endpoint("10.0.0.2:80", wieght=3))
    problems = _problems(data)
    assert problems == {"clusters[0].endpoints[1].wieght": "unknown key; did you mean 'weight'?"}


def test_unknown_top_level_key_lists_allowed_keys() -> None:
    message = _problems({"nonsense": 1})["nonsense"]
    assert message.startswith("unknown key")
    assert "clusters" in message and "state_dir" in message


def test_missing_required_key() -> None:
    endpoint = {"address": "10.0.0.1:80", "cloud": "aws"}
    problems = _problems({"clusters": [{"endpoints": [endpoint]}]})
    assert problems == {"clusters[0].endpoints[0].region": "required key is missing"}


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"clusters": []}, "clusters", "at least one cluster"),
        ({"clusters": [{"endpoints": []}]}, "clusters[0].endpoints", "at least one endpoint"),
        (
            {"clusters": [{"name": "my service", "endpoints": [_endpoint("10.0.0.1:1")]}]},
            "clusters[0].name",
            "letters, digits",
        ),
        ({"xds": {"port": 70000}}, "xds.port", "less than or equal to 65535"),
        ({"xds": {"api": "rest"}}, "xds.api", "'ads-sotw', 'ads-delta', 'eds-sotw' or 'eds-delta'"),
        ({"envoy": {"admin_url": "ftp://127.0.0.1:9901"}}, "envoy.admin_url", "not an http:// or https:// URL"),
        ({"envoy": {"admin_url": "http://127.0.0.1:99999"}}, "envoy.admin_url", "invalid port"),
        ({"envoy": {"update_merge_window_ms": -1}}, "envoy.update_merge_window_ms", "greater than or equal to 0"),
        ({"prometheus": {"url": "localhost:9090"}}, "prometheus.url", "not an http:// or https:// URL"),
        ({"control": {"interval_s": 0}}, "control.interval_s", "greater than 0"),
        ({"control": {"interval_s": 3600000000}}, "control.interval_s", "less than or equal to 3600"),
        ({"control": {"k_critical": 0}}, "control.k_critical", "greater than or equal to 1"),
        (
            {"testbed": {"overrides": {"127.0.0.1:18001": {"error_rate": 1.5}}}},
            'testbed.overrides["127.0.0.1:18001"].error_rate',
            "less than or equal to 1",
        ),
        (
            {"testbed": {"base_latency_ms": {"aws/us-east-1/a": 3}}},
            'testbed.base_latency_ms["aws/us-east-1/a"]',
            "'cloud' or 'cloud/region'",
        ),
        ({"testbed": {"overrides": {"nope": {}}}}, "testbed.overrides.nope", "not an endpoint address"),
        (
            {"testbed": {"overrides": {"10.9.9.9:80": {}}}},
            'testbed.overrides["10.9.9.9:80"]',
            "no configured endpoint has this address",
        ),
    ],
)
def test_other_field_errors(data: dict[str, Any], path: str, expected: str) -> None:
    problems = _problems(data)
    assert path in problems, problems
    assert expected in problems[path]


def test_duplicate_cluster_names() -> None:
    cluster = {"name": "svc", "endpoints": [_endpoint("10.0.0.1:80")]}
    problems = _problems({"clusters": [cluster, copy.deepcopy(cluster)]})
    assert "duplicate cluster name 'svc'" in problems["clusters[1].name"]
    assert "clusters[0]" in problems["clusters[1].name"]


def test_locality_weight_sum_must_fit_uint32() -> None:
    same_locality = _minimal(
        _endpoint("10.0.0.1:80", zone="a", weight=UINT32_MAX),
        _endpoint("10.0.0.2:80", zone="a", weight=1),
    )
    message = _problems(same_locality)["clusters[0].endpoints"]
    assert "aws/us-east-1/a" in message and str(UINT32_MAX + 1) in message and "uint32" in message

    # The limit is per locality: the same weights in two zones are fine.
    split = _minimal(
        _endpoint("10.0.0.1:80", zone="a", weight=UINT32_MAX),
        _endpoint("10.0.0.2:80", zone="b", weight=1),
    )
    assert settings_from_dict(split).clusters[0].endpoints[0].weight == UINT32_MAX


def test_tls_enabled_requires_cert_and_key() -> None:
    problems = _problems({"xds": {"tls": {"enabled": True}}})
    assert problems == {
        "xds.tls.cert_file": "required when enabled is true",
        "xds.tls.key_file": "required when enabled is true",
    }


def test_tls_client_certs_need_a_ca_and_tls() -> None:
    problems = _problems({"xds": {"tls": {"require_client_cert": True}}})
    assert "required when require_client_cert is true" in problems["xds.tls.ca_file"]
    assert "needs enabled: true" in problems["xds.tls.require_client_cert"]


def test_several_problems_are_reported_at_once() -> None:
    data = _minimal(_endpoint("backend:80", weight=0), _endpoint("10.0.0.2:80", colud="gcp"))
    data["xds"] = {"port": 0}
    data["control"] = {"interval_s": -1}
    problems = _problems(data)
    assert set(problems) == {
        "clusters[0].endpoints[0].address",
        "clusters[0].endpoints[0].weight",
        "clusters[0].endpoints[1].colud",
        "xds.port",
        "control.interval_s",
    }


def test_config_error_chains_the_pydantic_error() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"xds": {"port": 0}})
    assert isinstance(info.value.__cause__, ValidationError)


def test_non_mapping_top_level() -> None:
    assert _problems([1, 2]) == {"": "the top level must be a mapping of settings, not a list"}


# --------------------------------------------------------------------------- files


def test_relative_paths_resolve_against_the_config_file_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    data = _minimal()
    data["state_dir"] = "var/state"
    data["xds"] = {"tls": {"enabled": True, "cert_file": "certs/x.crt", "key_file": "/abs/x.key"}}
    path = _write(conf_dir, data)
    monkeypatch.chdir(tmp_path)  # cwd differs from the file's directory on purpose

    settings = load_config(Path("conf") / "balanceiq.yaml")
    assert settings.state_dir == conf_dir / "var" / "state"
    assert settings.xds.tls.cert_file == conf_dir / "certs" / "x.crt"
    assert settings.xds.tls.key_file == Path("/abs/x.key")
    # Without a file there is nothing to anchor to: the path stays as written.
    assert settings_from_dict(data).state_dir == Path("var/state")
    assert load_config(path) == settings


def test_missing_file(tmp_path: Path) -> None:
    assert _load_problems(tmp_path / "absent.yaml") == [("", "file not found")]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert _load_problems(tmp_path) == [("", "is a directory, not a config file")]


@pytest.mark.parametrize("text", ["", "   \n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    ((path, message),) = _load_problems(_write(tmp_path, text))
    assert path == "" and message.startswith("file is empty")


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    text = "clusters:\n  - name: svc\n    endpoints: [\n  bad: : :\n"
    ((path, message),) = _load_problems(_write(tmp_path, text))
    assert path == ""
    assert message.startswith("YAML syntax error at line 4, column ")


def test_yaml_error_is_chained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "a: [1, 2\n"))
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_duplicate_yaml_key_is_an_error_not_a_silent_override(tmp_path: Path) -> None:
    text = "control:\n  interval_s: 5\n  interval_s: 1\n"
    ((path, message),) = _load_problems(_write(tmp_path, text))
    assert path == ""
    assert "line 3, column 3" in message and "duplicate key 'interval_s'" in message


def test_exponent_floats_read_as_numbers_as_in_yaml_1_2(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 1e3 as the string "1e3", which then failed as "not a number".
    base = load_config(_write(tmp_path, "control:\n  interval_s: 5\n"))
    text = yaml.safe_dump(base.model_dump(mode="json", exclude={"api": {"token"}}), sort_keys=False)
    text = text.replace("interval_s: 5.0", "interval_s: 1e3")
    assert "interval_s: 1e3" in text
    assert load_config(_write(tmp_path, text)).control.interval_s == 1000.0


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    text = (
        "clusters:\n"
        "  - name: svc\n"
        "    endpoints:\n"
        "      - &base {address: '10.0.0.1:80', cloud: aws, region: us-east-1, weight: 2}\n"
        "      - {<<: *base, address: '10.0.0.2:80'}\n"
    )
    endpoints = load_config(_write(tmp_path, text)).clusters[0].endpoints
    assert [(ep.address, ep.weight) for ep in endpoints] == [("10.0.0.1:80", 2), ("10.0.0.2:80", 2)]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("state_dir: caf\xe9\n".encode("latin-1"))
    assert _load_problems(path) == [("", "not UTF-8 text (byte 0xe9 at offset 14)")]


def test_file_with_nul_bytes(tmp_path: Path) -> None:
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"a: 1\n\x00\x00\x00")
    ((_, message),) = _load_problems(path)
    assert message.startswith("not readable as YAML text")


def test_top_level_scalar_in_file(tmp_path: Path) -> None:
    problems = _load_problems(_write(tmp_path, "just a string\n"))
    assert problems == [("", "the top level must be a mapping of settings, not a string")]


def test_unknown_key_in_file_is_reported_with_path(tmp_path: Path) -> None:
    data = _minimal(_endpoint("10.0.0.1:80"), _endpoint("10.0.0.2:80", wieght=2))
    problems = _load_problems(_write(tmp_path, data))
    assert problems == [("clusters[0].endpoints[1].wieght", "unknown key; did you mean 'weight'?")]


# --------------------------------------------------------------------------- check command


def _binary(tmp_path: Path) -> Path:
    path = tmp_path / "blob.yaml"
    path.write_bytes(bytes(range(256)))
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d / "absent.yaml", "file not found"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d, ""), "file is empty"),
        (_binary, "not UTF-8 text"),
        (lambda d: _write(d, "a: [1\n"), "YAML syntax error at line 2"),
    ],
)
def test_check_command_reports_file_problems_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, expected: str
) -> None:
    path = make(tmp_path)
    assert check_config_command(path) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    assert err.splitlines()[0] == f"{path}: 1 problem"
    assert expected in err.splitlines()[1]


def test_check_command_prints_every_field_problem_one_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _minimal(_endpoint("backend.internal:80"), _endpoint("10.0.0.2:80", weight=0))
    path = _write(tmp_path, data)
    assert check_config_command(str(path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == f"{path}: 2 problems"
    assert lines[1].startswith("  clusters[0].endpoints[0].address: 'backend.internal' is a hostname")
    assert lines[2] == ("  clusters[0].endpoints[1].weight: Input should be greater than or equal to 1 (got 0)")
    assert len(lines) == 3


# --------------------------------------------------------------------------- properties


@given(
    ip=st.ip_addresses(v=4),
    port=st.integers(min_value=1, max_value=65535),
)
def test_any_ipv4_address_and_port_round_trips(ip: ipaddress.IPv4Address, port: int) -> None:
    ep = EndpointConfig(address=f"{ip}:{port}", cloud="aws", region="us-east-1")
    assert ep.address == f"{ip}:{port}"
    assert (ep.host, ep.port) == (str(ip), port)
    assert split_address(ep.address) == (str(ip), port)


@given(ip=st.ip_addresses(v=6), port=st.integers(min_value=1, max_value=65535))
def test_any_ipv6_address_and_port_round_trips(ip: ipaddress.IPv6Address, port: int) -> None:
    ep = EndpointConfig(address=f"[{ip.exploded}]:{port}", cloud="gcp", region="us-central1")
    assert (ep.host, ep.port) == (str(ip), port)
    assert ep.address == f"[{ip}]:{port}"


@given(weight=st.integers(max_value=0))
def test_any_weight_below_one_is_rejected(weight: int) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(_minimal(_endpoint("10.0.0.1:80", weight=weight)))
    assert [path for path, _ in info.value.problems] == ["clusters[0].endpoints[0].weight"]


@given(weight=st.integers(min_value=1, max_value=UINT32_MAX))
def test_any_uint32_weight_is_accepted(weight: int) -> None:
    endpoint = EndpointConfig(address="10.0.0.1:80", cloud="a", region="r", weight=weight)
    cluster = ClusterConfig(endpoints=[endpoint])
    assert cluster.endpoints[0].weight == weight


def test_settings_round_trip_through_yaml(tmp_path: Path) -> None:
    settings = load_config(SAMPLE)
    dumped = settings.model_dump(mode="json")
    reloaded = load_config(_write(tmp_path, dumped))
    assert reloaded == settings


def test_settings_model_is_the_root() -> None:
    assert issubclass(Settings, BaseModel)
    assert set(Settings.model_fields) == {
        "clusters",
        "xds",
        "envoy",
        "prometheus",
        "telemetry",
        "control",
        "guardrails",
        "api",
        "testbed",
        "state_dir",
    }
