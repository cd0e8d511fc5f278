"""BalanceIQ configuration: one YAML file, validated by pydantic.

Every model is frozen and refuses unknown keys, so a typo such as ``wieght`` is reported
instead of silently falling back to a default. :func:`load_config` turns every problem in
a file (YAML syntax, wrong types, cross-field rules) into one :class:`ConfigError` whose
``problems`` name the offending field, e.g. ``clusters[0].endpoints[2].address``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import stat
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from balanceiq.exceptions import ConfigError

__all__ = [
    "UINT32_MAX",
    "BackendProfile",
    "ClusterConfig",
    "ControlConfig",
    "EndpointConfig",
    "EnvoyConfig",
    "PrometheusConfig",
    "Settings",
    "TestbedConfig",
    "TlsConfig",
    "XdsConfig",
    "check_config_command",
    "default_settings",
    "format_address",
    "is_loopback",
    "load_config",
    "settings_from_dict",
    "split_address",
]

UINT32_MAX = 2**32 - 1
"""Envoy's ceiling for a load_balancing_weight and for the sum of weights in a locality."""

# A config file is a few kilobytes (the 6-endpoint sample is 5 KiB; 1,000 endpoints are
# ~150 KiB). The cap keeps `config check /dev/zero`-like mistakes from reading forever and
# bounds the pure-Python YAML parse to about a second.
_MAX_FILE_BYTES = 1024 * 1024
# Limits on the parsed data, checked before pydantic sees it: YAML aliases can make a
# small file expand exponentially ("billion laughs"), and pydantic would then validate,
# and report an error for, every expanded value.
_MAX_VALUES = 100_000
_MAX_DEPTH = 64
_MAX_STRING = 65_536
_MAX_PATH = 4096  # PATH_MAX on Linux
# A file with thousands of mistakes is one mistake repeated; past this, the rest are counted.
_MAX_PROBLEMS = 100
# Fields whose value must never appear in an error message (messages reach logs and CI output).
_SECRET_FIELDS = frozenset({"token", "key_file", "envoy_key_file"})

Loc = tuple[str | int, ...]

# Strict numbers: YAML already yields typed scalars, so a quoted "5" or a `yes` where a
# number belongs is far more likely a mistake than something to coerce.
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


