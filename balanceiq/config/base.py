"""What every config model shares: strict field types, validators, ``host:port`` addresses, the base model."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

UINT32_MAX = 2**32 - 1
"""Envoy's ceiling for a load_balancing_weight and for the sum of weights in a locality."""

_MAX_PATH = 4096  # PATH_MAX on Linux

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


def _check_path(value: Path) -> Path:
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


_HOSTNAME_RE = re.compile(
    r"(?=.*[A-Za-z])[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?"
)


def _parse_port(text: str, address: str) -> int:
    if not text:
        raise ValueError(f"{address!r} has no port; expected host:port, e.g. 127.0.0.1:8080")
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"port {text!r} in {address!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} in {address!r} is out of range 1..65535")
    return port


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 ``"[::1]:port"``) -> canonical IP and port. ``ValueError`` (its message meant
    for users) for anything else, hostnames too: Envoy does not resolve names in EDS endpoints."""
    if not isinstance(address, str):
        raise ValueError(f"address must be a string like '127.0.0.1:8080', got {address!r}")
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            raise ValueError(f"{address!r} has '[' without ']'; expected e.g. [::1]:8080")
        host, rest = address[1:close], address[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"{address!r} has no port; expected e.g. [::1]:8080")
        port = _parse_port(rest[1:], address)
        try:
            return str(ipaddress.IPv6Address(host)), port
        except ValueError:
            raise ValueError(f"{host!r} inside brackets is not an IPv6 address; brackets are only for IPv6") from None
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError(f"{address!r} is not host:port; expected e.g. 127.0.0.1:8080 or [::1]:8080")
    if ":" in host:
        raise ValueError(f"IPv6 addresses need brackets around the host, e.g. [{host}]:{port_text}")
    port = _parse_port(port_text, address)
    if not host:
        raise ValueError(f"{address!r} has no host; expected e.g. 127.0.0.1:{port}")
    try:
        return str(ipaddress.IPv4Address(host)), port
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    if _HOSTNAME_RE.fullmatch(host):
        raise ValueError(
            f"{host!r} is a hostname; Envoy does not resolve names in EDS endpoints, "
            "so use an IPv4 or IPv6 literal (e.g. 10.0.0.5:8080 or [::1]:8080)"
        )
    raise ValueError(f"{host!r} is not an IPv4 or IPv6 address")


def _canonical_address(address: str) -> str:
    host, port = split_address(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


NonBlank = Annotated[str, AfterValidator(lambda value, info: _not_blank(value, str(info.field_name)))]
HttpUrlStr = Annotated[str, AfterValidator(_http_url)]
Address = Annotated[str, AfterValidator(_canonical_address)]
ConfigPath = Annotated[Path, AfterValidator(_check_path)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
