"""`balanceiq train`: PPO (RLlib, new API stack, config ``rllib_configs/ppo.yaml``) on the simulator.
The saved module is re-loaded and checked to be ours: RLlib silently falls back to a default one."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from balanceiq.exceptions import ConfigError
from balanceiq.policy.checkpoint import load_module

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "rllib_configs" / "ppo.yaml"


def load_algo_config(path: Path | None) -> dict[str, Any]:
    path = path or DEFAULT_CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([("", f"cannot read RLlib config: {exc}")], str(path)) from exc
    if not isinstance(data, dict) or data.get("algorithm") != "PPO":
        raise ConfigError([("algorithm", "must be PPO")], str(path))
    if unknown := sorted(set(data) - {"algorithm", "env_config", "model", "training", "env_runners", "imitation"}):
        raise ConfigError([(k, "unknown key") for k in unknown], str(path))
    return data


def build_algo_config(
    cfg: dict[str, Any],
    *,
    scenarios: list[str] | None,
    num_env_runners: int | None,
    seed: int = 0,
    env: Any = None,
    env_overrides: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The PPO config. ``env`` (default FleetEnv) and ``env_overrides`` (``env_config``, ``training``,
    ``env_runners`` over the YAML's) select another, e.g. LiveEnv (this layer may not import the testbed)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from balanceiq.policy.module import CriticalEndpointModule
    from balanceiq.sim.env import FleetEnv

    over = env_overrides or {}
    env_config = {**cfg.get("env_config", {}), "seed": seed}
    if scenarios:
        env_config["scenarios"] = scenarios
    if "env_config" in over:
        env_config = {**over["env_config"], "seed": seed}
    runners = {**cfg.get("env_runners", {}), **over.get("env_runners", {})}
    if num_env_runners is not None:
        runners["num_env_runners"] = num_env_runners
    return (
        PPOConfig()
        .environment(env if env is not None else FleetEnv, env_config=env_config)
        .framework("torch")
        .rl_module(rl_module_spec=RLModuleSpec(module_class=CriticalEndpointModule, model_config=cfg.get("model", {})))
        .env_runners(**runners)
        .learners(num_learners=0)
        .training(**{**cfg.get("training", {}), **over.get("training", {})})
        .debugging(seed=seed, log_level="ERROR")
        .reporting(metrics_num_episodes_for_smoothing=20)
    )


IMITATION_KEYS = {"episodes", "epochs", "lr", "explore", "batch_size", "teacher"}


def warm_start(
    algo: Any, cfg: dict[str, Any], env_config: dict[str, Any], *, seed: int = 0, console: Console | None = None
) -> dict[str, Any]:
    """Behaviour-clone the teacher into the learner's and env runners' modules before the first PPO iteration."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    from balanceiq.policy.module import CriticalEndpointModule
    from balanceiq.sim.env import FleetEnv
    from balanceiq.sim.imitation import collect, pretrain

    spec = dict(cfg.get("imitation") or {})
    if unknown := sorted(set(spec) - IMITATION_KEYS):
        raise ConfigError([(f"imitation.{k}", "unknown key") for k in unknown], "RLlib config")
    t0 = time.monotonic()
    episodes = int(spec.get("episodes", 64))
    epochs = int(spec.get("epochs", 100))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("imitation: demonstrations", total=episodes)
        demos = collect(
            env_config,
            episodes=episodes,
            explore=float(spec.get("explore", 0.2)),
            gamma=float(cfg.get("training", {}).get("gamma", 0.9)),
            seed=seed,
            teacher=str(spec.get("teacher", "gap")),
            on_episode=lambda i: progress.update(task, completed=i),
        )
        progress.update(task, description="imitation: fitting", completed=0, total=epochs)
        env = FleetEnv(env_config)
        module = CriticalEndpointModule(
            observation_space=env.observation_space, action_space=env.action_space, model_config=cfg.get("model", {})
        )
        fit = pretrain(
            module,
            demos,
            epochs=epochs,
            lr=float(spec.get("lr", 3e-3)),
            batch_size=int(spec.get("batch_size", 256)),
            seed=seed,
            on_epoch=lambda i, _: progress.update(task, completed=i),
        )
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    algo.learner_group.foreach_learner(lambda learner: learner.module[DEFAULT_MODULE_ID].load_state_dict(state))
    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True)
    return {**fit, "seconds": round(time.monotonic() - t0, 1)}