# --------------------------------------------------------------------------- addresses

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

    The host must be an IP literal: Envoy takes EDS endpoint addresses as they are and
    does not resolve DNS names there, so a hostname would be rejected by Envoy only
    later, at runtime. Raises ``ValueError`` with a message meant for users.
    """
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


# --------------------------------------------------------------------------- helpers

# Cross-field rules find problems in fields below the model they run on. They raise one
# error of this type whose context carries every (relative loc, message) pair, so the
# loader can report each problem at its own field path; pydantic's own str() of the
# error still reads well thanks to the summary.
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


def _expand_user(value: Path | None) -> Path | None:
    return value.expanduser() if value is not None else None


def _check_path(value: Path | None) -> Path | None:
    if value is None:
        return None
    text = str(value)
    if "-----BEGIN" in text or "\n" in text:
        # Pasting the PEM itself where a file name belongs is a common slip; echoing it
        # back in the error would print a private key.
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


# --------------------------------------------------------------------------- models


class EndpointConfig(_Model):
    """One backend Envoy sends traffic to, and what it costs."""

    address: str = Field(description="Backend as host:port; host is an IPv4 or [IPv6] literal.")
    """Backend as ``host:port``. The host must be an IP literal (IPv6 in brackets, e.g.
    ``[::1]:8080``) because Envoy does not resolve names in EDS endpoints. Stored in
    canonical form, so ``[::0:1]:80`` and ``[::1]:80`` are recognised as the same."""

    cloud: str = Field(description="Cloud provider, e.g. aws, gcp, azure.")
    """Cloud provider the backend runs in (``aws``, ``gcp``, ``azure``...); part of the
    Envoy locality and the key for per-cloud testbed latencies."""

    region: str = Field(description="Cloud region, e.g. us-east-1.")
    """Region within the cloud; part of the Envoy locality."""

    zone: str | None = Field(default=None, description="Availability zone, if known.")
    """Availability zone within the region; part of the Envoy locality when set."""

    cost_per_million_requests: NonNegFloat = Field(
        default=0.0, description="Cost in currency units per million requests (>= 0)."
    )
    """What a million requests served here cost; the LP's cost term and the reward use
    it to prefer cheaper backends when latency allows."""

    weight: int = Field(
        default=1,
        ge=1,
        le=UINT32_MAX,
        strict=True,
        description="Initial Envoy load_balancing_weight (1..2**32-1).",
    )
    """Initial Envoy ``load_balancing_weight`` before the controller has decided
    anything. Envoy refuses 0 and anything above uint32."""

    capacity_rps: PosFloat | None = Field(
        default=None, description="Optional capacity hint in requests per second (> 0)."
    )
    """Requests per second the backend is expected to sustain. Only a hint: the
    controller estimates capacity from telemetry and uses this as a prior."""

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        return _canonical_address(value)

    @field_validator("cloud")
    @classmethod
    def _check_cloud(cls, value: str) -> str:
        _not_blank(value, "cloud")
        if "/" in value:
            # testbed.base_latency_ms keys are "cloud" or "cloud/region".
            raise ValueError(f"cloud {value!r} must not contain '/'")
        return value

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        return _not_blank(value, "region")

    @field_validator("zone")
    @classmethod
    def _check_zone(cls, value: str | None) -> str | None:
        return None if value is None else _not_blank(value, "zone")

    @property
    def host(self) -> str:
        """The IP address, without IPv6 brackets."""
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        """The TCP port."""
        return split_address(self.address)[1]

    @property
    def locality(self) -> tuple[str, str, str | None]:
        """``(cloud, region, zone)``: endpoints sharing it form one Envoy locality."""
        return (self.cloud, self.region, self.zone)


def _default_endpoints() -> list[EndpointConfig]:
    # The three backends of the service BalanceIQ replaces, one per cloud.
    backends = [
        ("127.0.0.1:18001", "aws", "us-east-1", 0.40),
        ("127.0.0.1:18002", "gcp", "us-central1", 0.35),
        ("127.0.0.1:18003", "azure", "eastus", 0.55),
    ]
    return [
        EndpointConfig(address=address, cloud=cloud, region=region, cost_per_million_requests=cost)
        for address, cloud, region, cost in backends
    ]


class ClusterConfig(_Model):
    """An Envoy cluster: a named set of endpoints whose weights the controller sets."""

    name: str = Field(default="my_service", description="Envoy cluster name ([A-Za-z0-9_.-]+).")
    """Envoy cluster name. Envoy's routes and stats refer to it, so it is limited to
    characters that are safe in both: letters, digits, ``_``, ``.`` and ``-``."""

    endpoints: list[EndpointConfig] = Field(description="Backends of this cluster (at least one).")
    """Backends of this cluster. Addresses must be unique within the cluster."""

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
        for index, endpoint in enumerate(endpoints):
            first = first_seen.setdefault(endpoint.address, index)
            if first != index:
                message = f"duplicate address {endpoint.address}: endpoints[{first}] and endpoints[{index}] both use it"
                problems.append(((index, "address"), message))
        by_locality: dict[tuple[str, str, str | None], list[int]] = {}
        for index, endpoint in enumerate(endpoints):
            by_locality.setdefault(endpoint.locality, []).append(index)
        for (cloud, region, zone), indices in by_locality.items():
            total = sum(endpoints[i].weight for i in indices)
            if total > UINT32_MAX:
                where = "/".join(part for part in (cloud, region, zone) if part)
                problems.append(
                    (
                        (),
                        f"weights of locality {where} (endpoints {indices}) sum to {total}; "
                        f"Envoy requires the sum per locality to fit in uint32 ({UINT32_MAX})",
                    )
                )
        if problems:
            raise _cross_field_error(problems)
        return endpoints


class TlsConfig(_Model):
    """TLS for the xDS gRPC server Envoy connects to."""

    enabled: StrictBool = Field(default=False, description="Serve xDS over TLS.")
    """Serve xDS over TLS. Off by default because the default server listens on
    loopback only; turn it on whenever Envoy reaches the server over a network."""

    cert_file: Path | None = Field(default=None, description="PEM server certificate (chain).")
    """PEM server certificate, optionally followed by its chain. Required when enabled.
    Relative paths are relative to the config file's directory."""

    key_file: Path | None = Field(default=None, description="PEM private key of cert_file.")
    """PEM private key for ``cert_file``. Required when enabled."""

    ca_file: Path | None = Field(default=None, description="PEM CA bundle for client certs.")
    """PEM CA bundle that client (Envoy) certificates must chain to. Required when
    ``require_client_cert`` is true."""

    require_client_cert: StrictBool = Field(
        default=False, description="Require and verify an Envoy client certificate (mTLS)."
    )
    """Require Envoy to present a certificate signed by ``ca_file`` (mutual TLS), so
    only trusted proxies can read the endpoint assignment."""

    envoy_ca_file: Path | None = Field(
        default=None, description="PEM CA Envoy uses to verify the xDS server certificate."
    )
    """PEM CA bundle that the generated Envoy bootstrap uses to verify the xDS server's
    certificate. Needed to render a bootstrap when TLS is enabled: an Envoy that does not
    verify its control plane can be fed any endpoints."""

    envoy_cert_file: Path | None = Field(default=None, description="PEM client certificate Envoy presents (mTLS).")
    """PEM certificate the generated Envoy bootstrap presents to the xDS server when
    ``require_client_cert`` is true; it must chain to ``ca_file``."""

    envoy_key_file: Path | None = Field(default=None, description="PEM private key of envoy_cert_file.")
    """PEM private key for ``envoy_cert_file``."""

    server_name: str | None = Field(
        default=None, description="Name (SNI and SAN) Envoy expects on the server certificate."
    )
    """If set, Envoy sends it as SNI and accepts only a server certificate whose subject
    alternative names include it."""

    @field_validator("cert_file", "key_file", "ca_file", "envoy_ca_file", "envoy_cert_file", "envoy_key_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return _check_path(value)

    @model_validator(mode="after")
    def _check_requirements(self) -> TlsConfig:
        problems: list[tuple[Loc, str]] = []
        if self.enabled:
            if self.cert_file is None:
                problems.append((("cert_file",), "required when enabled is true"))
            if self.key_file is None:
                problems.append((("key_file",), "required when enabled is true"))
        if self.require_client_cert:
            if not self.enabled:
                # Asking for mTLS while serving plaintext is a security surprise, not a no-op.
                message = "needs enabled: true; without TLS no client certificate is checked"
                problems.append((("require_client_cert",), message))
            if self.ca_file is None:
                message = "required when require_client_cert is true (client certificates are verified against it)"
                problems.append((("ca_file",), message))
        if (self.envoy_cert_file is None) != (self.envoy_key_file is None):
            missing = "envoy_key_file" if self.envoy_key_file is None else "envoy_cert_file"
            problems.append(((missing,), "envoy_cert_file and envoy_key_file go together"))
        if problems:
            raise _cross_field_error(problems)
        return self


class XdsConfig(_Model):
    """The xDS gRPC server (a Ray actor) that streams endpoint weights to Envoy."""

    host: str = Field(default="127.0.0.1", description="Address the xDS server binds.")
    """Address the xDS gRPC server binds. Loopback by default: anyone who can reach it
    could read the endpoint assignment."""

    port: Port = Field(default=50051, description="TCP port of the xDS server (1..65535).")
    """TCP port of the xDS server; Envoy's bootstrap points here."""

    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS for the xDS server.")
    """TLS settings for the xDS server."""

    api: Literal["ads-sotw", "ads-delta", "eds-sotw", "eds-delta"] = Field(
        default="ads-sotw", description="xDS flavour the Envoy bootstrap uses."
    )
    """Which xDS flavour the generated Envoy bootstrap uses: aggregated (ADS) or plain
    EDS, state-of-the-world or incremental (delta)."""

    allow_insecure_remote: StrictBool = Field(
        default=False, description="Allow a non-loopback host without mutual TLS (not recommended)."
    )
    """A non-loopback ``host`` is refused unless ``tls.enabled`` and
    ``tls.require_client_cert`` are both on: Envoy applies whatever its management server
    sends, and without mutual TLS anyone who reaches the port reads every endpoint and
    can pose as an Envoy. Set this to serve a network anyway (a trusted private network,
    or TLS terminated by a sidecar); the server logs a warning at start."""

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        return _not_blank(value, "host")

    @model_validator(mode="after")
    def _remote_needs_mtls(self) -> XdsConfig:
        if is_loopback(self.host) or self.allow_insecure_remote:
            return self
        if self.tls.enabled and self.tls.require_client_cert:
            return self
        message = (
            f"{self.host} is not a loopback address and the server has no mutual TLS; "
            "set tls.enabled and tls.require_client_cert (see SECURITY.md), "
            "or allow_insecure_remote: true to accept the risk"
        )
        raise _cross_field_error([(("host",), message)])


class EnvoyConfig(_Model):
    """Where Envoy's admin interface is and where Envoy accepts client traffic."""

    admin_url: str = Field(default="http://127.0.0.1:9901", description="Envoy admin http(s) URL.")
    """Base URL of Envoy's admin interface, used for readiness and stats. Keep it on
    loopback: the admin API can change Envoy's state."""

    listen_host: str = Field(default="127.0.0.1", description="Address Envoy's proxy listener binds.")
    """Address Envoy's proxy listener binds."""

    listen_port: Port = Field(default=10000, description="Port of Envoy's proxy listener.")
    """Port clients send traffic to."""

    allow_remote_admin: StrictBool = Field(default=False, description="Allow an admin_url host that is not loopback.")
    """Envoy's admin interface has no authentication and can stop Envoy, change its
    logging and drain its listeners, so a non-loopback ``admin_url`` (which the generated
    bootstrap binds) is refused unless this is set. Set it when the admin port is
    reachable only from a trusted network, e.g. the controller reads a remote Envoy."""

    lb_policy: Literal["LEAST_REQUEST", "ROUND_ROBIN"] = Field(
        default="LEAST_REQUEST", description="Envoy's balancer under BalanceIQ's weights."
    )
    """The ``lb_policy`` of the steered clusters: what the generated bootstrap sets, and
    what the controller writes weights for (under LEAST_REQUEST Envoy picks by
    ``weight / (active + 1)``, which the controller compensates so the intended shares
    are what the endpoints get). LEAST_REQUEST (default) also lets Envoy itself steer
    away from an endpoint whose requests pile up between two decisions."""

    update_merge_window_ms: int = Field(
        default=0, ge=0, strict=True, description="Envoy cluster update merge window in ms (>= 0)."
    )
    """How long Envoy merges successive EDS updates before rebuilding its load balancer.
    0 applies every weight change immediately, which is what a controller wants to
    measure; raise it if updates are very frequent."""

    @field_validator("admin_url")
    @classmethod
    def _check_admin_url(cls, value: str) -> str:
        return _http_url(value)

    @model_validator(mode="after")
    def _admin_on_loopback(self) -> EnvoyConfig:
        host = urlsplit(self.admin_url).hostname or ""
        if is_loopback(host) or self.allow_remote_admin:
            return self
        message = (
            f"{host} is not a loopback address; Envoy's admin has no authentication "
            "(keep it on 127.0.0.1, or set allow_remote_admin: true)"
        )
        raise _cross_field_error([(("admin_url",), message)])

    @field_validator("listen_host")
    @classmethod
    def _check_listen_host(cls, value: str) -> str:
        return _not_blank(value, "listen_host")


class PrometheusConfig(_Model):
    """The Prometheus server the controller queries for telemetry."""

    url: str = Field(default="http://127.0.0.1:9090", description="Prometheus http(s) base URL.")
    """Base URL of the Prometheus HTTP API (without ``/api/v1``). The testbed starts its
    own Prometheus on this host and port."""

    scrape_interval_s: PosFloat = Field(default=1.0, description="Testbed scrape interval (s).")
    """How often the testbed's Prometheus scrapes Envoy, the backends and the ALS
    exporter. 1-2 s keeps observations fresh enough for a 5 s control interval."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _http_url(value)


def _envoy_query(expr: str) -> SignalQuery:
    return SignalQuery(promql=expr, endpoint_label="envoy_endpoint_address")


_ENVOY_SEL = 'envoy_cluster_name="$cluster"'


def _raw_latency() -> dict[str, SignalQuery]:
    rate = 'sum by (endpoint, le) (rate(balanceiq_upstream_rq_time_seconds_bucket{cluster="$cluster"}[$window]))'
    return {
        name: SignalQuery(promql=f"histogram_quantile({q}, {rate}) * 1000", endpoint_label="endpoint")
        for name, q in (("p50_ms", "0.5"), ("p95_ms", "0.95"))
    }


def _recorded_latency() -> dict[str, SignalQuery]:
    # Series precomputed by the recording rules in prometheus/rules.yml: quantiles over
    # 100 endpoints x 35 buckets cost Prometheus tens of ms per query, a lookup ~1 ms.
    return {
        name: SignalQuery(promql=f'balanceiq:upstream_rq_time_ms:{q}{{cluster="$cluster"}}', endpoint_label="endpoint")
        for name, q in (("p50_ms", "p50"), ("p95_ms", "p95"))
    }


def _default_queries(recording_rules: bool = True) -> dict[str, SignalQuery]:
    by = "sum by (envoy_endpoint_address)"
    return {
        "rps": _envoy_query(f"{by} (rate(envoy_cluster_endpoint_rq_total{{{_ENVOY_SEL}}}[$window]))"),
        # Envoy counts 5xx answers, timeouts and connect failures in rq_error, but a
        # connect failure never reaches rq_total: the error rate is errors over
        # completed (success + error) requests, computed in Python so an idle endpoint
        # reads "no traffic", not 0/0, and a dead one reads 1.0, not "idle".
        "errors": _envoy_query(f"{by} (rate(envoy_cluster_endpoint_rq_error{{{_ENVOY_SEL}}}[$window]))"),
        "success": _envoy_query(f"{by} (rate(envoy_cluster_endpoint_rq_success{{{_ENVOY_SEL}}}[$window]))"),
        "inflight": _envoy_query(f"{by} (envoy_cluster_endpoint_rq_active{{{_ENVOY_SEL}}})"),
        "healthy": _envoy_query(f"min by (envoy_endpoint_address) (envoy_cluster_endpoint_healthy{{{_ENVOY_SEL}}})"),
        "last_sample": _envoy_query(
            f"max by (envoy_endpoint_address) (timestamp(envoy_cluster_endpoint_rq_total{{{_ENVOY_SEL}}}))"
        ),
        # Latency from BalanceIQ's ALS exporter: Envoy's view of each upstream request.
        **(_recorded_latency() if recording_rules else _raw_latency()),
        # ORCA load reports (Envoy's standard endpoint-load-metrics header), as Envoy logs
        # them to the ALS exporter. Optional: an endpoint that sends none leaves saturation
        # unmeasured (nan) and the controller reads capacity from latency and in-flight
        # requests instead. Backends' own gauges can be used here too (BACKEND_SATURATION).
        "saturation": SignalQuery(
            promql='max by (endpoint) (avg_over_time(balanceiq_upstream_orca_utilization{cluster="$cluster"}[$window]))',
            endpoint_label="endpoint",
        ),
    }


class SignalQuery(_Model):
    """One PromQL template giving one value per endpoint."""

    promql: str = Field(description="PromQL; $cluster and $window are substituted.")
    """An instant-vector PromQL expression. ``$cluster`` becomes the cluster name and
    ``$window`` the rate window (e.g. ``10s``); ``$$`` is a literal ``$``."""

    endpoint_label: str = Field(description="Label holding the endpoint's host:port.")
    """The result label whose value is the endpoint address (``host:port``)."""

    @field_validator("promql")
    @classmethod
    def _check_template(cls, value: str) -> str:
        import string

        try:
            string.Template(value).substitute(cluster="c", window="1s")
        except (KeyError, ValueError) as exc:
            raise ValueError(f"bad placeholder in PromQL template ({exc}); use $cluster, $window, $$") from None
        return _not_blank(value, "promql")


SIGNALS = ("rps", "errors", "success", "inflight", "healthy", "last_sample", "p50_ms", "p95_ms", "saturation")

# The testbed backends' private gauges (in-flight over concurrency limit), for
# ``telemetry.queries.saturation`` on a fleet whose services export such gauges.
BACKEND_SATURATION = SignalQuery(
    promql="max by (backend) (backend_inflight_requests / backend_concurrency_limit)",
    endpoint_label="backend",
)


class TelemetryConfig(_Model):
    """How observations are read: PromQL per signal, windows, the ALS latency source."""

    window_s: PosFloat = Field(default=10.0, description="Rate window in seconds.")
    """Window of ``rate()`` and of latency quantiles. At least 4 scrape intervals, or
    rates are noise; longer smooths more and reacts later."""

    stale_after_s: PosFloat = Field(default=10.0, description="Samples older than this are stale.")
    """An endpoint whose newest sample is older than this is flagged stale."""

    timeout_s: PosFloat = Field(default=2.0, description="Timeout of one Prometheus query.")
    """Per-query timeout; past it, the observation falls back to Envoy's admin."""

    queries: dict[str, SignalQuery] = Field(default_factory=dict, description="PromQL per signal.")
    """PromQL per signal (rps, errors, success, inflight, healthy, last_sample, p50_ms,
    p95_ms, saturation). Entries given here replace the defaults one by one."""

    als_enabled: StrictBool = Field(default=True, description="Envoy streams access logs for latency.")
    """Configure Envoy's gRPC access log service so BalanceIQ measures each endpoint's
    latency as Envoy sees it (works for any backend)."""

    als_sample_percent: float = Field(default=100.0, gt=0, le=100, description="Share of requests logged.")
    """Percentage of requests Envoy streams to the ALS (sampled in Envoy, so the cost
    is bounded at high request rates)."""

    als_grpc_port: Port = Field(default=9977, description="ALS gRPC port.")
    """Port of the access log gRPC server Envoy streams to."""

    als_metrics_port: Port = Field(default=9978, description="ALS /metrics port.")
    """Port where the ALS exporter serves per-endpoint latency histograms."""

    recording_rules: StrictBool = Field(
        default=True, description="Read latency quantiles from BalanceIQ's recording rules."
    )
    """Read p50/p95 from series precomputed by the recording rules in
    ``prometheus/rules.yml`` (the testbed's Prometheus loads them). Set false for a
    Prometheus without those rules: the quantiles are then computed at query time,
    which costs tens of ms per observation at 100 endpoints."""

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        rules = data.get("recording_rules", True)
        defaults = _default_queries(rules if isinstance(rules, bool) else True)
        given = data.get("queries")
        if given is None:
            return {**data, "queries": defaults}
        if isinstance(given, Mapping):
            # str() first: YAML keys may be ints or None, which do not sort with strings.
            unknown = sorted(str(k) for k in given if k not in SIGNALS)
            if unknown:
                message = f"unknown signal(s) {', '.join(unknown)}; known: {', '.join(SIGNALS)}"
                raise _cross_field_error([(("queries",), message)])
            return {**data, "queries": {**defaults, **given}}
        return data

    @property
    def window(self) -> str:
        """The window as a PromQL duration (``10s``, ``2500ms``: no fractional units)."""
        ms = round(self.window_s * 1000)
        return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def critical_count(n_endpoints: int) -> int:
    """Default K: about 20% of N, but at least 2 (a single critical endpoint cannot move:
    its share is whatever the others leave), and never more than N."""
    if n_endpoints <= 0:
        return 0
    return min(n_endpoints, max(2, round(n_endpoints / 5)))


class ControlConfig(_Model):
    """The control loop: how often it acts and how many endpoints it re-weights."""

    mode: Literal["active", "shadow"] = Field(
        default="active", description="active: steer; shadow: decide, push nothing."
    )
    """``shadow`` observes, decides and records every decision with its estimated effect,
    but pushes nothing and takes no lease: run it beside an Envoy you already trust and
    see what it would do. Switch with ``PUT /api/policy {"control_mode": "active"}``; the
    first active step starts from the weights Envoy serves, moving at most ``max_shift``."""

    interval_s: PosFloat = Field(default=5.0, le=3600, description="Seconds between control steps (0-3600].")
    """Seconds between control steps (the original's OPTIMIZATION_INTERVAL_SECONDS).
    Shorter reacts faster but sees noisier p95 latencies."""

    k_critical: int | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="Critical endpoints per step (None: about 20% of N).",
    )
    """How many critical endpoints the policy picks each step for the LP to re-weight;
    the rest keep their share. ``None`` means about 20% of the cluster's endpoints, at
    least 2 (one critical endpoint alone cannot move). Values above N mean every
    endpoint is critical."""

    util_target: float = Field(default=0.5, ge=0.0, le=1.0, description="Utilisation that costs nothing in the LP.")
    """Headroom knee of the live LP: utilisation (load over estimated capacity) up to this
    level is free, so below it the LP sends the critical endpoints' traffic to the
    cheapest, fastest ones; above it, spreading load wins. 0 is the pure
    min-max-utilisation LP, which ignores even a 5x price gap between equal endpoints
    (moving load to the cheap one raises the maximum utilisation by more than the cost
    term saves); 0.5 (default) lets price and latency decide below half load."""

    cost_weight: float = Field(default=0.3, ge=0.0, le=100.0, description="Weight of the LP's cost term.")
    """Weight of the normalised price term (price over the fleet's highest) against
    utilisation in the live LP. Both terms are linear in the shares, and one share of
    traffic adds demand/capacity of utilisation, so the higher this weight, the more load
    a price difference can move. 0.3 (default) is commensurate with ``latency_weight`` 0.2:
    the whole price range is worth a little more than 1.5 SLOs of p95. The simulator
    trains with 0.1 (``rllib_configs/ppo.yaml``)."""

    latency_weight: float = Field(default=0.2, ge=0.0, le=100.0, description="Weight of the LP's latency term.")
    """Weight of the observed p95 latency (in units of the SLO) against utilisation in the
    live LP. Min-max utilisation is blind to an endpoint that is idle but slow (a far
    region, a slow dependency); with a knee (``util_target`` > 0) this term and the cost
    term decide where traffic goes below it, so fast, cheap endpoints fill first.
    0 is the pure CFR-RL LP; 0.2 (default) reads "moving all traffic from an endpoint
    at the SLO to an instant one is worth 0.2 of utilisation"."""

    def critical_count(self, n_endpoints: int) -> int:
        """K for a cluster of ``n_endpoints`` endpoints, clamped to ``0..n_endpoints``."""
        if self.k_critical is not None:
            return max(0, min(self.k_critical, n_endpoints))
        return critical_count(n_endpoints)


