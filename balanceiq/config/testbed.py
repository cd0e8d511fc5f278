"""The local testbed's sample backends."""

from __future__ import annotations

from pydantic import Field, field_validator

from balanceiq.config.base import Loc, NonNegFloat, _canonical_address, _cross_field_error, _Model


class BackendProfile(_Model):
    """Testbed behaviour of one backend; unset fields fall back to the testbed defaults."""

    base_latency_ms: NonNegFloat | None = None
    """Base latency in ms (>= 0)."""

    concurrency: int | None = Field(default=None, ge=1, strict=True)
    """Requests served in parallel (>= 1)."""

    error_rate: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False, strict=True)
    """Fraction of requests answered 5xx (0..1)."""

    sigma: float | None = Field(default=None, ge=0, le=3, allow_inf_nan=False, strict=True)
    """Lognormal spread of the service time (0..3; 0 = fixed delay)."""

    tail_prob: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False, strict=True)
    """Probability a request also waits tail_ms (0..1)."""

    tail_ms: NonNegFloat | None = None
    """Extra latency of a tail request (ms, >= 0)."""


class TestbedConfig(_Model):
    """How the local sample backends behave, so each cloud looks different."""

    __test__ = False  # not a pytest test class, despite the name

    base_latency_ms: dict[str, NonNegFloat] = Field(default_factory=lambda: {"aws": 15.0, "gcp": 25.0, "azure": 35.0})
    """Base latency in ms keyed by 'cloud' or 'cloud/region'."""

    default_latency_ms: NonNegFloat = 20.0
    """Latency for clouds not listed (ms)."""

    concurrency: int = Field(default=8, ge=1, strict=True)
    """Default requests served in parallel."""

    overrides: dict[str, BackendProfile] = Field(default_factory=dict)
    """Per-backend profile keyed by endpoint address."""

    @field_validator("base_latency_ms")
    @classmethod
    def _check_latency_keys(cls, value: dict[str, float]) -> dict[str, float]:
        if bad := [key for key in value if key.count("/") > 1 or not all(part.strip() for part in key.split("/"))]:
            message = "key must be 'cloud' or 'cloud/region', e.g. aws or aws/us-east-1"
            raise _cross_field_error([((key,), message) for key in bad])
        return value

    @field_validator("overrides")
    @classmethod
    def _canonical_override_keys(cls, value: dict[str, BackendProfile]) -> dict[str, BackendProfile]:
        problems: list[tuple[Loc, str]] = []
        first_key: dict[str, str] = {}  # canonical address -> the key that named it first
        for key in value:
            try:
                address = _canonical_address(key)
            except ValueError as exc:
                problems.append(((key,), f"key is not an endpoint address: {exc}"))
                continue
            if address in first_key:
                problems.append(((key,), f"same endpoint as {first_key[address]!r}"))
                continue
            first_key[address] = key
        if problems:
            raise _cross_field_error(problems)
        return {address: value[key] for address, key in first_key.items()}
