"""``balanceiq train --address``: whether a live Ray cluster answers there, in seconds."""

from __future__ import annotations

import socket


def _reachable(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _speaks_grpc(host: str, port: int, timeout: float) -> str | None:
    """Why ``host:port`` is not Ray's GCS (no gRPC), or None: ``ray.init`` would retry with pages of warnings."""
    import grpc

    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return None
    except grpc.FutureTimeoutError:
        return f"it does not answer gRPC within {timeout:g}s, so it is not Ray's GCS"
    finally:
        channel.close()


def check_ray_address(address: str, timeout: float = 5.0) -> str | None:
    """Why ``address`` cannot be a live Ray cluster, or ``None``, in ``timeout`` seconds; ``auto``
    is resolved by Ray's own rules, so a stale address file is caught too."""
    shown = address
    if address == "auto":
        from ray._common.utils import get_ray_address_file
        from ray._private.services import canonicalize_bootstrap_address

        try:
            resolved = canonicalize_bootstrap_address("auto")
        except ConnectionError as exc:
            return f"auto: {exc}"
        if resolved is None:
            return "auto: no running Ray cluster found"
        shown = f"auto (= {resolved}: RAY_ADDRESS, {get_ray_address_file(None)} or the local GCS)"
        address = resolved
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    elif scheme != "ray":
        return f"{address}: expected auto, HOST:PORT or ray://HOST:PORT"
    host, colon, port = rest.rpartition(":")
    if scheme == "ray" and not colon:
        host, port = rest, "10001"  # the Ray Client server's default port
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{address}: expected auto, HOST:PORT or ray://HOST:PORT"
    if why := _reachable(host, int(port), timeout):
        return f"{shown}: nothing answers at {host}:{port} ({why}); is the cluster up (`ray status`)?"
    if why := _speaks_grpc(host, int(port), timeout):
        return f"{shown}: something listens at {host}:{port}, but {why}; is this the head's GCS port (6379)?"
    return None