class GuardrailConfig(_Model):
    """Limits between the LP and the weight store; every decision passes through them."""

    min_share: float = Field(default=0.01, ge=0.0, lt=0.5, description="Floor share of each healthy endpoint.")
    """Floor on the traffic share of every healthy, not drained endpoint (0.01 = 1%,
    a weight of 100 out of 10,000), so the controller keeps seeing fresh latency from
    each of them. Lowered automatically when N floors would not fit."""

    max_shift: float = Field(default=0.25, gt=0.0, le=1.0, description="Max traffic moved per decision.")
    """Largest fraction of traffic one decision may move (``0.5 * sum |new - old|``).
    Moves off an endpoint that is down or drained are exempt: safety beats smoothness;
    so are moves off an endpoint breaching the SLO (see ``breach_min_share``)."""

    breach_min_share: float = Field(default=0.001, ge=0.0, lt=0.5, description="Floor share of an SLO breacher.")
    """Floor for an endpoint breaching the SLO (p95 over it, or >= 5% errors), instead of
    ``min_share``: 0.001 still sends it a trickle to see it recover, without a whole
    percent of requests paying its latency. Traffic the proposal moves off a breacher
    leaves at once, exempt from ``max_shift``, for the same reason a drain is; traffic
    moving *onto* endpoints is still ramped."""

    breach_error_rate: float = Field(default=0.01, gt=0.0, le=1.0, description="Sustained error rate that breaches.")
    """An endpoint whose error rate over the last minute or so (requests and errors
    summed over decisions, decaying with a 60 s time constant, at least 30 requests) is at
    or above this is treated as breaching the SLO, like one whose p95 is over it. One
    window rarely shows a steady 2% error rate on an endpoint that gets 1% of the traffic
    (a handful of requests); the sum does. A single window at >= 5% errors breaches at
    once."""

    breach_hold_s: float = Field(default=30.0, ge=0.0, le=86400.0, description="Seconds a quiet breacher stays one.")
    """An endpoint that breached the SLO and now carries too little traffic to measure (the
    trickle of ``breach_min_share``) is still treated as breaching for this long: held at
    its floor and out of the critical set, instead of looking unknown, bouncing back to
    ``min_share`` and failing requests again. A measurement within the SLO clears it at
    once; 0 turns the hold off."""

    rollback_after: int = Field(default=3, ge=1, le=1000, strict=True, description="Worse intervals before rollback.")
    """M: every interval the policy's proposal and the baseline's are scored on the same
    observation (negated LP objective: worst estimated load/capacity plus the cost term);
    after M consecutive intervals in which the policy scores worse, the controller rolls
    back to the baseline."""

    rollback_margin: float = Field(default=0.05, ge=0.0, le=10.0, description="Tolerance before counting as worse.")
    """How much lower (in LP objective units, where 0.05 is five points of utilisation)
    the policy's score may be before an interval counts against it; estimates are noisy."""

    probation_after: int = Field(default=3, ge=1, le=10000, strict=True, description="Good intervals to return.")
    """After a rollback, the policy keeps being scored in shadow; this many consecutive
    intervals in which it is no longer worse bring it back."""

    baseline: Literal["equal", "static", "cost_aware", "inverse_latency", "least_request"] = Field(
        default="cost_aware", description="Policy used on rollback."
    )
    """The heuristic the controller falls back to when the learned policy underperforms."""


