"""The whole configuration: one :class:`Settings`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from balanceiq.config.base import ConfigPath, Loc, _cross_field_error, _Model
from balanceiq.config.cluster import ClusterConfig, EndpointConfig
from balanceiq.config.control import ApiConfig, ControlConfig, GuardrailConfig
from balanceiq.config.signals import PrometheusConfig, TelemetryConfig
from balanceiq.config.testbed import TestbedConfig
from balanceiq.config.transport import EnvoyConfig, XdsConfig


def _default_clusters() -> list[ClusterConfig]:
    # The three backends of the service BalanceIQ replaces, one per cloud.
    backends = [
        ("127.0.0.1:18001", "aws", "us-east-1", 0.40),
        ("127.0.0.1:18002", "gcp", "us-central1", 0.35),
        ("127.0.0.1:18003", "azure", "eastus", 0.55),
    ]
    endpoints = [
        EndpointConfig(address=address, cloud=cloud, region=region, cost_per_million_requests=cost)
        for address, cloud, region, cost in backends
    ]
    return [ClusterConfig(name="my_service", endpoints=endpoints)]


class Settings(_Model):
    """Everything BalanceIQ needs to run; the root of ``balanceiq.yaml``."""

    clusters: list[ClusterConfig] = Field(default_factory=_default_clusters)
    """Envoy clusters whose weights BalanceIQ sets."""

    xds: XdsConfig = Field(default_factory=XdsConfig)
    """xDS server settings."""

    envoy: EnvoyConfig = Field(default_factory=EnvoyConfig)
    """Envoy admin and listener."""

    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)
    """Prometheus server."""

    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    """How observations are read."""

    control: ControlConfig = Field(default_factory=ControlConfig)
    """Control loop settings."""

    guardrails: GuardrailConfig = Field(default_factory=GuardrailConfig)
    """Limits between the LP and the store."""

    api: ApiConfig = Field(default_factory=ApiConfig)
    """HTTP API and dashboard."""

    testbed: TestbedConfig = Field(default_factory=TestbedConfig)
    """Local testbed behaviour."""

    state_dir: ConfigPath = Path(".state")
    """Directory for persisted xDS state."""

    @field_validator("clusters")
    @classmethod
    def _check_clusters(cls, clusters: list[ClusterConfig]) -> list[ClusterConfig]:
        if not clusters:
            raise ValueError("at least one cluster is required")
        problems: list[tuple[Loc, str]] = []
        first_seen: dict[str, int] = {}
        for index, cluster in enumerate(clusters):
            first = first_seen.setdefault(cluster.name, index)
            if first != index:
                message = f"duplicate cluster name {cluster.name!r}: clusters[{first}] has it too"
                problems.append(((index, "name"), message))
        if problems:
            raise _cross_field_error(problems)
        return clusters

    @model_validator(mode="after")
    def _check_overrides_known(self) -> Settings:
        known = {ep.address for cluster in self.clusters for ep in cluster.endpoints}
        if unknown := [address for address in self.testbed.overrides if address not in known]:
            message = "no configured endpoint has this address"
            raise _cross_field_error([(("testbed", "overrides", address), message) for address in unknown])
        return self

    def cluster(self, name: str) -> ClusterConfig:
        """The cluster called ``name``; ``KeyError`` naming the known clusters otherwise."""
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        known = ", ".join(c.name for c in self.clusters)
        raise KeyError(f"no cluster named {name!r}; configured clusters: {known}")
