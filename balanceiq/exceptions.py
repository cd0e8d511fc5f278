"""Every error BalanceIQ raises on purpose: subclasses of :class:`BalanceIQError`. Library errors are
translated into these at the boundary (``raise ... from exc``); the CLI prints them and exits 2."""


class BalanceIQError(Exception):
    """Base of every error raised on purpose by BalanceIQ."""


class ConfigError(BalanceIQError):
    """A configuration file or value is invalid; ``problems``: every ``(field_path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"  {path or '<root>'}: {msg}" for path, msg in self.problems]
        super().__init__("\n".join([f"{where}{len(self.problems)} problem(s)", *lines]))


class AssignmentError(BalanceIQError):
    """Weights or health sent to the xDS store are invalid; the store is unchanged."""


class XdsError(BalanceIQError):
    """The xDS server cannot do what was asked."""


class XdsBindError(XdsError):
    """The xDS server could not bind its port (usually: another server holds it)."""


class XdsLeaseError(XdsError):
    """A push or lease request refused: another controller holds the lease, or bad input."""


class XdsRequestError(XdsError):
    """An xDS client's request is refused; only that stream ends, with gRPC ``status``; counted under ``reason``."""

    def __init__(self, reason: str, message: str, status: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class PolicyError(BalanceIQError):
    """A policy checkpoint is missing, cannot be loaded, or is not a CriticalEndpointModule."""


class TelemetryError(BalanceIQError):
    """A metrics source could not give a usable answer (Telemetry falls back and records it)."""


class PrometheusError(TelemetryError):
    """Prometheus is unreachable, timed out, or answered something unusable."""


class EnvoyAdminError(TelemetryError):
    """Envoy's admin /stats endpoint is unreachable or its output cannot be parsed."""


class TestbedError(BalanceIQError):
    """A part of the local testbed failed to start or stop."""

    __test__ = False  # not a pytest test class, despite the name


class EnvoyError(TestbedError):
    """The envoy binary failed to start or never became ready."""


class ControlError(BalanceIQError):
    """The control loop or its guardrails refused an operation."""


class GuardrailError(ControlError):
    """An override or guardrail setting that cannot be applied (names the endpoint or field)."""


class UnknownClusterError(ControlError):
    """A request names a cluster the config does not have (or leaves it ambiguous)."""
