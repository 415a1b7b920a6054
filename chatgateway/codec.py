"""JSON encoding for the hot paths: orjson, with the standard library for what orjson refuses.

orjson encodes an agent request with 20 turns of history in about 3 us where `json.dumps`
takes about 30 us (docs/performance.md). It refuses a few inputs that `json` accepts (a lone
surrogate such as "\\ud800" from a platform's JSON, integers past 64 bits); those fall back
to `json`, so the output is always valid JSON and never an exception.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any) -> bytes:
    """Encode `obj` as compact UTF-8 JSON."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()

