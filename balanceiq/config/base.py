"""What every config model shares: input limits, strict field types, the base model, validators."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

UINT32_MAX = 2**32 - 1
"""Envoy's ceiling for a load_balancing_weight and for the sum of weights in a locality."""

# Config files are kilobytes; the cap stops `config check /dev/zero` from reading forever.
_MAX_FILE_BYTES = 1024 * 1024
# Checked before pydantic sees the data: YAML aliases can expand a small file exponentially.
_MAX_VALUES = 100_000
_MAX_DEPTH = 64
_MAX_STRING = 65_536
_MAX_PATH = 4096  # PATH_MAX on Linux
# A file with thousands of mistakes is one mistake repeated; past this, the rest are counted.
_MAX_PROBLEMS = 100
# Fields whose value must never appear in an error message (messages reach logs and CI output).
_SECRET_FIELDS = frozenset({"token", "key_file", "envoy_key_file"})

Loc = tuple[str | int, ...]

# Strict: YAML yields typed scalars, so a quoted "5" where a number belongs is a mistake.
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _format_loc(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT_RE.fullmatch(part):
            out += f".{part}" if out else part
        else:
            # Keys such as "127.0.0.1:18001" contain dots: quoted, the path stays unambiguous.
            out += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out


# Cross-field rules raise one error of this type carrying every (relative loc, message)
# pair, so the loader reports each problem at its own field path.
_CROSS_FIELD = "balanceiq_cross_field"


def _cross_field_error(problems: list[tuple[Loc, str]]) -> PydanticCustomError:
    summary = "; ".join(f"{_format_loc(loc) or '<here>'}: {msg}" for loc, msg in problems)
    return PydanticCustomError(_CROSS_FIELD, "{summary}", {"summary": summary, "problems": tuple(problems)})


def _not_blank(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    if value != value.strip():
        raise ValueError(f"{what} {value!r} has leading or trailing spaces")
    return value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"URL {value!r} has no host")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError(f"URL {value!r} has an invalid port") from None
    # Callers append paths such as "/stats"; a trailing slash would double it.
    return value.rstrip("/")


def _check_path(value: Path | None) -> Path | None:
    if value is None:
        return None
    text = str(value)
    if "-----BEGIN" in text or "\n" in text:
        # A pasted PEM echoed back in the error would print a private key.
        raise ValueError("looks like PEM content, not a file path; put it in a file and give its path")
    if "\x00" in text:
        raise ValueError("path contains a NUL byte")
    if len(text) > _MAX_PATH:
        raise ValueError(f"path is {len(text)} characters long; at most {_MAX_PATH}")
    return value.expanduser()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (``127.0.0.0/8``, ``::1``)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
