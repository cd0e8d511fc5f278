"""LiveEnv's pure parts: its configuration, port re-allocation, RLlib overrides, spaces.

Nothing here starts a process: a LiveEnv brings its stack up on the first reset().
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from balanceiq.cli import main
from balanceiq.config import default_settings, settings_from_dict
from balanceiq.exceptions import ConfigError
from balanceiq.policy.features import N_FEATURES
from balanceiq.sim.env import FleetEnv
from balanceiq.testbed.live_config import (
    DEFAULT_LAYOUT,
    LiveEnvConfig,
    fast_windows,
    live_rllib_overrides,
    load_live_env_config,
    ports_needed,
    reallocate_ports,
)
from balanceiq.testbed.live_env import LiveEnv
from balanceiq_lab.testbed.profiles import profile_for

PPO_YAML = Path(__file__).resolve().parents[3] / "rllib_configs" / "ppo.yaml"


def all_ports(s) -> list[int]:  # type: ignore[no-untyped-def]
    from httpx import URL

    eps = [ep.port for c in s.clusters for ep in c.endpoints]
    return eps + [
        s.xds.port,
        URL(s.envoy.admin_url).port,
        s.envoy.listen_port,
        URL(s.prometheus.url).port,
        s.telemetry.als_grpc_port,
        s.telemetry.als_metrics_port,
    ]


# -- configuration -----------------------------------------------------------------------------


def test_defaults_are_a_modest_private_stack() -> None:
    cfg = LiveEnvConfig.from_env_config(None)
    assert cfg.mode == "private" and cfg.rps == 60.0 and not cfg.prometheus
    assert cfg.decision_interval_s == 2.0 and cfg.episode_steps == 15
    s = cfg.load_settings()
    eps = s.clusters[0].endpoints
    assert len(eps) == 6 and {e.cloud for e in eps} == {"aws", "gcp", "azure"}
    assert len({e.cost_per_million_requests for e in eps}) > 1  # clouds differ in price


def test_attach_needs_a_config_and_sends_no_load_by_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="attach mode needs config"):
        LiveEnvConfig.from_env_config({"mode": "attach"})
    cfg = LiveEnvConfig.from_env_config({"mode": "attach", "settings": default_settings()})
    assert cfg.rps == 0.0


def test_unknown_and_bad_keys_are_named() -> None:
    with pytest.raises(ConfigError) as exc:
        LiveEnvConfig.from_env_config({"decision_interval": 2, "episode_steps": 0, "reward": {"slo": 1}})
    paths = [p for p, _ in exc.value.problems]
    assert "decision_interval" in paths and "episode_steps" in paths and "reward.slo" in paths


def test_config_and_settings_are_exclusive_and_rllib_keys_are_ignored(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        LiveEnvConfig.from_env_config({"config": str(tmp_path / "x.yaml"), "settings": default_settings()})
    assert LiveEnvConfig.from_env_config({"num_envs": 1}).mode == "private"


def test_live_config_file_resolves_config_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "stack.yaml").write_text(yaml.safe_dump({"clusters": DEFAULT_LAYOUT["clusters"]}))
    f = tmp_path / "live.yaml"
    f.write_text("mode: attach\nconfig: stack.yaml\nload_rps: 10\n")
    data = load_live_env_config(f)
    assert Path(data["config"]) == (tmp_path / "stack.yaml").resolve()
    assert LiveEnvConfig.from_env_config(data).load_settings().clusters[0].endpoints[0].cloud == "aws"


def test_live_config_file_problems_name_the_file_and_field(tmp_path: Path) -> None:
    f = tmp_path / "live.yaml"
    f.write_text("mode: sideways\nload_rps: -1\n")
    with pytest.raises(ConfigError) as exc:
        load_live_env_config(f)
    assert str(f) in str(exc.value)
    assert {p for p, _ in exc.value.problems} >= {"mode", "load_rps"}
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_live_env_config(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_live_env_config(tmp_path / "missing.yaml")


def test_unknown_scenario_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no scenario"):
        LiveEnv({"scenario": "no_such_scenario"})


# -- ports -------------------------------------------------------------------------------------


def test_reallocate_ports_moves_every_port_and_keeps_the_endpoints() -> None:
    base = settings_from_dict(DEFAULT_LAYOUT)
    n = ports_needed(base)
    assert n == 6 + 6
    fresh = list(range(40000, 40000 + n))
    s, mapping = reallocate_ports(base, fresh)
    assert sorted(all_ports(s)) == fresh  # every port replaced, none twice
    for old, new in zip(base.clusters[0].endpoints, s.clusters[0].endpoints):
        assert mapping[old.address] == new.address and new.host == old.host
        assert (new.cloud, new.region, new.cost_per_million_requests, new.capacity_rps) == (
            old.cloud,
            old.region,
            old.cost_per_million_requests,
            old.capacity_rps,
        )
    # the degraded backend's override follows its endpoint
    (moved,) = s.testbed.overrides
    assert moved == mapping["127.0.0.1:18006"]
    assert profile_for(s.testbed, s.clusters[0].endpoints[5]) == profile_for(
        base.testbed, base.clusters[0].endpoints[5]
    )
    assert s.envoy.admin_url.startswith("http://127.0.0.1:") and s.prometheus.url.startswith("http://127.0.0.1:")


def test_reallocate_ports_needs_enough_ports_and_refuses_clashes() -> None:
    base = default_settings()
    with pytest.raises(ValueError, match="needs"):
        reallocate_ports(base, [1, 2, 3])
    with pytest.raises(ConfigError, match="duplicate address"):
        reallocate_ports(base, [5000] * ports_needed(base))


def test_fast_windows_follow_the_decision_interval() -> None:
    s = fast_windows(default_settings(), 2.0)
    assert s.telemetry.window_s == 2.0 and s.prometheus.scrape_interval_s == 0.5
    assert s.control.interval_s == 2.0 and s.telemetry.stale_after_s == 4.0


# -- RLlib -------------------------------------------------------------------------------------


def test_rllib_overrides_keep_the_simulators_spaces_and_shrink_batches() -> None:
    sim_cfg = yaml.safe_load(PPO_YAML.read_text())["env_config"]
    over = live_rllib_overrides(sim_cfg, {"load_rps": 30}, 2)
    env_cfg = over["env_config"]
    assert env_cfg["n_max"] == sim_cfg["n_max"] and env_cfg["k"] == sim_cfg["k"] and env_cfg["load_rps"] == 30
    assert "scenarios" not in env_cfg  # simulator keys stay with the simulator
    frag = over["env_runners"]["rollout_fragment_length"]
    assert over["training"]["train_batch_size_per_learner"] == 2 * frag <= 64
    assert over["training"]["minibatch_size"] <= over["training"]["train_batch_size_per_learner"]
    assert live_rllib_overrides(sim_cfg, {"n_max": 8}, 1)["env_config"]["n_max"] == 8  # the file wins
    with pytest.raises(ConfigError):
        live_rllib_overrides(sim_cfg, {"bogus": 1}, 2)


def test_spaces_match_fleet_env_and_nothing_starts_before_reset() -> None:
    sim_cfg = yaml.safe_load(PPO_YAML.read_text())["env_config"]
    live = LiveEnv({"n_max": sim_cfg["n_max"], "k": sim_cfg["k"]})
    sim = FleetEnv(sim_cfg)
    assert live.observation_space == sim.observation_space
    assert live.action_space == sim.action_space
    assert live.observation_space.shape == (16, N_FEATURES)
    assert not live.started and live.owned_pids == []
    assert live.spec is not None and live.spec.nondeterministic
    with pytest.raises(RuntimeError, match="reset"):
        live.step(np.zeros(live.k, dtype=np.int64))
    live.close()
    live.close()  # idempotent
    with pytest.raises(Exception, match="closed"):
        live.reset()


def test_default_k_is_the_configs_and_n_max_bounds_the_cluster() -> None:
    assert LiveEnv({}).k == 2  # about 20% of 6 endpoints, at least 2
    with pytest.raises(ConfigError, match="n_max"):
        LiveEnv({"n_max": 4})


def test_action_indices_outside_the_fleet_are_ignored_like_fleet_env() -> None:
    env = LiveEnv({"n_max": 16, "k": 3})
    assert env.critical_from_action(np.array([3, 3, 20])) == [3]
    env.close()


# -- CLI ---------------------------------------------------------------------------------------


def test_train_live_rejects_bad_input_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "live.yaml"
    bad.write_text("decision_interval_s: -2\n")
    assert main(["train", "--env", "live", "--live-config", str(bad), "--checkpoint-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "decision_interval_s" in err and "Traceback" not in err
    assert main(["train", "--env", "moon"]) == 2
    assert main(["train", "--env", "sim", "--live-config", str(bad)]) == 2
    assert main(["train", "--env", "live", "--scenario", "degrade"]) == 2