class ApiConfig(_Model):
    """The HTTP API and dashboard served by Ray Serve."""

    host: str = Field(default="127.0.0.1", description="Address the HTTP API binds.")
    """Bind address of the API. Loopback by default: the API can change routing."""

    port: Port = Field(default=8000, description="HTTP port of the API.")
    """Where the API and dashboard are, whichever way the app was started: the Controller
    replica serves them here itself (``serve_directly``), unless Serve's HTTP proxy
    already listens here, in which case the proxy serves them."""

    serve_directly: bool = Field(default=True, description="Controller replica serves host:port itself.")
    """The Controller replica runs its own HTTP server on ``host:port`` (no proxy hop and
    no Ray task per request: a fraction of the proxy's CPU per request). Serve's HTTP
    proxy serves the same API on its own port (``http_options`` in ``serve_app.yaml``).
    False: only the proxy."""

    token: str | None = Field(
        default=None, min_length=16, max_length=4096, repr=False, description="Bearer token for mutating calls."
    )
    """Bearer token required by PUT/POST endpoints. Unset: one is generated on first
    start, written to ``state_dir/api-token`` (mode 0600) and printed once. Never logged."""

    checkpoint: Path | None = Field(default=None, description="RLModule checkpoint to serve.")
    """Checkpoint the Policy deployment loads; unset means the shipped one."""

    @field_validator("checkpoint")
    @classmethod
    def _check_checkpoint(cls, value: Path | None) -> Path | None:
        return _check_path(value)

    policy_niceness: int = Field(
        default=10, ge=0, le=19, strict=True, description="CPU niceness of the Policy deployment's replica."
    )
    """The Policy deployment (API and batch score calls) runs at this lower CPU priority
    than the Controller replica, so a flood of score calls cannot delay the control
    loop's own scoring; 0 leaves it at the default priority."""

    decision_log_size: int = Field(default=500, ge=10, le=100000, strict=True, description="Decisions kept.")
    """Decisions kept in memory for ``/api/decisions`` and the dashboard."""

    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30, strict=True, description="Largest request body.")
    """A request body larger than this is refused with 413 before it is read whole (the
    largest valid body, a 1,000-endpoint score request, is about 300 KB)."""


