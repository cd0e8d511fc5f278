"""BalanceIQ configuration: one YAML file, validated into frozen pydantic models that refuse unknown
keys (a typo is reported, not defaulted); :func:`load_config` reports every problem in one ConfigError."""

from balanceiq.config.base import UINT32_MAX, is_loopback, split_address
from balanceiq.config.cluster import ClusterConfig, EndpointConfig
from balanceiq.config.control import ControlConfig, GuardrailConfig, critical_count
from balanceiq.config.loading import check_config_command, default_settings, load_config, parse_yaml, settings_from_dict
from balanceiq.config.problems import validation_problems
from balanceiq.config.settings import Settings
from balanceiq.config.signals import BACKEND_SATURATION, SIGNALS, PrometheusConfig, SignalQuery, TelemetryConfig
from balanceiq.config.testbed import BackendProfile, TestbedConfig
from balanceiq.config.transport import EnvoyConfig, TlsConfig, XdsConfig

__all__ = [
    "BACKEND_SATURATION",
    "SIGNALS",
    "UINT32_MAX",
    "BackendProfile",
    "ClusterConfig",
    "ControlConfig",
    "EndpointConfig",
    "EnvoyConfig",
    "GuardrailConfig",
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
    "is_loopback",
    "load_config",
    "parse_yaml",
    "settings_from_dict",
    "split_address",
    "validation_problems",
]
