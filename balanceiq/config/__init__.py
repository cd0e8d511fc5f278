"""BalanceIQ configuration: one YAML file, validated by pydantic.

Every model is frozen and refuses unknown keys, so a typo such as ``wieght`` is reported
instead of silently falling back to a default. :func:`load_config` turns every problem in
a file (YAML syntax, wrong types, cross-field rules) into one :class:`ConfigError` whose
``problems`` name the offending field, e.g. ``clusters[0].endpoints[2].address``.

One job per module: ``base`` (limits, field types, the base model), ``addresses``,
``cluster``, ``transport`` (TLS, xDS, Envoy), ``signals`` (telemetry and the default
PromQL), ``control`` (loop, guardrails, API), ``testbed``, ``settings`` (the whole file),
``problems`` (errors a person can act on) and ``loading`` (bounded YAML, ``config check``).
"""

from balanceiq.config.addresses import format_address, split_address
from balanceiq.config.base import UINT32_MAX, Port, is_loopback
from balanceiq.config.cluster import ClusterConfig, EndpointConfig
from balanceiq.config.control import ApiConfig, ControlConfig, GuardrailConfig, critical_count
from balanceiq.config.loading import (
    check_config_command,
    default_settings,
    load_config,
    parse_yaml,
    settings_from_dict,
)
from balanceiq.config.problems import validation_problems
from balanceiq.config.settings import Settings
from balanceiq.config.signals import BACKEND_SATURATION, SIGNALS, PrometheusConfig, SignalQuery, TelemetryConfig
from balanceiq.config.testbed import TAIL_FIELDS, BackendProfile, TestbedConfig
from balanceiq.config.transport import EnvoyConfig, TlsConfig, XdsConfig

__all__ = [
    "BACKEND_SATURATION",
    "SIGNALS",
    "TAIL_FIELDS",
    "UINT32_MAX",
    "ApiConfig",
    "BackendProfile",
    "ClusterConfig",
    "ControlConfig",
    "EndpointConfig",
    "EnvoyConfig",
    "GuardrailConfig",
    "Port",
    "PrometheusConfig",
    "Settings",
    "SignalQuery",
    "TelemetryConfig",
    "TestbedConfig",
    "TlsConfig",
    "XdsConfig",
    "check_config_command",
    "critical_count",
    "default_settings",
    "format_address",
    "is_loopback",
    "load_config",
    "parse_yaml",
    "settings_from_dict",
    "split_address",
    "validation_problems",
]
