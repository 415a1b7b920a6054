"""deploy/: the Grafana dashboard and the alert rules query only what a running gateway exports."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import tenant
from tests.fakes.slack import FakeSlack
from tests.test_slack_e2e import slack_tenant

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "chatgateway.json"
ALERTS = ROOT / "deploy" / "prometheus" / "chatgateway-alerts.yml"
KEY = "dashboard-test-key-0123456789abcdef"

#: Series Prometheus makes itself, and the labels it adds to every scraped series.
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"instance", "job"}

PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "group", "count_values", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "time", "vector", "scalar", "inf", "nan",
}


def dashboard_queries(node: Any) -> Iterator[str]:
    """Every PromQL expression of a dashboard: panel targets, variables, annotations."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and "query" in value:
                yield from _label_values(value["query"])
            elif key == "definition" and isinstance(value, str):
                yield from _label_values(value)
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def _label_values(query: str) -> Iterator[str]:
    """The metric of Grafana's `label_values(metric, label)`, as a query."""
    match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query.strip())
    assert match, f"unexpected variable query {query!r}"
    yield f"max by ({match.group(2)}) ({match.group(1)})"


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, $variables)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\s*(\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def used_labels(expr: str) -> Iterator[tuple[str | None, str]]:
    """(metric, label) for each label matcher, (None, label) for each grouping label."""
    for match in re.finditer(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        for label in re.finditer(r"(\w+)\s*(?:=~|!~|!=|=)", match.group(2)):
            yield match.group(1), label.group(1)
    for match in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in match.group(1).split(","):
            if label.strip():
                yield None, label.strip()


def exported(metrics_text: str) -> dict[str, set[str]]:
    """Series name -> label names, for every series the exposition names (suffixes included).

    A family without samples yet (a counter nothing has incremented) still has its HELP and
    TYPE lines, so its series names come from its type.
    """
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                "summary": ["", "_count", "_sum"], "gauge": [""], "unknown": [""]}
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for suffix in suffixes[family.type]:
            found.setdefault(family.name + suffix, set())
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def scraped(fake_slack, make_agent, gateway_process, http) -> dict[str, set[str]]:
    """/metrics of a real gateway process after Slack and web messages, a failure, a refusal."""
    agent = await make_agent()
    broken = await make_agent(status=500)
    app = fake_slack.add_app()
    acme = slack_tenant("acme", agent.url, fake_slack, app)
    acme["web"] = {"enabled": True, "api_keys": [{"value": KEY}]}
    globex = tenant("globex", broken.url, keys=[KEY + "-globex"],
                    agent={"retry": {"attempts": 1}},
                    limits={"user": {"per_minute": 1, "burst": 1}})
    proc = await asyncio.to_thread(gateway_process, {"tenants": [acme, globex]})
    await fake_slack.wait_connected(app, within=30)
    delivery = await fake_slack.dm(app, "U0ALICE", "hello")
    await fake_slack.wait_posts(1, within=20)
    await fake_slack.wait_ack(await fake_slack.redeliver(delivery, same_envelope=False))
    base = f"http://127.0.0.1:{proc.port}"
    statuses = []
    for key, text in ((KEY, "web"), (KEY + "-globex", "fails"), (KEY + "-globex", "refused")):
        async with http.post(f"{base}/api/chat", json={"message": text, "userId": "u1"},
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            statuses.append(resp.status)
    assert statuses == [200, 200, 429]
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    await asyncio.to_thread(proc.stop)
    return exported(text)


async def test_every_dashboard_and_alert_query_names_an_exported_metric(scraped):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {"dashboard": list(dashboard_queries(dashboard)), "alerts": alert_queries()}
    assert len(queries["dashboard"]) > 20 and len(queries["alerts"]) > 5
    unknown = []
    for source, exprs in queries.items():
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"{source}: no metric in {expr!r}"
            unknown += [(source, n, expr) for n in names - scraped.keys() - PROMETHEUS_SERIES]
    assert unknown == []

    # Labels: a matcher or grouping names a label the metric has (where it has samples here).
    wrong = []
    for source, exprs in queries.items():
        for expr in exprs:
            names = metric_names(expr) - PROMETHEUS_SERIES
            known = set().union(*(scraped[n] for n in names)) | TARGET_LABELS | {"le"}
            for metric, label in used_labels(expr):
                labels = scraped.get(metric, known) if metric else known
                sampled = metric is None or bool(scraped.get(metric))
                if sampled and label not in labels | TARGET_LABELS:
                    wrong.append((source, metric, label, expr))
    assert wrong == []
    # The label check is only as good as the series that have samples in this scenario.
    for name in ("chatgateway_messages_in_total", "chatgateway_agent_call_seconds_bucket",
                 "chatgateway_agent_failures_total", "chatgateway_messages_rejected_total",
                 "chatgateway_breaker_state", "chatgateway_adapter_up",
                 "chatgateway_adapter_last_event_timestamp_seconds",
                 "chatgateway_active_sessions"):
        assert scraped[name], f"{name} has no sample: the scenario no longer exercises it"


def test_dashboard_shows_what_the_issue_asks_per_tenant():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(dashboard_queries(dashboard))
    joined = "\n".join(exprs)
    # Per tenant: every query of a tenant-labelled metric honours the $tenant variable.
    tenant_metrics = re.compile(r"chatgateway_(messages_(in|out|rejected)_total|agent_|"
                                r"active_sessions|breaker_state|adapter_|deduplicated)")
    for expr in dashboard_queries(dashboard["panels"]):
        if tenant_metrics.search(expr):
            assert 'tenant=~"$tenant"' in expr, expr
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["tenant"]["includeAll"] and variables["tenant"]["multi"]
    for needed in ("rate(chatgateway_messages_in_total",
                   "histogram_quantile(0.5, sum by (le, tenant) (rate(chatgateway_agent_call_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le, tenant) (rate(chatgateway_agent_call_seconds_bucket",
                   "chatgateway_agent_failures_total", "chatgateway_messages_rejected_total",
                   "chatgateway_adapter_parked", "chatgateway_adapter_up",
                   "chatgateway_active_sessions", "chatgateway_breaker_state",
                   "chatgateway_connections_open"):
        assert needed in joined, needed
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (le, tenant) (rate(chatgateway_agent_call_seconds_bucket'
            '{tenant=~"$tenant"}[$__rate_interval]))) / on(tenant) group_left max(x_total) > 0.2 '
            'and time() - chatgateway_last_healthy_timestamp_seconds > 60')
    assert metric_names(expr) == {"chatgateway_agent_call_seconds_bucket", "x_total",
                                  "chatgateway_last_healthy_timestamp_seconds"}
    assert set(used_labels(expr)) == {("chatgateway_agent_call_seconds_bucket", "tenant"),
                                      (None, "le"), (None, "tenant")}


def test_exposition_names_include_suffixes():
    """A misspelt name or a missing suffix fails the comparison (the check is not vacuous)."""
    names = exported("# HELP a_total x\n# TYPE a_total counter\n"
                     "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\",tenant=\"t\"} 1\n"
                     "h_bucket{le=\"+Inf\",tenant=\"t\"} 1\nh_count{tenant=\"t\"} 1\n"
                     "h_sum{tenant=\"t\"} 1\n")
    assert {"a_total", "h_bucket", "h_count", "h_sum"} <= names.keys()
    assert "a" not in names and "h" not in names
    assert names["h_bucket"] == {"le", "tenant"}
