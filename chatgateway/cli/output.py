"""Pure rendering for the CLI: tables with headers, ISO-8601 times, JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any


def iso_time(timestamp: float | None) -> str:
    """Render Unix seconds as ISO-8601 UTC to the second (`-` for none)."""
    if timestamp is None:
        return "-"
    moment = datetime.fromtimestamp(timestamp, UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def cell(value: Any) -> str:
    """One table cell: lists comma-joined, booleans as yes/no, nothing as `-`."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value)
    # A table is one line per row: a newline in a value (an error text) would break it.
    return " ".join(str(value).split())


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns under upper-case headers, two spaces apart."""
    lines = [[h.upper() for h in headers], *([cell(v) for v in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def fields(pairs: Iterable[tuple[str, Any]]) -> str:
    """`name: value` lines, the names aligned."""
    items = [(name, cell(value)) for name, value in pairs]
    width = max((len(name) for name, _ in items), default=0) + 1
    return "\n".join(f"{(name + ':').ljust(width)} {value}" for name, value in items)


def to_json(data: Any) -> str:
    """Indented JSON, non-ASCII text kept as is."""
    return json.dumps(data, indent=2, ensure_ascii=False)
