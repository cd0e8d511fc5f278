"""BalanceIQ configuration: one YAML file, validated by pydantic.

Models are frozen and refuse unknown keys (a typo is reported, not defaulted);
:func:`load_config` reports every problem at once in one :class:`ConfigError`.
"""

from balanceiq.config.addresses import format_address, split_address
from balanceiq.config.base import UINT32_MAX, Port, is_loopback
from balanceiq.config.cluster import ClusterConfig, EndpointConfig
from balanceiq.config.control import ApiConfig, ControlConfig, GuardrailConfig, critical_count
from balanceiq.config.loading import check_config_command, default_settings, load_config, parse_yaml, settings_from_dict
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
