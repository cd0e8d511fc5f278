"""What the controller asks Envoy to do: per-endpoint weights and health for one cluster, validated
before anything reaches the store: every weight an integer in ``[1, 2**32-1]``, every locality's sum
within uint32 (Envoy NACKs an overflow)."""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast, get_args

from balanceiq.exceptions import AssignmentError

UINT32_MAX = 2**32 - 1

Health = Literal["HEALTHY", "DRAINING", "UNHEALTHY", "DEGRADED"]
HEALTH_VALUES: tuple[str, ...] = get_args(Health)
_JSON_FIELDS = ("address", "weight", "health", "cloud", "region", "zone", "cost_per_million_requests")


@dataclass(frozen=True, slots=True)
class EndpointAssignment:
    """One endpoint's place in a cluster: where it is, what it weighs, whether it serves."""

    address: str
    host: str
    port: int
    weight: int
    cloud: str
    region: str
    zone: str | None = None
    health: Health = "HEALTHY"
    cost_per_million_requests: float = 0.0

    def __post_init__(self) -> None:
        # A plain int: 2.0 or numpy.int64 would break the encoders far from here.
        object.__setattr__(self, "weight", coerce_weight(self.weight))

    @property
    def locality(self) -> tuple[str, str, str]:
        return (self.cloud, self.region, self.zone or "")


@dataclass(frozen=True, slots=True)
class Assignment:
    """Every endpoint of one cluster with its weight and health; immutable once built."""

    cluster: str
    endpoints: tuple[EndpointAssignment, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Each endpoint's weight is valid already (EndpointAssignment coerces it).
        if not self.cluster:
            raise AssignmentError("cluster name is empty")
        if not self.endpoints:
            raise AssignmentError(f"cluster {self.cluster!r} has no endpoints")
        seen: set[str] = set()
        sums: Counter[tuple[str, str, str]] = Counter()
        for ep in self.endpoints:
            if ep.address in seen:
                raise AssignmentError(f"cluster {self.cluster!r}: endpoint {ep.address} listed twice")
            seen.add(ep.address)
            if ep.health not in HEALTH_VALUES:
                raise AssignmentError(f"cluster {self.cluster!r}: {ep.address} has unknown health {ep.health!r}")
            sums[ep.locality] += ep.weight
        for loc, total in sums.items():
            if total > UINT32_MAX:
                raise AssignmentError(
                    f"cluster {self.cluster!r}: weights in locality {'/'.join(p for p in loc if p)} sum to "
                    f"{total}, over Envoy's uint32 limit {UINT32_MAX}"
                )

    @property
    def weights(self) -> dict[str, int]:
        return {ep.address: ep.weight for ep in self.endpoints}

    @property
    def health(self) -> dict[str, str]:
        return {ep.address: ep.health for ep in self.endpoints}

    def with_updates(
        self, weights: Mapping[str, object] | None = None, health: Mapping[str, object] | None = None
    ) -> Assignment:
        """A new assignment with the named endpoints' weight and/or health changed (unknown ones: an error)."""
        weights = dict(weights or {})
        health = dict(health or {})
        known = {ep.address for ep in self.endpoints}
        unknown = sorted((set(weights) | set(health)) - known)
        if unknown:
            raise AssignmentError(
                f"cluster {self.cluster!r}: unknown endpoint(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        problems: list[str] = []
        new_eps = []
        for ep in self.endpoints:
            changes: dict[str, Any] = {}
            if ep.address in weights:
                try:
                    changes["weight"] = coerce_weight(weights[ep.address])
                except AssignmentError as exc:
                    problems.append(f"weights[{ep.address!r}]: {exc}")
            if ep.address in health:
                raw = health[ep.address]
                if isinstance(raw, str) and raw.upper() in HEALTH_VALUES:
                    changes["health"] = raw.upper()
                else:
                    problems.append(f"health[{ep.address!r}]: {raw!r} is not one of {', '.join(HEALTH_VALUES)}")
            new_eps.append(replace(ep, **changes))
        if problems:
            raise AssignmentError(f"cluster {self.cluster!r}: " + "; ".join(problems))
        return Assignment(self.cluster, tuple(new_eps))

    def to_json(self) -> dict[str, object]:
        return {
            "cluster": self.cluster,
            "endpoints": [{k: getattr(ep, k) for k in _JSON_FIELDS} for ep in self.endpoints],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Assignment:
        try:
            cluster = str(data["cluster"])
            eps = []
            # A malformed entry fails below with KeyError/TypeError, reported as such.
            for raw in cast("Iterable[Mapping[str, Any]]", data["endpoints"]):
                address = str(raw["address"])
                host, port = split_address(address)
                zone = raw.get("zone")
                if zone is not None and not isinstance(zone, str):
                    raise TypeError(f"zone must be a string, got {zone!r}")
                cost = float(raw.get("cost_per_million_requests", 0.0))
                if not math.isfinite(cost) or cost < 0:
                    raise ValueError(f"cost_per_million_requests must be finite and >= 0, got {cost}")
                weight, cloud, region = raw["weight"], str(raw["cloud"]), str(raw["region"])
                health = cast(Health, str(raw.get("health", "HEALTHY")).upper())
                eps.append(EndpointAssignment(address, host, port, weight, cloud, region, zone, health, cost))
        except (KeyError, TypeError, ValueError) as exc:
            raise AssignmentError(f"malformed stored assignment: {exc!r}") from exc
        return cls(cluster, tuple(eps))


def coerce_weight(value: object) -> int:
    """An Envoy load_balancing_weight from a number, or AssignmentError saying why not."""
    if isinstance(value, bool):
        raise AssignmentError(f"weight must be an integer, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise AssignmentError(f"weight must be a whole number, got {value!r}")
        value = int(value)
    if isinstance(value, numbers.Integral):  # numpy integers are ints in spirit
        value = int(value)
    if not isinstance(value, int):
        raise AssignmentError(f"weight must be an integer, got {type(value).__name__} {value!r}")
    if not 1 <= value <= UINT32_MAX:
        raise AssignmentError(f"weight must be in [1, {UINT32_MAX}], got {value}")
    return value


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) into its parts, or AssignmentError."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
    bad_host = not host or (":" in host and not address.startswith("["))  # IPv6 needs []
    if not sep or bad_host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise AssignmentError(f"bad endpoint address {address!r}: expected host:port")
    return host, int(port)
