"""How BalanceIQ talks to Envoy: TLS, the xDS server, the generated bootstrap."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from balanceiq.config.base import (
    ConfigPath,
    HttpUrlStr,
    Loc,
    NonBlank,
    Port,
    StrictBool,
    _cross_field_error,
    _Model,
    is_loopback,
)


class TlsConfig(_Model):
    """TLS for the xDS gRPC server Envoy connects to."""

    enabled: StrictBool = False
    """Serve xDS over TLS."""

    cert_file: ConfigPath | None = None
    """PEM server certificate (chain)."""

    key_file: ConfigPath | None = None
    """PEM private key of cert_file."""

    ca_file: ConfigPath | None = None
    """PEM CA bundle for client certs."""

    require_client_cert: StrictBool = False
    """Require and verify an Envoy client certificate (mTLS)."""

    envoy_ca_file: ConfigPath | None = None
    """PEM CA Envoy uses to verify the xDS server certificate."""

    envoy_cert_file: ConfigPath | None = None
    """PEM client certificate Envoy presents (mTLS)."""

    envoy_key_file: ConfigPath | None = None
    """PEM private key of envoy_cert_file."""

    server_name: str | None = None
    """Name (SNI and SAN) Envoy expects on the server certificate."""

    @model_validator(mode="after")
    def _check_requirements(self) -> TlsConfig:
        problems: list[tuple[Loc, str]] = []
        if self.enabled:
            unset = [name for name in ("cert_file", "key_file") if getattr(self, name) is None]
            problems += [((name,), "required when enabled is true") for name in unset]
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

    host: NonBlank = "127.0.0.1"
    """Address the xDS server binds."""

    port: Port = 50051
    """TCP port of the xDS server (1..65535)."""

    tls: TlsConfig = Field(default_factory=TlsConfig)
    """TLS for the xDS server."""

    api: Literal["ads-sotw", "ads-delta", "eds-sotw", "eds-delta"] = "ads-sotw"
    """xDS flavour the Envoy bootstrap uses."""

    allow_insecure_remote: StrictBool = False
    """Allow a non-loopback host without mutual TLS (not recommended)."""

    @model_validator(mode="after")
    def _remote_needs_mtls(self) -> XdsConfig:
        if is_loopback(self.host) or self.allow_insecure_remote or (self.tls.enabled and self.tls.require_client_cert):
            return self
        message = (
            f"{self.host} is not a loopback address and the server has no mutual TLS; "
            "set tls.enabled and tls.require_client_cert (see SECURITY.md), "
            "or allow_insecure_remote: true to accept the risk"
        )
        raise _cross_field_error([(("host",), message)])


class EnvoyConfig(_Model):
    """Where Envoy's admin interface is and where Envoy accepts client traffic."""

    admin_url: HttpUrlStr = "http://127.0.0.1:9901"
    """Envoy admin http(s) URL."""

    listen_host: NonBlank = "127.0.0.1"
    """Address Envoy's proxy listener binds."""

    listen_port: Port = 10000
    """Port of Envoy's proxy listener."""

    allow_remote_admin: StrictBool = False
    """Allow an admin_url host that is not loopback."""

    # LEAST_REQUEST picks by weight / (active + 1); the controller compensates for that.
    lb_policy: Literal["LEAST_REQUEST", "ROUND_ROBIN"] = "LEAST_REQUEST"
    """Envoy's balancer under BalanceIQ's weights."""

    update_merge_window_ms: int = Field(default=0, ge=0, strict=True)
    """Envoy cluster update merge window in ms (>= 0)."""

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
