"""Reaching the running stack: connect to the local Ray cluster and call the xDS actor."""

from __future__ import annotations

from typing import Any

from balanceiq.exceptions import BalanceIQError, TestbedError


def connect_ray() -> None:
    """Connect this driver to the local Ray cluster (TestbedError if none is running)."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address="auto", namespace="balanceiq", log_to_driver=False)
    except ConnectionError:
        raise TestbedError("no Ray cluster is running (start one with `balanceiq testbed up`)") from None


def actor_call(method: str, *args: Any) -> Any:
    """Call the named xDS actor's ``method`` (its own errors re-raised as they are)."""
    import ray

    from balanceiq.xds.actor import get_actor

    connect_ray()
    try:
        actor = get_actor()
    except ValueError as exc:
        raise TestbedError("no xDS actor is running (start it with `balanceiq testbed up`)") from exc
    try:
        return ray.get(getattr(actor, method).remote(*args), timeout=30)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", exc)
        if isinstance(cause, BalanceIQError):
            raise cause from exc
        raise TestbedError(f"xDS actor call {method} failed: {cause}") from exc