def _metric(result: dict[str, Any], *keys: str) -> float | None:
    node: Any = result
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return float(node) if isinstance(node, (int, float)) else None


def _connect_ray(address: str | None) -> bool:
    """Connect to ``address``, or start a private local 2-CPU Ray; False if Ray was already up."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        # An existing cluster brings its own resources (num_cpus may not be passed); the
        # token comes from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token.
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ValueError, ray.exceptions.AuthenticationError) as exc:
            raise ConfigError([("--address", f"cannot connect to Ray at {address!r}: {exc}")]) from exc
    else:
        # Private even when another Ray runs here: without --address, training must not
        # land on somebody else's cluster.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return True


def _iterate(
    algo: Any, iterations: int, console: Console, on_iteration: Callable[[dict[str, Any]], None] | None, t0: float
) -> list[dict[str, Any]]:
    """Run the PPO iterations with a progress bar; one history row per iteration."""
    history: list[dict[str, Any]] = []
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[status]}"), console=console) as progress:
        task = progress.add_task("train", total=iterations, status="")
        for i in range(iterations):
            result = algo.train()
            ret = _metric(result, "env_runners", "episode_return_mean")
            steps = _metric(result, "num_env_steps_sampled_lifetime") or _metric(
                result, "env_runners", "num_env_steps_sampled_lifetime"
            )
            row = {
                "iteration": i + 1,
                "episode_return_mean": ret,
                "env_steps": steps,
                "total_loss": _metric(result, "learners", "default_policy", "total_loss"),
                "elapsed_s": round(time.monotonic() - t0, 1),
            }
            history.append(row)
            if on_iteration is not None:
                on_iteration(dict(row))
            progress.update(task, advance=1, status=f"return {ret:.2f}" if ret is not None else "")
    return history


def train(
    *,
    scenarios: list[str] | None,
    iterations: int,
    checkpoint_dir: Path,
    num_env_runners: int | None = None,
    config_path: Path | None = None,
    seed: int = 0,
    console: Console | None = None,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    address: str | None = None,
    env: Any = None,
    env_overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train, save to ``checkpoint_dir`` (on this machine) and return a summary; ``on_iteration``
    gets each iteration's row as it finishes. ``address``: a running Ray cluster instead of a
    local 2-CPU Ray (unless Ray is already up here). ``env`` / ``env_overrides``: see build_algo_config."""
    import ray

    console = console or Console(stderr=True)
    cfg = load_algo_config(config_path)
    own_ray = _connect_ray(address)
    algo = None
    imitation: dict[str, Any] | None = None
    t0 = time.monotonic()
    try:
        algo_config = build_algo_config(
            cfg, scenarios=scenarios, num_env_runners=num_env_runners, seed=seed, env=env, env_overrides=env_overrides
        )
        algo = algo_config.build_algo()
        if cfg.get("imitation") and env is None:
            # The teacher needs the simulator's ground truth for its rollouts; a live run
            # starts from PPO alone (or from a checkpoint trained here).
            imitation = warm_start(algo, cfg, dict(algo_config.env_config), seed=seed, console=console)
        history = _iterate(algo, iterations, console, on_iteration, t0)
        checkpoint_dir = Path(checkpoint_dir).resolve()
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        algo.save_to_path(str(checkpoint_dir))
    finally:
        if algo is not None:
            algo.stop()
        if own_ray:
            ray.shutdown()
    returns = [h["episode_return_mean"] for h in history if h["episode_return_mean"] is not None]
    summary = {
        "checkpoint": str(checkpoint_dir),
        "module_class": type(load_module(checkpoint_dir)).__name__,
        "iterations": iterations,
        "env_steps": history[-1]["env_steps"] if history else 0,
        "elapsed_s": round(time.monotonic() - t0, 1),
        "first_return": returns[0] if returns else None,
        "final_return": returns[-1] if returns else None,
        "best_return": max(returns) if returns else None,
        "imitation": imitation,
        "history": history,
    }
    (checkpoint_dir / "training_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