class BackendProfile(_Model):
    """Testbed behaviour of one backend; unset fields fall back to the testbed defaults."""

    base_latency_ms: NonNegFloat | None = Field(default=None, description="Base latency in ms (>= 0).")
    """Latency the simulated backend adds to every request."""

    concurrency: int | None = Field(default=None, ge=1, strict=True, description="Requests served in parallel (>= 1).")
    """Requests the backend serves at once; more queue, which is what makes it saturate."""

    error_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        strict=True,
        description="Fraction of requests answered 5xx (0..1).",
    )
    """Fraction of requests answered with HTTP 503, to exercise error handling."""

    sigma: float | None = Field(
        default=None,
        ge=0,
        le=3,
        allow_inf_nan=False,
        strict=True,
        description="Lognormal spread of the service time (0..3; 0 = fixed delay).",
    )
    """Heavy-tailed service times: each request's delay is ``base_latency_ms *
    exp(sigma * N(0, 1))`` (median ``base_latency_ms``, mean ``base * exp(sigma**2/2)``).
    Unset or 0: the fixed delay of earlier versions."""

    tail_prob: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        strict=True,
        description="Probability a request also waits tail_ms (0..1).",
    )
    """Probability that a request takes ``tail_ms`` longer (a brownout-like tail)."""

    tail_ms: NonNegFloat | None = Field(default=None, description="Extra latency of a tail request (ms, >= 0).")
    """Latency added to the ``tail_prob`` fraction of requests."""


