"""What the testbed's sample backends do, from the config's ``testbed:`` section."""

from __future__ import annotations

from balanceiq.config import BackendProfile, EndpointConfig, TestbedConfig


def profile_for(testbed: TestbedConfig, ep: EndpointConfig) -> tuple[float, int, float]:
    """``(base_latency_ms, concurrency, error_rate)`` the testbed gives ``ep``: its override, else
    ``cloud/region``, else ``cloud``, else the default."""
    override = testbed.overrides.get(ep.address, BackendProfile())
    latency = override.base_latency_ms
    if latency is None:
        by_cloud = testbed.base_latency_ms.get(ep.cloud, testbed.default_latency_ms)
        latency = testbed.base_latency_ms.get(f"{ep.cloud}/{ep.region}", by_cloud)
    concurrency = override.concurrency if override.concurrency is not None else testbed.concurrency
    error_rate = override.error_rate if override.error_rate is not None else 0.0
    return latency, concurrency, error_rate


def behaviour_for(testbed: TestbedConfig, ep: EndpointConfig) -> dict[str, float | int]:
    """Every backend setting the testbed gives ``ep``: :func:`profile_for`'s three plus ``sigma``,
    ``tail_prob`` and ``tail_ms`` where an override sets them."""
    latency, concurrency, error_rate = profile_for(testbed, ep)
    override = testbed.overrides.get(ep.address, BackendProfile())
    tail = override.model_dump(include={"sigma", "tail_prob", "tail_ms"}, exclude_none=True)
    return {"base_latency_ms": latency, "concurrency": concurrency, "error_rate": error_rate, **tail}
