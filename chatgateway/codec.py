"""JSON for the hot paths: orjson, with the standard library for what orjson refuses or changes.

orjson encodes an agent request with 20 turns of history in about 3 us where `json.dumps`
takes about 30 us (docs/performance.md). It refuses a few inputs that `json` accepts (a lone
surrogate such as "\\ud800" from a platform's JSON, integers past 64 bits); those fall back
to `json`, so the output is always valid JSON and never an exception. Decoding works the same
way round: whatever orjson refuses, or would change (it reads integers past 64 bits as
floats), is decoded by `json`, so callers see exactly what `json.loads` gives.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

#: 19 digits in a row: possibly an integer past 64 bits, which orjson would turn into a float.
_LONG_NUMBER = re.compile(rb"\d{19}")


def dumps(obj: Any) -> bytes:
    """Encode `obj` as compact UTF-8 JSON."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def loads(raw: bytes) -> Any:
    """Decode JSON exactly as `json.loads` does (and raise what it raises), mostly with orjson."""
    if not _LONG_NUMBER.search(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # let json say what is wrong, or accept what only it accepts (NaN, a surrogate)
    return json.loads(raw)


def log_line(obj: Any, default: Any) -> str:
    """One JSON log line in ASCII (like `json.dumps`), so any stdout encoding can write it."""
    try:
        encoded = orjson.dumps(obj, default=default)
    except TypeError:
        return json.dumps(obj, default=default)
    if encoded.isascii():
        return encoded.decode("ascii")
    return json.dumps(obj, default=default)
