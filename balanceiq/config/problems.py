"""Validation errors as ``(field path, message)`` pairs a person can act on."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from balanceiq.config.base import _CROSS_FIELD, Loc, _format_loc
from balanceiq.config.settings import Settings

# Checked before pydantic sees the data: YAML aliases can expand a small file exponentially.
_MAX_VALUES = 100_000
_MAX_DEPTH = 64
_MAX_STRING = 65_536
# A file with thousands of mistakes is one mistake repeated; past this, the rest are counted.
_MAX_PROBLEMS = 100
# Fields whose value must never appear in an error message (messages reach logs and CI output).
_SECRET_FIELDS = frozenset({"token", "key_file", "envoy_key_file"})


def _unwrap_annotation(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap_annotation(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap_annotation(arg)]
    return [annotation]


def _model_at(loc: Loc, root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The model class that validates the mapping at ``loc`` below ``root`` (Settings)."""
    candidates: list[Any] = [root or Settings]
    for part in loc:
        following: list[Any] = []
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                field = candidate.model_fields.get(part) if isinstance(part, str) else None
                if field is not None:
                    following += _unwrap_annotation(field.annotation)
            elif typing.get_origin(candidate) in (list, dict):
                following += _unwrap_annotation(typing.get_args(candidate)[-1])
        candidates = following
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _unknown_key_message(loc: Loc, root: type[BaseModel] | None = None) -> str:
    model = _model_at(loc[:-1], root)
    if model is None:
        return "unknown key"
    allowed = list(model.model_fields)
    if close := difflib.get_close_matches(str(loc[-1]), allowed, n=1):
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; allowed keys: {', '.join(allowed)}"


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4,300-digit str() limit (a hex or binary literal)
        digits = int(value.bit_length() * 0.30103) + 1 if isinstance(value, int) else 0
        text = f"<a number with about {digits} digits>"
    return text if len(text) <= 60 else text[:57] + "..."


def validation_problems(exc: ValidationError, root: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    """``(field_path, message)`` for every error, unknown keys with a suggestion; ``root`` is
    the model validated (default :class:`Settings`)."""
    problems: list[tuple[str, str]] = []
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        kind = error["type"]
        ctx = error.get("ctx") or {}
        if kind == _CROSS_FIELD:
            problems += [(_format_loc(loc + tuple(sub_loc)), message) for sub_loc, message in ctx["problems"]]
            continue
        if kind == "extra_forbidden":
            message = _unknown_key_message(loc, root)
        elif kind == "missing":
            message = "required key is missing"
        elif kind in ("value_error", "assertion_error") and "error" in ctx:
            message = str(ctx["error"])
        else:
            message = error["msg"]
            value = error.get("input")
            if loc and loc[-1] in _SECRET_FIELDS:
                message += " (value not shown: it is a secret)"
            elif not isinstance(value, (dict, list)):
                message += f" (got {_short_repr(value)})"
        if loc and loc[-1] == "[key]":
            # pydantic's marker for "the dict key itself", not a key named "[key]".
            loc, message = loc[:-1], f"invalid key: {message}"
        problems.append((_format_loc(loc), message))
    return _capped(problems)


def _capped(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if len(problems) <= _MAX_PROBLEMS:
        return problems
    more = len(problems) - _MAX_PROBLEMS
    return problems[:_MAX_PROBLEMS] + [("", f"... and {more} more problem(s) not shown")]


def _shape_problems(data: Any) -> list[tuple[str, str]]:
    """Problems in the raw data's shape pydantic should never be handed: more than
    ``_MAX_VALUES`` values (aliases counted per reference), alias cycles, deep nesting, long strings."""
    problems: list[tuple[str, str]] = []
    seen = 0
    active: set[int] = set()  # containers on the current path: a repeat is a cycle

    def walk(value: Any, loc: Loc) -> bool:
        nonlocal seen
        seen += 1
        if seen > _MAX_VALUES:
            problems.append(
                (_format_loc(loc[:1]), f"more than {_MAX_VALUES} values (YAML aliases expanding?); not a config file")
            )
            return False
        if isinstance(value, str):
            if len(value) > _MAX_STRING:
                problems.append((_format_loc(loc), f"value is {len(value)} characters long; at most {_MAX_STRING}"))
            return True
        if not isinstance(value, (Mapping, list)):
            return True
        if len(loc) >= _MAX_DEPTH:
            problems.append((_format_loc(loc), f"nested more than {_MAX_DEPTH} levels deep"))
            return True
        if id(value) in active:
            problems.append((_format_loc(loc), "refers to itself (a YAML alias cycle)"))
            return True
        active.add(id(value))
        for key, child in value.items() if isinstance(value, Mapping) else enumerate(value):
            if not walk(child, (*loc, key if isinstance(key, (str, int)) else str(key))):
                return False  # the walk stops here: ``active`` is no longer needed
        active.discard(id(value))
        return True

    walk(data, ())
    return _capped(problems)
