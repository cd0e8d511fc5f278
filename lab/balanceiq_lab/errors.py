"""The lab's errors, in the product's tree: the CLI reports any BalanceIQError without a traceback."""

from balanceiq.exceptions import BalanceIQError, TestbedError


class BackendError(TestbedError):
    """A sample backend failed to start."""


class PrometheusProcessError(TestbedError):
    """The prometheus binary failed to start or never became ready."""


class BenchError(BalanceIQError):
    """A benchmark could not run to completion."""
