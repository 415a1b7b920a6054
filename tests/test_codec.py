"""The hot-path JSON encoder: orjson's output, and valid JSON for what orjson refuses."""

from __future__ import annotations

import json

import pytest

from chatgateway import codec


@pytest.mark.parametrize("value", [
    {"text": "hello", "n": 1, "f": 1.5, "none": None, "list": [True, False], "é": "ünï"},
    {"text": "lone surrogate \ud800 from a platform's JSON"},
    {"big": 2**70},
    {1: "non-string key"},
])
def test_dumps_always_gives_json_that_decodes_to_the_value(value: object) -> None:
    encoded = codec.dumps(value)
    assert isinstance(encoded, bytes)
    expected = json.loads(json.dumps(value))
    assert json.loads(encoded) == expected


def test_dumps_is_compact() -> None:
    assert codec.dumps({"a": [1, 2], "b": "c"}) == b'{"a":[1,2],"b":"c"}'
