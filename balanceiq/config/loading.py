"""Reading a config file: bounded, safe YAML, then validation; ``balanceiq config check``."""

from __future__ import annotations

import re
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from balanceiq.config.problems import _shape_problems, validation_problems
from balanceiq.config.settings import Settings
from balanceiq.exceptions import ConfigError

# Config files are kilobytes; the cap stops `config check /dev/zero` from reading forever.
_MAX_FILE_BYTES = 1024 * 1024


def settings_from_dict(
    data: Mapping[str, Any], source: str | None = None, *, base_dir: str | Path | None = None
) -> Settings:
    """Validate ``data`` (e.g. parsed YAML) into :class:`Settings`; :class:`ConfigError` lists
    every problem. Relative paths are resolved against ``base_dir`` when given."""
    if not isinstance(data, Mapping):
        names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
        message = f"the top level must be a mapping of settings, not a {names.get(type(data), type(data).__name__)}"
        raise ConfigError([("", message)], source)
    if shape := _shape_problems(data):
        raise ConfigError(shape, source)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc), source) from exc
    if base_dir is not None:
        settings = _resolve_paths(settings, Path(base_dir))
    return settings


def _resolve_paths(settings: Settings, base_dir: Path) -> Settings:
    def resolve(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else base_dir / path

    tls = settings.xds.tls
    tls = tls.model_copy(update={name: resolve(value) for name, value in tls if name.endswith("_file")})
    return settings.model_copy(
        update={
            "state_dir": resolve(settings.state_dir),
            "xds": settings.xds.model_copy(update={"tls": tls}),
            "api": settings.api.model_copy(update={"checkpoint": resolve(settings.api.checkpoint)}),
        }
    )


@dataclass(eq=False, slots=True)  # eq=False: two huge keys are never duplicates
class _TooLargeNumber:
    """An integer too long for Python to convert: pydantic refuses it at its own field."""

    digits: int

    def __repr__(self) -> str:
        return f"<a number with {self.digits} digits>"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last) and turns the
    bare errors of scalar constructors (``2020-13-45``, ``!!int x``) into YAML errors."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]} value: {exc}", node.start_mark
            ) from exc

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            digits = sum(ch.isalnum() for ch in str(node.value))
            if digits <= 4300:
                raise
            return _TooLargeNumber(digits)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable key; the base class reports it properly
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
# YAML 1.1 reads ``1e3`` as a string; people expect YAML 1.2 and JSON, where it is a number.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml_error_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        return f"not readable as YAML text: {exc.reason} (character {exc.character!r} at position {exc.position})"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or getattr(exc, "context", None) or exc).split())
    if mark is not None:
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"YAML syntax error: {problem}"


def _read_text(path: Path, source: str) -> str:
    def fail(message: str) -> ConfigError:
        return ConfigError([("", message)], source)

    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise fail("file not found") from exc
    except OSError as exc:
        raise fail(f"cannot access file: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise fail("is a directory, not a config file")
    if not stat.S_ISREG(info.st_mode):
        raise fail("is not a regular file")
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise fail(f"cannot read file: {exc.strerror or exc}") from exc
    if len(raw) > _MAX_FILE_BYTES:
        raise fail(f"file is larger than {_MAX_FILE_BYTES // (1024 * 1024)} MiB; not a config file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from exc


def load_config(path: str | Path) -> Settings:
    """Read and validate a YAML config file; :class:`ConfigError` lists every problem.
    Relative paths inside the file are relative to its directory."""
    path = Path(path)
    source = str(path)
    data = parse_yaml(_read_text(path, source), source, "settings")
    return settings_from_dict(data, source, base_dir=path.absolute().parent)


def parse_yaml(text: str, source: str, what: str) -> Any:
    """YAML text -> data, duplicate keys refused; every failure is a ConfigError."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([("", _yaml_error_message(exc))], source) from exc
    except RecursionError as exc:
        raise ConfigError([("", "YAML is nested too deeply")], source) from exc
    if data is None:
        raise ConfigError([("", f"file is empty (no {what} in it)")], source)
    return data


def default_settings() -> Settings:
    """Settings used when no config file is given: three local backends, one per cloud."""
    return Settings()


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def print_problems(path: str | Path, problems: Sequence[str]) -> int:
    """``PATH: N problem(s)`` and the problems, indented, on stderr; 2, the check commands' exit status."""
    print("\n".join([f"{path}: {_plural(len(problems), 'problem')}", *(f"  {p}" for p in problems)]), file=sys.stderr)
    return 2


def check_config_command(path: str | Path) -> int:
    """``balanceiq config check FILE``: 0 and a summary, or 2 and every problem on stderr."""
    try:
        settings = load_config(path)
    except ConfigError as exc:
        return print_problems(path, [f"{field}: {msg}" if field else msg for field, msg in exc.problems])
    endpoints = sum(len(cluster.endpoints) for cluster in settings.clusters)
    counts = f"{_plural(len(settings.clusters), 'cluster')}, {_plural(endpoints, 'endpoint')}"
    print(f"OK: {path} ({counts})")
    return 0
