"""How BalanceIQ talks to Envoy: TLS, the xDS server, the generated bootstrap."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from balanceiq.config.base import (
    Loc,
    Port,
    StrictBool,
    _check_path,
    _cross_field_error,
    _http_url,
    _Model,
    _not_blank,
    is_loopback,
)


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
