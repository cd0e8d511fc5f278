"""The clusters BalanceIQ steers and their endpoints."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from balanceiq.config.base import (
    UINT32_MAX,
    Address,
    Loc,
    NonBlank,
    NonNegFloat,
    PosFloat,
    _cross_field_error,
    _Model,
    split_address,
)


class EndpointConfig(_Model):
    """One backend Envoy sends traffic to, and what it costs."""

    address: Address
    """Backend as host:port; host is an IPv4 or [IPv6] literal."""

    cloud: NonBlank
    """Cloud provider, e.g. aws, gcp, azure."""

    region: NonBlank
    """Cloud region, e.g. us-east-1."""

    zone: NonBlank | None = None
    """Availability zone, if known."""

    cost_per_million_requests: NonNegFloat = 0.0
    """Cost in currency units per million requests (>= 0)."""

    weight: int = Field(default=1, ge=1, le=UINT32_MAX, strict=True)
    """Initial Envoy load_balancing_weight (1..2**32-1)."""

    capacity_rps: PosFloat | None = None
    """Optional capacity hint in requests per second (> 0)."""

    @field_validator("cloud")
    @classmethod
    def _check_cloud(cls, value: str) -> str:
        if "/" in value:
            # testbed.base_latency_ms keys are "cloud" or "cloud/region".
            raise ValueError(f"cloud {value!r} must not contain '/'")
        return value

    @property
    def host(self) -> str:
        """The IP address, without IPv6 brackets."""
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        """The TCP port."""
        return split_address(self.address)[1]


class ClusterConfig(_Model):
    """An Envoy cluster: a named set of endpoints whose weights the controller sets."""

    name: str = "my_service"
    """Envoy cluster name ([A-Za-z0-9_.-]+)."""

    endpoints: list[EndpointConfig]
    """Backends of this cluster (at least one)."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise ValueError(f"cluster name {value!r} must be non-empty and use only letters, digits, '_', '.' and '-'")
        return value

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, endpoints: list[EndpointConfig]) -> list[EndpointConfig]:
        if not endpoints:
            raise ValueError("a cluster needs at least one endpoint")
        problems: list[tuple[Loc, str]] = []
        first_seen: dict[str, int] = {}
        by_locality: dict[tuple[str, str, str | None], list[int]] = {}
        for index, endpoint in enumerate(endpoints):
            # Endpoints sharing (cloud, region, zone) form one Envoy locality.
            by_locality.setdefault((endpoint.cloud, endpoint.region, endpoint.zone), []).append(index)
            first = first_seen.setdefault(endpoint.address, index)
            if first != index:
                message = f"duplicate address {endpoint.address}: endpoints[{first}] and endpoints[{index}] both use it"
                problems.append(((index, "address"), message))
        for (cloud, region, zone), indices in by_locality.items():
            total = sum(endpoints[i].weight for i in indices)
            if total > UINT32_MAX:
                where = "/".join(part for part in (cloud, region, zone) if part)
                message = (
                    f"weights of locality {where} (endpoints {indices}) sum to {total}; "
                    f"Envoy requires the sum per locality to fit in uint32 ({UINT32_MAX})"
                )
                problems.append(((), message))
        if problems:
            raise _cross_field_error(problems)
        return endpoints
