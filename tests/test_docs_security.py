"""docs/security.md's table of limits and timeouts stays true: every key exists with that default,
and every limit and timeout of the configuration is in it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from chatgateway.config import (
    AgentConfig,
    BreakerConfig,
    GatewayConfig,
    GatewayLimitsConfig,
    LimitsConfig,
    RateConfig,
    ServerConfig,
    SessionConfig,
    TenantConfig,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
PER_TENANT = "per tenant "


def documented() -> dict[str, str]:
    """Key path -> default text of the table under "## Every limit and timeout"."""
    section = DOC.read_text().split("## Every limit and timeout", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"((?:per tenant )?)`([a-z_.]+)`", cells[0]) if cells else None
        if match and len(cells) >= 2:
            rows[("tenants." if match[1] else "") + match[2]] = cells[1]
    return rows


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def default_of(path: str) -> Any:
    """The default of a key path in the config models; KeyError if there is no such key."""
    parts = path.split(".")
    model: type[BaseModel] = GatewayConfig
    if parts[0] == "tenants":
        model, parts = TenantConfig, parts[1:]
    for i, name in enumerate(parts):
        field = model.model_fields[name]
        if i == len(parts) - 1:
            return field.get_default(call_default_factory=True)
        inner = _model_of(field.annotation)
        assert inner is not None, f"{path}: {name} is not a section"
        model = inner
    raise KeyError(path)


def matches(text: str, default: Any) -> bool:
    """Whether the table's default text says `default`."""
    if isinstance(default, RateConfig):
        return text == f"{default.per_minute:g}/min, burst {default.burst}"
    if default is None or default == []:
        return text in ("none", "off")
    if isinstance(default, str):
        return text == f"`{default}`"
    number = re.match(r"[0-9.]+", text)
    return number is not None and float(number[0]) == float(default)


def test_every_documented_key_exists_with_its_default() -> None:
    rows = documented()
    assert len(rows) >= 20
    wrong = {}
    for path, text in rows.items():
        try:
            default = default_of(path)
        except KeyError:
            wrong[path] = "no such key"
            continue
        if not matches(text, default):
            wrong[path] = f"documented {text!r}, default {default!r}"
    assert wrong == {}


@pytest.mark.parametrize(("prefix", "model", "skip"), [
    ("server.", ServerConfig, {"visitor_secret", "public_url"}),
    ("limits.", GatewayLimitsConfig, set()),
    ("tenants.limits.", LimitsConfig, {"notice_text"}),
    ("tenants.breaker.", BreakerConfig, {"enabled"}),
    ("tenants.agent.", AgentConfig, {"url", "builtin", "secret", "bearer_token", "headers",
                                     "retry", "history_turns", "fallback_text", "protocol",
                                     "model", "system_prompt", "query", "content_filter_notice",
                                     "budget_notice"}),
    ("tenants.sessions.", SessionConfig, {"while_answering"}),
])
def test_every_limit_and_timeout_is_documented(
    prefix: str, model: type[BaseModel], skip: set[str]
) -> None:
    rows = documented()
    missing = [prefix + name for name in model.model_fields
               if name not in skip and prefix + name not in rows]
    assert missing == []
