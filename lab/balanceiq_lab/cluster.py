"""``balanceiq cluster check``: Ray cluster launcher configs (``cluster.yaml``, ``cluster-local.yaml``)
checked offline: the checks ``ray up`` and the autoscaler run (no cloud call), as readable problems,
plus a few rules Ray enforces late or never (``min_workers <= max_workers``, node types, resources)."""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from balanceiq.config.loading import print_problems

# Keys the v1 autoscaler indexes directly (config["..."]) when it (re)reads a config
# that no defaults were merged into: missing ones crash the monitor at start.
AUTOSCALER_REQUIRED_KEYS = (
    "cluster_name",
    "provider",
    "max_workers",
    "idle_timeout_minutes",
    "available_node_types",
    "head_node_type",
    "auth",
    "file_mounts",
    "cluster_synced_files",
    "worker_setup_commands",
    "worker_start_ray_commands",
)
# The fake provider registers the head under this node type (fake_multi_node.node_provider).
FAKE_HEAD_NODE_TYPE = "ray.head.default"


def _key_path(parts: Sequence[Any]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int) or "." in str(p) or not str(p):
            out += f"[{p}]"  # node type names such as ray.worker.cpu contain dots
        else:
            out += f".{p}" if out else str(p)
    return out or "<root>"


def _schema_problems(config: dict[str, Any]) -> list[str]:
    """Every violation of Ray's JSON schema, as ``key.path: message``."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            # One line per unknown key, with the nearest allowed one: typos are the usual cause.
            allowed = sorted((error.schema.get("properties") or {}).keys())
            for key in sorted(set(error.instance) - set(allowed), key=str):
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                problems.append(
                    f"{_key_path([*path, key])}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                )
        else:
            problems.append(f"{_key_path(path)}: {error.message}")
    return problems


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """Silence Ray's helpers (they print and log at INFO): a check prints only its verdict."""
    logger = logging.getLogger("ray.autoscaler")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _ray_problems(config: dict[str, Any], provider_type: str) -> list[str]:
    """``prepare_config`` + ``validate_config`` as ``ray up`` runs them, or
    ``validate_config`` alone for configs the autoscaler uses as written."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems: list[str] = []
    try:
        with _quiet_ray():
            if provider_type == "fake_multinode":  # used as written: no ``ray up``, no defaults merged
                missing = [k for k in AUTOSCALER_REQUIRED_KEYS if k not in config]
                problems += [
                    f"{k}: required (the autoscaler reads this file as written; use {{}} or [] if empty)"
                    for k in missing
                ]
                if missing:
                    return problems
                validate_config(copy.deepcopy(config))
            else:
                validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as exc:
        problems.append(f"{_key_path(list(exc.absolute_path))}: {exc.message}")
    except NotImplementedError as exc:  # unknown provider type
        problems.append(f"provider.type: {exc}")
    except (ValueError, RuntimeError, KeyError, TypeError, AssertionError, OSError) as exc:
        problems.append(str(exc) or type(exc).__name__)
    return problems


def _extra_problems(config: dict[str, Any], provider_type: str) -> list[str]:
    problems = []
    node_types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    for name, spec in node_types.items():
        where = _key_path(["available_node_types", name])
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers")
        if hi is not None and lo > hi:
            problems.append(f"{where}: min_workers {lo} > max_workers {hi}")
        if provider_type == "fake_multinode" and name != head and "CPU" not in (spec.get("resources") or {}):
            problems.append(f"{where}.resources: fake nodes have only the resources listed; give CPU")
        if provider_type == "aws" and not (spec.get("node_config") or {}).get("InstanceType"):
            problems.append(f"{where}.node_config.InstanceType: required")
    if provider_type == "fake_multinode" and head != FAKE_HEAD_NODE_TYPE:
        problems.append(
            f"head_node_type: the fake provider registers the head as '{FAKE_HEAD_NODE_TYPE}', not {head!r}"
        )
    return problems


def check_cluster_config(path: str | Path) -> list[str]:
    """Every problem in a Ray cluster launcher config, one line each; ``[]``: Ray accepts it.
    Never raises for a bad file; makes no cloud call."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as exc:
        return [f"cannot read {path}: {exc.strerror or exc}"]
    except yaml.YAMLError as exc:
        return [f"not valid YAML: {exc}"]
    if not isinstance(config, dict):
        return [f"<root>: must be a mapping of keys, got {type(config).__name__}"]
    problems = _schema_problems(config)
    if problems:
        # Ray's later steps assume a schema-valid config and fail in confusing ways.
        return problems
    provider_type = str(config["provider"]["type"])
    problems = _ray_problems(config, provider_type)
    return problems + [p for p in _extra_problems(config, provider_type) if p not in problems]


def cluster_check_command(path: str | Path) -> int:
    """``balanceiq cluster check FILE``: 0 and a summary, or 2 and every problem on stderr."""
    problems = check_cluster_config(path)
    if problems:
        return print_problems(path, problems)
    config = yaml.safe_load(Path(path).read_text())
    workers = ", ".join(
        f"{name} {spec.get('min_workers', 0)}-{spec.get('max_workers', config.get('max_workers', '?'))}"
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"]
    )
    print(f"OK: {path} (provider {config['provider']['type']}, head {config['head_node_type']}, workers {workers})")
    return 0
