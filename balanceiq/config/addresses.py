"""``host:port`` addresses: parsing (IPv4, bracketed IPv6, hostnames) and canonical form."""

from __future__ import annotations

import ipaddress
import re

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
    """Split ``"host:port"`` (IPv6 as ``"[::1]:port"``) into a canonical IP and a port.

    The host must be an IP literal: Envoy does not resolve names in EDS endpoints.
    Raises ``ValueError`` with a message meant for users."""
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
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} inside brackets is not an IPv6 address; brackets are only for IPv6") from None
        return str(ip), port
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


def format_address(host: str, port: int) -> str:
    """Inverse of :func:`split_address`: brackets go around IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _canonical_address(address: str) -> str:
    return format_address(*split_address(address))
