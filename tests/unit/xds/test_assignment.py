"""Assignment validation: every weight Envoy receives is an integer in [1, 2**32-1]."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balanceiq.exceptions import AssignmentError
from balanceiq.xds.assignment import (
    HEALTH_VALUES,
    UINT32_MAX,
    Assignment,
    EndpointAssignment,
    coerce_weight,
    split_address,
)
from balanceiq.xds.snapshot import build_snapshot


def ep(
    address: str,
    weight: object = 1,
    cloud: str = "aws",
    region: str = "us-east-1",
    zone: str | None = None,
    health: str = "HEALTHY",
    cost: float = 0.0,
) -> EndpointAssignment:
    host, port = split_address(address)
    return EndpointAssignment(
        address=address,
        host=host,
        port=port,
        weight=weight,  # type: ignore[arg-type]
        cloud=cloud,
        region=region,
        zone=zone,
        health=health,  # type: ignore[arg-type]
        cost_per_million_requests=cost,
    )


def three() -> Assignment:
    return Assignment(
        "svc",
        (
            ep("10.0.0.1:80", 5, "aws", "us-east-1", "a", cost=0.4),
            ep("10.0.0.2:80", 7, "gcp", "us-central1", None, cost=0.35),
            ep("[::1]:8080", 9, "azure", "eastus", "2", health="DRAINING", cost=0.55),
        ),
    )


# --- coerce_weight ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (42, 42),
        (UINT32_MAX, UINT32_MAX),
        (3.0, 3),
        (float(UINT32_MAX), UINT32_MAX),
        (np.int64(7), 7),
        (np.int32(8), 8),
        (np.uint32(UINT32_MAX), UINT32_MAX),
        (np.uint8(3), 3),
        (np.float64(4.0), 4),
    ],
)
def test_coerce_weight_accepts_integral_numbers(value: object, expected: int) -> None:
    out = coerce_weight(value)
    assert out == expected
    assert type(out) is int


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (True, "integer"),
        (False, "integer"),
        (np.bool_(True), "integer"),
        (math.nan, "whole number"),
        (math.inf, "whole number"),
        (-math.inf, "whole number"),
        (1.5, "whole number"),
        (0.1, "whole number"),
        (0, "[1, 4294967295]"),
        (-1, "[1, 4294967295]"),
        (0.0, "[1, 4294967295]"),
        (2**32, "[1, 4294967295]"),
        (float(2**32), "[1, 4294967295]"),
        (np.int64(0), "[1, 4294967295]"),
        (np.int64(2**40), "[1, 4294967295]"),
        ("5", "integer"),
        ("abc", "integer"),
        (None, "integer"),
        ([1], "integer"),
    ],
)
def test_coerce_weight_rejects_with_named_problem(value: object, fragment: str) -> None:
    with pytest.raises(AssignmentError) as info:
        coerce_weight(value)
    msg = str(info.value)
    assert "weight" in msg
    assert fragment in msg
    shown = [repr(value), str(value)]
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        shown.append(str(int(value)))  # integral floats are reported after conversion
    assert any(s in msg for s in shown), msg


def test_coerce_weight_message_names_the_type_of_a_string() -> None:
    with pytest.raises(AssignmentError, match=r"got str '5'"):
        coerce_weight("5")


# --- construction ------------------------------------------------------------------------


def test_valid_assignment_exposes_weights_and_health() -> None:
    a = three()
    assert a.weights == {"10.0.0.1:80": 5, "10.0.0.2:80": 7, "[::1]:8080": 9}
    assert a.health == {"10.0.0.1:80": "HEALTHY", "10.0.0.2:80": "HEALTHY", "[::1]:8080": "DRAINING"}
    assert a.endpoints[1].locality == ("gcp", "us-central1", "")
    assert a.endpoints[0].locality == ("aws", "us-east-1", "a")


def test_duplicate_endpoint_rejected() -> None:
    with pytest.raises(AssignmentError, match=r"10\.0\.0\.1:80 listed twice"):
        Assignment("svc", (ep("10.0.0.1:80"), ep("10.0.0.1:80", 3)))


def test_empty_cluster_name_and_no_endpoints_rejected() -> None:
    with pytest.raises(AssignmentError, match="cluster name is empty"):
        Assignment("", (ep("10.0.0.1:80"),))
    with pytest.raises(AssignmentError, match="'svc' has no endpoints"):
        Assignment("svc", ())


def test_unknown_health_rejected_at_construction() -> None:
    with pytest.raises(AssignmentError, match=r"unknown health 'SICK'"):
        Assignment("svc", (ep("10.0.0.1:80", health="SICK"),))


@pytest.mark.parametrize("bad", [0, -3, 2**32, True, 1.5, math.nan, "7"])
def test_invalid_weight_rejected_at_construction(bad: object) -> None:
    with pytest.raises(AssignmentError, match="weight"):
        Assignment("svc", (ep("10.0.0.1:80", bad),))


def test_locality_sum_over_uint32_rejected() -> None:
    half = UINT32_MAX // 2 + 1  # two of these overflow by one
    with pytest.raises(AssignmentError) as info:
        Assignment(
            "svc",
            (ep("10.0.0.1:80", half, zone="z"), ep("10.0.0.2:80", half, zone="z")),
        )
    msg = str(info.value)
    assert "aws/us-east-1/z" in msg
    assert str(2 * half) in msg
    assert "uint32" in msg


def test_locality_sum_exactly_uint32_max_accepted() -> None:
    a = Assignment("svc", (ep("10.0.0.1:80", UINT32_MAX - 1), ep("10.0.0.2:80", 1)))
    assert sum(a.weights.values()) == UINT32_MAX


def test_big_weights_in_different_localities_accepted() -> None:
    # The limit is per locality: the same huge weight in two localities is fine.
    a = Assignment(
        "svc",
        (
            ep("10.0.0.1:80", UINT32_MAX, cloud="aws"),
            ep("10.0.0.2:80", UINT32_MAX, cloud="gcp"),
        ),
    )
    assert a.weights["10.0.0.2:80"] == UINT32_MAX


def test_same_region_name_in_two_clouds_is_two_localities() -> None:
    half = UINT32_MAX // 2 + 1
    a = Assignment(
        "svc",
        (ep("10.0.0.1:80", half, "aws", "east"), ep("10.0.0.2:80", half, "gcp", "east")),
    )
    assert len(a.endpoints) == 2


def test_endpoint_weight_is_normalised_to_int() -> None:
    """An integral float or numpy int passes validation, so it must be stored as int.

    Otherwise ``build_snapshot`` fails (UInt32Value rejects float) and persisting fails
    (json cannot encode numpy ints) *after* the assignment was accepted.
    """
    a = Assignment("svc", (ep("10.0.0.1:80", 2.0), ep("10.0.0.2:80", np.int64(3))))
    assert [type(w) for w in a.weights.values()] == [int, int]
    build_snapshot("1.1", [a])  # must not raise
    json.dumps(a.to_json())  # must not raise


# --- with_updates ------------------------------------------------------------------------


def test_with_updates_partial_weights_keep_others() -> None:
    a = three()
    b = a.with_updates({"10.0.0.2:80": 70})
    assert b.weights == {"10.0.0.1:80": 5, "10.0.0.2:80": 70, "[::1]:8080": 9}
    assert b.health == a.health
    assert a.weights["10.0.0.2:80"] == 7  # original untouched
    assert b is not a
    # everything except weight carries over
    assert b.endpoints[1].cost_per_million_requests == 0.35
    assert b.endpoints[1].cloud == "gcp"


def test_with_updates_partial_health_case_insensitive() -> None:
    b = three().with_updates(health={"10.0.0.1:80": "draining", "[::1]:8080": "HEALTHY"})
    assert b.health == {"10.0.0.1:80": "DRAINING", "10.0.0.2:80": "HEALTHY", "[::1]:8080": "HEALTHY"}
    assert b.weights == three().weights


def test_with_updates_coerces_numpy_and_float() -> None:
    b = three().with_updates({"10.0.0.1:80": np.int64(11), "10.0.0.2:80": 12.0})
    assert b.weights["10.0.0.1:80"] == 11 and type(b.weights["10.0.0.1:80"]) is int
    assert b.weights["10.0.0.2:80"] == 12 and type(b.weights["10.0.0.2:80"]) is int


def test_with_updates_nothing_is_equal_copy() -> None:
    a = three()
    assert a.with_updates() == a
    assert a.with_updates({}, {}) == a


def test_with_updates_unknown_endpoint_named() -> None:
    with pytest.raises(AssignmentError) as info:
        three().with_updates({"10.9.9.9:80": 3}, {"10.8.8.8:1": "HEALTHY"})
    msg = str(info.value)
    assert "10.9.9.9:80" in msg and "10.8.8.8:1" in msg
    assert "unknown endpoint" in msg
    assert "10.0.0.1:80" in msg  # lists what is known


@pytest.mark.parametrize("bad", ["SICK", "", 3, None, "healthyish"])
def test_with_updates_invalid_health(bad: object) -> None:
    with pytest.raises(AssignmentError) as info:
        three().with_updates(health={"10.0.0.1:80": bad})
    msg = str(info.value)
    assert "health['10.0.0.1:80']" in msg
    assert repr(bad) in msg
    assert "DRAINING" in msg


def test_with_updates_reports_every_problem_at_once() -> None:
    with pytest.raises(AssignmentError) as info:
        three().with_updates({"10.0.0.1:80": 0, "10.0.0.2:80": 1.5}, {"[::1]:8080": "BAD"})
    msg = str(info.value)
    assert "weights['10.0.0.1:80']" in msg
    assert "weights['10.0.0.2:80']" in msg
    assert "health['[::1]:8080']" in msg


def test_with_updates_locality_overflow_rejected() -> None:
    a = Assignment("svc", (ep("10.0.0.1:80", 1), ep("10.0.0.2:80", 1)))
    with pytest.raises(AssignmentError, match="uint32"):
        a.with_updates({"10.0.0.1:80": UINT32_MAX, "10.0.0.2:80": 1})


def test_assignment_is_immutable() -> None:
    a = three()
    with pytest.raises(AttributeError):
        a.cluster = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        a.endpoints[0].weight = 3  # type: ignore[misc]


# --- JSON ---------------------------------------------------------------------------------


def test_json_round_trip() -> None:
    a = three()
    data = json.loads(json.dumps(a.to_json()))
    b = Assignment.from_json(data)
    assert b == a
    assert b.endpoints[2].host == "::1" and b.endpoints[2].port == 8080


def test_from_json_defaults_health_and_cost() -> None:
    a = Assignment.from_json(
        {
            "cluster": "svc",
            "endpoints": [{"address": "h:1", "weight": 2, "cloud": "c", "region": "r"}],
        }
    )
    assert a.endpoints[0].health == "HEALTHY"
    assert a.endpoints[0].cost_per_million_requests == 0.0
    assert a.endpoints[0].zone is None


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"cluster": "svc"},
        {"cluster": "svc", "endpoints": [{"address": "h:1"}]},
        {"cluster": "svc", "endpoints": [{"address": "nope", "weight": 1, "cloud": "c", "region": "r"}]},
        {"cluster": "svc", "endpoints": [{"address": "h:1", "weight": 0, "cloud": "c", "region": "r"}]},
        {"cluster": "svc", "endpoints": [{"address": "h:1", "weight": 1, "cloud": "c", "region": "r", "health": "X"}]},
        {
            "cluster": "svc",
            "endpoints": [
                {"address": "h:1", "weight": 1, "cloud": "c", "region": "r", "cost_per_million_requests": "x"}
            ],
        },
        {"cluster": "svc", "endpoints": 5},
        {"cluster": "svc", "endpoints": ["h:1"]},
        {"cluster": "svc", "endpoints": []},
    ],
)
def test_from_json_malformed_raises_assignment_error(data: dict) -> None:
    with pytest.raises(AssignmentError):
        Assignment.from_json(data)


# --- split_address -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("backend.example:65535", ("backend.example", 65535)),
        ("h:1", ("h", 1)),
        ("[::1]:80", ("::1", 80)),
        ("[2001:db8::5]:8443", ("2001:db8::5", 8443)),
    ],
)
def test_split_address_valid(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize(
    "address",
    ["", "noport", "h:", ":80", "h:0", "h:65536", "h:-1", "h: 80", "h:8o", "[::1]80", "[::1]:", "[]:80", "[::1"],
)
def test_split_address_invalid(address: str) -> None:
    with pytest.raises(AssignmentError, match="expected host:port") as info:
        split_address(address)
    assert repr(address) in str(info.value)


def test_split_address_rejects_non_ascii_digits() -> None:
    # str.isdigit() accepts Arabic-Indic and other Unicode digits; a port is ASCII.
    with pytest.raises(AssignmentError):
        split_address("h:\u0668\u0660")


# --- properties --------------------------------------------------------------------------

valid_weight = st.integers(min_value=1, max_value=UINT32_MAX)
invalid_weight = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=2**32),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda f: not (math.isfinite(f) and f == int(f) and 1 <= f <= UINT32_MAX)
    ),
    st.text(max_size=5),
    st.none(),
)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.tuples(st.integers(1, 254), st.integers(1, 65535)),
        st.tuples(valid_weight, st.sampled_from(["aws", "gcp"]), st.sampled_from(HEALTH_VALUES)),
        min_size=1,
        max_size=6,
    )
)
def test_property_any_valid_weight_map_round_trips(spec: dict) -> None:
    eps = []
    for (octet, port), (w, cloud, health) in spec.items():
        # one endpoint per locality (zone = address): the per-locality sum cannot overflow
        eps.append(ep(f"10.0.0.{octet}:{port}", w, cloud, "r", f"z{octet}-{port}", health))
    a = Assignment("svc", tuple(eps))
    b = Assignment.from_json(json.loads(json.dumps(a.to_json())))
    assert b == a
    assert b.weights == {e.address: e.weight for e in eps}
    # with_updates with the same map is a no-op, with a new map applies it exactly
    assert a.with_updates(a.weights, a.health) == a


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["10.0.0.1:80", "10.0.0.2:80", "[::1]:8080"]), invalid_weight)
def test_property_invalid_weight_raises_and_leaves_original(addr: str, bad: object) -> None:
    a = three()
    before = (a.weights, a.health, a.to_json())
    with pytest.raises(AssignmentError):
        a.with_updates({"10.0.0.2:80": 99, addr: bad})
    assert (a.weights, a.health, a.to_json()) == before
    with pytest.raises(AssignmentError):
        coerce_weight(bad)