# What :meth:`TestbedConfig.behaviour_for` reports beyond :meth:`TestbedConfig.profile_for`,
# only when an override sets it (the backends' own defaults otherwise).
TAIL_FIELDS = ("sigma", "tail_prob", "tail_ms")


class TestbedConfig(_Model):
    """How the local sample backends behave, so each cloud looks different."""

    __test__ = False  # not a pytest test class, despite the name

    base_latency_ms: dict[str, NonNegFloat] = Field(
        default_factory=lambda: {"aws": 15.0, "gcp": 25.0, "azure": 35.0},
        description="Base latency in ms keyed by 'cloud' or 'cloud/region'.",
    )
    """Base latency per ``cloud`` or ``cloud/region``; the more specific key wins. Makes
    the clouds differ the way real regions do, so the policy has something to learn."""

    default_latency_ms: NonNegFloat = Field(default=20.0, description="Latency for clouds not listed (ms).")
    """Base latency for endpoints whose cloud is not in ``base_latency_ms``."""

    concurrency: int = Field(default=8, ge=1, strict=True, description="Default requests served in parallel.")
    """Requests each backend serves at once unless overridden."""

    overrides: dict[str, BackendProfile] = Field(
        default_factory=dict, description="Per-backend profile keyed by endpoint address."
    )
    """Per-backend exceptions keyed by endpoint address, e.g. one slow or flaky backend.
    Every key must be the address of a configured endpoint."""

    @field_validator("base_latency_ms")
    @classmethod
    def _check_latency_keys(cls, value: dict[str, float]) -> dict[str, float]:
        problems: list[tuple[Loc, str]] = []
        for key in value:
            parts = key.split("/")
            if len(parts) > 2 or not all(part.strip() for part in parts):
                message = "key must be 'cloud' or 'cloud/region', e.g. aws or aws/us-east-1"
                problems.append(((key,), message))
        if problems:
            raise _cross_field_error(problems)
        return value

    @field_validator("overrides")
    @classmethod
    def _canonical_override_keys(cls, value: dict[str, BackendProfile]) -> dict[str, BackendProfile]:
        problems: list[tuple[Loc, str]] = []
        canonical: dict[str, BackendProfile] = {}
        original_key: dict[str, str] = {}
        for key, profile in value.items():
            try:
                address = _canonical_address(key)
            except ValueError as exc:
                problems.append(((key,), f"key is not an endpoint address: {exc}"))
                continue
            if address in canonical:
                problems.append(((key,), f"same endpoint as {original_key[address]!r}"))
                continue
            canonical[address] = profile
            original_key[address] = key
        if problems:
            raise _cross_field_error(problems)
        return canonical

    def profile_for(self, ep: EndpointConfig) -> tuple[float, int, float]:
        """``(base_latency_ms, concurrency, error_rate)`` the testbed gives ``ep``."""
        override = self.overrides.get(ep.address, BackendProfile())
        latency = override.base_latency_ms
        if latency is None:
            by_cloud = self.base_latency_ms.get(ep.cloud, self.default_latency_ms)
            latency = self.base_latency_ms.get(f"{ep.cloud}/{ep.region}", by_cloud)
        concurrency = override.concurrency if override.concurrency is not None else self.concurrency
        error_rate = override.error_rate if override.error_rate is not None else 0.0
        return latency, concurrency, error_rate

    def behaviour_for(self, ep: EndpointConfig) -> dict[str, float | int]:
        """Every backend setting the testbed gives ``ep``: :meth:`profile_for`'s three
        plus ``sigma``, ``tail_prob`` and ``tail_ms`` where an override sets them."""
        latency, concurrency, error_rate = self.profile_for(ep)
        out: dict[str, float | int] = {"base_latency_ms": latency, "concurrency": concurrency, "error_rate": error_rate}
        override = self.overrides.get(ep.address)
        if override is not None:
            out.update({k: getattr(override, k) for k in TAIL_FIELDS if getattr(override, k) is not None})
        return out


