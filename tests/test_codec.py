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


@pytest.mark.parametrize("raw", [
    b'{"message": "hello", "userId": "u1", "metadata": {"n": 1, "f": 1.5, "ok": true}}',
    b'{"big": 123456789012345678901234567890}',  # orjson would read a float
    b'{"neg": -9223372036854775809, "in_text": "1234567890123456789012"}',
    b'{"lone": "\\ud800"}',  # orjson refuses; json decodes it (the web layer then says 400)
    b'{"nan": NaN, "inf": 1e400}',  # only json accepts these
    b'[1, 2, 3]',
])
def test_loads_gives_exactly_what_json_gives(raw: bytes) -> None:
    decoded = codec.loads(raw)
    expected = json.loads(raw)
    assert repr(decoded) == repr(expected)  # repr: NaN != NaN, and 1 == 1.0 would hide a float
    assert type(decoded) is type(expected)


@pytest.mark.parametrize("raw", [b'{"a": ', b"\xff", b"[" * 100_000])
def test_loads_raises_what_json_raises(raw: bytes) -> None:
    with pytest.raises(Exception) as expected:
        json.loads(raw)
    with pytest.raises(type(expected.value)):
        codec.loads(raw)


@pytest.mark.parametrize("event", [
    {"event": "message_handled", "latency_ms": 1.5, "cause": None, "ok": True, "n": 3},
    {"event": "x", "user_name": "Zoë 🚀", "detail": "\u2028"},
    {"event": "x", "detail": "lone \ud800 surrogate"},
    {"event": "x", "big": 2**70, "obj": object()},
])
def test_log_line_is_ascii_json_of_the_event(event: dict[str, object]) -> None:
    line = codec.log_line(event, default=repr)
    assert line.isascii() and "\n" not in line
    assert json.loads(line) == json.loads(json.dumps(event, default=repr))
