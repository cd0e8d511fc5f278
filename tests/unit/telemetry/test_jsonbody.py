"""Depth is checked before decoding, and the check never refuses what real answers look like."""

from __future__ import annotations

import json

import pytest

from balanceiq.telemetry import jsonbody


def test_depth_counts_nesting_not_size() -> None:
    assert jsonbody.nesting_depth(b"") == 0
    assert jsonbody.nesting_depth(b"{}") == 1
    assert jsonbody.nesting_depth('{"a": [1, {"b": [2]}], "c": []}') == 4
    assert jsonbody.nesting_depth(b"[]" * 100_000) == 1
    assert jsonbody.nesting_depth(b"]]]][") == 0  # unbalanced garbage is for json to refuse


def test_a_prometheus_sized_answer_decodes() -> None:
    answer = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": {"endpoint": f"10.0.0.{i}:80"}, "value": [1.0, "2.5"]} for i in range(500)],
        },
    }
    assert jsonbody.loads(json.dumps(answer)) == answer


@pytest.mark.parametrize("deep", [b"[" * 101 + b"]" * 101, b'{"a":' * 101 + b"1" + b"}" * 101, b"[" * 200_000])
def test_deep_nesting_is_refused_before_json_recurses(deep: bytes) -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        jsonbody.loads(deep)


def test_the_limit_itself_still_decodes() -> None:
    body = "[" * jsonbody.MAX_DEPTH + "]" * jsonbody.MAX_DEPTH
    assert jsonbody.loads(body) is not None