def _default_clusters() -> list[ClusterConfig]:
    return [ClusterConfig(name="my_service", endpoints=_default_endpoints())]


class Settings(_Model):
    """Everything BalanceIQ needs to run; the root of ``balanceiq.yaml``."""

    clusters: list[ClusterConfig] = Field(
        default_factory=_default_clusters,
        description="Envoy clusters whose weights BalanceIQ sets.",
    )
    """Envoy clusters whose endpoint weights BalanceIQ controls; names are unique."""

    xds: XdsConfig = Field(default_factory=XdsConfig, description="xDS server settings.")
    """The xDS server Envoy gets its endpoints from."""

    envoy: EnvoyConfig = Field(default_factory=EnvoyConfig, description="Envoy admin and listener.")
    """Envoy's admin URL and proxy listener."""

    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig, description="Prometheus server.")
    """The Prometheus server holding the telemetry."""

    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="How observations are read.")
    """PromQL per signal, rate window, staleness, and the ALS latency source."""

    control: ControlConfig = Field(default_factory=ControlConfig, description="Control loop settings.")
    """The control loop's pace and number of critical endpoints."""

    guardrails: GuardrailConfig = Field(
        default_factory=GuardrailConfig, description="Limits between the LP and the store."
    )
    """Floor share, maximum shift per decision and rollback to the baseline."""

    api: ApiConfig = Field(default_factory=ApiConfig, description="HTTP API and dashboard.")
    """Where the API binds, its token and the checkpoint it serves."""

    testbed: TestbedConfig = Field(default_factory=TestbedConfig, description="Local testbed behaviour.")
    """How the local sample backends behave."""

    state_dir: Path = Field(default=Path(".state"), description="Directory for persisted xDS state.")
    """Where the xDS actor persists its last snapshot, so a restart serves the last
    weights instead of resetting them. A relative path in a file is relative to the
    file's directory."""

    @field_validator("state_dir")
    @classmethod
    def _expand_state_dir(cls, value: Path) -> Path:
        return _check_path(value)  # type: ignore[return-value]

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
        problems: list[tuple[Loc, str]] = [
            (("testbed", "overrides", address), "no configured endpoint has this address")
            for address in self.testbed.overrides
            if address not in known
        ]
        if problems:
            raise _cross_field_error(problems)
        return self

    def cluster(self, name: str) -> ClusterConfig:
        """The cluster called ``name``; ``KeyError`` naming the known clusters otherwise."""
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        known = ", ".join(c.name for c in self.clusters)
        raise KeyError(f"no cluster named {name!r}; configured clusters: {known}")


# --------------------------------------------------------------------------- errors


_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _format_loc(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT_RE.fullmatch(part):
            out += f".{part}" if out else part
        else:
            # Dict keys such as "127.0.0.1:18001" contain dots; quote them so the path
            # stays unambiguous.
            out += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out


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
            origin = typing.get_origin(candidate)
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                field = candidate.model_fields.get(part) if isinstance(part, str) else None
                if field is not None:
                    following += _unwrap_annotation(field.annotation)
            elif origin in (list, dict):
                following += _unwrap_annotation(typing.get_args(candidate)[-1])
        candidates = following
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _unknown_key_message(loc: Loc, root: type[BaseModel] | None = None) -> str:
    model = _model_at(loc[:-1], root)
    if model is None:
        return "unknown key"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
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
    """``(field_path, message)`` for every error, unknown keys with a suggestion.

    ``root`` is the model that was validated (default :class:`Settings`); other YAML
    loaders (scenarios) reuse this so every file reports problems the same way.
    """
    problems: list[tuple[str, str]] = []
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        kind = error["type"]
        ctx = error.get("ctx") or {}
        if kind == _CROSS_FIELD:
            for sub_loc, message in ctx["problems"]:
                problems.append((_format_loc(loc + tuple(sub_loc)), message))
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
    """Problems in the raw data's shape that pydantic should never be handed.

    Walks the data as pydantic would, alias-shared parts once per reference, so a
    "billion laughs" file is caught after ``_MAX_VALUES`` steps, not after minutes of
    validation and a million error messages. Also finds alias cycles, nesting deeper
    than ``_MAX_DEPTH`` and strings longer than ``_MAX_STRING``.
    """
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
        try:
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            for key, child in items:
                part = key if isinstance(key, (str, int)) else str(key)
                if not walk(child, (*loc, part)):
                    return False
        finally:
            active.discard(id(value))
        return True

    walk(data, ())
    return _capped(problems)


# --------------------------------------------------------------------------- loading


def _yaml_type_name(value: Any) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


def settings_from_dict(
    data: Mapping[str, Any], source: str | None = None, *, base_dir: str | Path | None = None
) -> Settings:
    """Validate ``data`` (e.g. parsed YAML) into :class:`Settings`.

    Raises :class:`ConfigError` listing every problem. With ``base_dir``, relative paths
    (``state_dir``, TLS files) are resolved against it, as :func:`load_config` does with
    the config file's directory.
    """
    if not isinstance(data, Mapping):
        message = f"the top level must be a mapping of settings, not a {_yaml_type_name(data)}"
        raise ConfigError([("", message)], source)
    shape = _shape_problems(data)
    if shape:
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
    tls = tls.model_copy(
        update={
            name: resolve(getattr(tls, name))
            for name in ("cert_file", "key_file", "ca_file", "envoy_ca_file", "envoy_cert_file", "envoy_key_file")
        }
    )
    return settings.model_copy(
        update={
            "state_dir": resolve(settings.state_dir),
            "xds": settings.xds.model_copy(update={"tls": tls}),
            "api": settings.api.model_copy(update={"checkpoint": resolve(settings.api.checkpoint)}),
        }
    )


class _TooLargeNumber:
    """Stands in for an integer too long for Python to convert (over 4,300 digits).

    Not an ``int``, so pydantic refuses it at the field it is in, and the message names
    that field instead of failing the whole file at a line number.
    """

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a number with {self.digits} digits>"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and never raises a bare exception.

    Plain PyYAML keeps the last of two equal keys without a word, so a second ``weight:``
    would silently win; a config file is better off with an error. PyYAML's scalar
    constructors also raise plain ValueError/AttributeError on values such as
    ``2020-13-45`` or ``!!int x``; those become YAML errors with a line and column.
    """

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
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
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
# YAML 1.1 (PyYAML) reads ``1e3`` as the string "1e3": a float needs a dot there. Config
# files are written by people who expect YAML 1.2 and JSON, where it is a number.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml_error_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        return f"not readable as YAML text: {exc.reason} (character {exc.character!r} at position {exc.position})"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    problem = " ".join(str(problem).split())
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
    """Read and validate a YAML config file.

    Raises :class:`ConfigError` with every problem found: unreadable or empty file, YAML
    syntax error (with line and column), wrong top-level type, and each invalid field.
    Relative paths inside the file are relative to the file's directory.
    """
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


def check_config_command(path: str | Path) -> int:
    """``balanceiq config check FILE``: 0 and a summary if valid, else 2 and every problem.

    Problems go to stderr one per line as ``field.path: message``; never a traceback.
    """
    try:
        settings = load_config(path)
    except ConfigError as exc:
        lines = [f"{path}: {_plural(len(exc.problems), 'problem')}"]
        lines += [f"  {field}: {msg}" if field else f"  {msg}" for field, msg in exc.problems]
        print("\n".join(lines), file=sys.stderr)
        return 2
    endpoints = sum(len(cluster.endpoints) for cluster in settings.clusters)
    counts = f"{_plural(len(settings.clusters), 'cluster')}, {_plural(endpoints, 'endpoint')}"
    print(f"OK: {path} ({counts})")
    return 0
