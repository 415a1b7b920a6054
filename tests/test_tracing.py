"""Traces: a span per message with store and agent children, `traceparent` sent to the agent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from chatgateway.daemon import Daemon
from chatgateway.errors import ConfigError
from tests.conftest import tenant, url, write_config
from tests.fakes.discord import FakeDiscord
from tests.fakes.slack import FakeSlack
from tests.test_discord_adapter import ALICE, discord_tenant
from tests.test_invoker_a2a import a2a_tenant, make_a2a  # noqa: F401 (a fixture)
from tests.test_invoker_openai import make_openai, openai_tenant  # noqa: F401 (a fixture)
from tests.test_lifecycle_supervisor import wait_until
from tests.test_slack_e2e import slack_tenant
from tests.test_slack_e2e import start as start_slack

KEY = "tracing-test-key-0123456789abcdef"

TracedGateway = Callable[..., Awaitable[tuple[Daemon, InMemorySpanExporter]]]


@pytest.fixture
async def traced_gateway(tmp_path: Path) -> AsyncIterator[TracedGateway]:
    """Start an in-process gateway whose spans go to an in-memory exporter."""
    daemons: list[Daemon] = []

    async def make(config: dict[str, Any], **tracing: Any) -> tuple[Daemon, InMemorySpanExporter]:
        config = {**config, "tracing": {"enabled": True, **tracing}}
        daemon = Daemon(write_config(tmp_path, config, f"gw-{len(daemons)}.yaml"), {})
        exporter = InMemorySpanExporter()
        daemon.span_exporter = exporter
        daemons.append(daemon)
        await daemon.start()
        return daemon, exporter

    yield make
    for daemon in daemons:
        await daemon.stop()


def traceparent(header: str) -> tuple[str, str, str]:
    """(trace id, parent span id, flags) of a W3C traceparent header."""
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00"
    return trace_id, span_id, flags


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def chat(http: Any, daemon: Daemon, text: str, user: str = "u1") -> dict[str, Any]:
    async with http.post(url(daemon, "/api/chat"), json={"message": text, "userId": user},
                         headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def test_web_message_is_one_trace_into_the_agent(traced_gateway, make_agent, http):
    agent = await make_agent()
    daemon, exporter = await traced_gateway(
        {"tenants": [tenant("acme", agent.url, keys=[KEY])]}, service_name="gw-test"
    )
    answer = await chat(http, daemon, "hello")
    assert answer["response"] == "agent: hello"

    spans = exporter.get_finished_spans()
    [message] = by_name(spans, "chatgateway.message")
    [agent_span] = by_name(spans, "chatgateway.agent_call")
    store_spans = [s for s in spans if s.name.startswith("store.")]
    assert message.attributes is not None
    assert message.attributes["chatgateway.tenant"] == "acme"
    assert message.attributes["chatgateway.platform"] == "web"
    assert message.attributes["chatgateway.outcome"] == "ok"
    assert message.attributes["chatgateway.session_id"] == answer["sessionId"]
    assert message.kind == SpanKind.CONSUMER
    assert message.resource.attributes["service.name"] == "gw-test"
    # The store's and the agent's work are children of the message's span, in one trace.
    ctx = message.get_span_context()
    assert message.parent is None
    for child in (agent_span, *store_spans):
        assert child.parent is not None and child.parent.span_id == ctx.span_id
        assert child.get_span_context().trace_id == ctx.trace_id
    names = {s.name for s in store_spans}
    assert {"store.history", "store.record_exchange"} <= names
    assert {s.attributes["db.system"] for s in store_spans if s.attributes} == {"sqlite"}
    assert agent_span.kind == SpanKind.CLIENT
    assert agent_span.status.status_code == StatusCode.UNSET

    # The agent got the agent call's span as its parent: its own spans join this trace.
    [call] = agent.calls
    trace_id, parent_id, flags = traceparent(call.headers["traceparent"])
    assert trace_id == f"{ctx.trace_id:032x}"
    assert parent_id == f"{agent_span.get_span_context().span_id:016x}"
    assert int(flags, 16) & 1  # sampled


async def test_each_message_is_its_own_trace_and_failures_are_marked(
    traced_gateway, make_agent, http
):
    agent = await make_agent(status=500)
    daemon, exporter = await traced_gateway(
        {"tenants": [tenant("acme", agent.url, keys=[KEY], agent={"retry": {"attempts": 2}})]}
    )
    await chat(http, daemon, "one")
    await chat(http, daemon, "two")

    spans = exporter.get_finished_spans()
    messages = by_name(spans, "chatgateway.message")
    assert len(messages) == 2
    assert messages[0].context.trace_id != messages[1].context.trace_id
    for message in messages:
        assert message.attributes is not None
        assert message.attributes["chatgateway.outcome"] == "fallback"
        assert message.attributes["chatgateway.cause"] == "http_5xx"
    agent_spans = by_name(spans, "chatgateway.agent_call")
    assert [s.status.status_code for s in agent_spans] == [StatusCode.ERROR] * 2
    # A retried call sends the same parent: both attempts belong to one agent call span.
    assert len(agent.calls) == 4
    first, second = (traceparent(c.headers["traceparent"]) for c in agent.calls[:2])
    assert first == second
    assert first[1] == f"{agent_spans[0].context.span_id:016x}"


async def test_refused_message_has_a_span_with_its_reason(traced_gateway, http):
    daemon, exporter = await traced_gateway({"tenants": [tenant(
        "acme", None, keys=[KEY], limits={"user": {"per_minute": 1, "burst": 1}})]})
    await chat(http, daemon, "first")
    async with http.post(url(daemon, "/api/chat"), json={"message": "again", "userId": "u1"},
                         headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 429
    async with http.post(url(daemon, "/api/chat"),
                         json={"message": "x", "userId": "u2", "sessionId": "s_not_there"},
                         headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 404
    spans = by_name(exporter.get_finished_spans(), "chatgateway.message")
    outcomes = [(s.attributes or {}).get("chatgateway.outcome") for s in spans]
    causes = [(s.attributes or {}).get("chatgateway.cause") for s in spans]
    assert outcomes == ["ok", "rejected", "not_found"]
    assert causes == [None, "user_rate", None]
    # Refusals are expected outcomes, not errors of the gateway.
    assert {s.status.status_code for s in spans} == {StatusCode.UNSET}


async def test_sample_ratio_zero_records_nothing_but_still_propagates(
    traced_gateway, make_agent, http
):
    agent = await make_agent()
    daemon, exporter = await traced_gateway(
        {"tenants": [tenant("acme", agent.url, keys=[KEY])]}, sample_ratio=0.0
    )
    await chat(http, daemon, "hello")
    assert exporter.get_finished_spans() == ()
    # The agent learns the message was not sampled (flag bit 0 clear) and can decide the same.
    assert not int(traceparent(agent.calls[0].headers["traceparent"])[2], 16) & 1


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


async def test_slack_message_through_the_fake_is_traced(traced_gateway, fake_slack, make_agent):
    agent = await make_agent()
    app = fake_slack.add_app()

    async def make(config: dict[str, Any]) -> Daemon:
        daemon, make.exporter = await traced_gateway(config)  # type: ignore[attr-defined]
        return daemon

    await start_slack(make, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.dm(app, "U0ALICE", "hello from slack")
    await fake_slack.wait_posts(1, channel="DU0ALICE")
    exporter: InMemorySpanExporter = make.exporter  # type: ignore[attr-defined]
    # The answer is posted inside the message's span (still holding the session's turn).
    await wait_until(lambda: by_name(exporter.get_finished_spans(), "chatgateway.message"))
    spans = exporter.get_finished_spans()
    [message] = by_name(spans, "chatgateway.message")
    assert message.attributes is not None
    assert message.attributes["chatgateway.platform"] == "slack"
    assert message.attributes["chatgateway.tenant"] == "acme"
    assert message.attributes["chatgateway.outcome"] == "ok"
    [call] = agent.calls
    assert traceparent(call.headers["traceparent"])[0] == f"{message.context.trace_id:032x}"


async def test_discord_message_through_the_fake_is_traced(traced_gateway, make_agent):
    fake = await FakeDiscord().start()
    try:
        agent = await make_agent()
        bot = fake.add_bot("acmebot")
        _daemon, exporter = await traced_gateway(
            {"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
        await fake.wait_ready(bot)
        await fake.message_create(bot, "hello from discord", channel_id="2001", author=ALICE)
        await fake.wait_posts(1, token=bot.token)
        # The answer is posted inside the message's span (still holding the session's turn).
        await wait_until(lambda: by_name(exporter.get_finished_spans(), "chatgateway.message"))
    finally:
        await fake.stop()
    [message] = by_name(exporter.get_finished_spans(), "chatgateway.message")
    assert message.attributes is not None
    assert message.attributes["chatgateway.platform"] == "discord"
    assert message.attributes["chatgateway.outcome"] == "ok"
    [call] = agent.calls
    assert traceparent(call.headers["traceparent"])[0] == f"{message.context.trace_id:032x}"


async def test_spans_reach_an_otlp_collector(tmp_path, make_agent, http):
    """The real OTLP/HTTP exporter: a loopback collector receives the spans by the stop."""
    received: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    agent = await make_agent()
    config = {"tenants": [tenant("acme", agent.url, keys=[KEY])],
              "tracing": {"enabled": True, "endpoint": f"http://127.0.0.1:{port}/v1/traces",
                          "service_name": "gw-otlp"}}
    daemon = Daemon(write_config(tmp_path, config), {})
    try:
        await daemon.start()
        await chat(http, daemon, "hello")
    finally:
        await daemon.stop()  # flushes the batch
        await runner.cleanup()
    spans = [(rs.resource, span) for req in received for rs in req.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    names = {span.name for _, span in spans}
    assert {"chatgateway.message", "chatgateway.agent_call", "store.history"} <= names
    resource = spans[0][0]
    assert {"key": "service.name", "value": "gw-otlp"} in [
        {"key": a.key, "value": a.value.string_value} for a in resource.attributes]


async def test_off_by_default_no_header_and_no_opentelemetry(tmp_path):
    """Without `tracing`, OpenTelemetry is never imported and the agent gets no traceparent."""
    script = f"""
import asyncio, sys
from chatgateway.daemon import Daemon
from chatgateway.testing.agent import FakeAgent
from tests.conftest import tenant, write_config
import aiohttp
from pathlib import Path

async def main():
    agent = await FakeAgent().start()
    path = write_config(Path({str(tmp_path)!r}), {{"tenants": [tenant("acme", agent.url, keys=[{KEY!r}])]}})
    daemon = Daemon(path, {{}})
    await daemon.start()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{{daemon.port}}/api/chat",
                             json={{"message": "hi", "userId": "u"}},
                             headers={{"Authorization": "Bearer {KEY}"}}) as resp:
            assert resp.status == 200
    await daemon.stop()
    await agent.stop()
    print(json.dumps({{"header": "traceparent" in agent.calls[0].headers,
                      "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}}))

import json
asyncio.run(main())
"""
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True,
        timeout=60, cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"header": False, "otel": []}


def test_tracing_config_is_validated(tmp_path):
    from chatgateway.config import load_config

    path = write_config(tmp_path, {"tracing": {"enabled": True, "sample_ratio": 2,
                                               "endpoint": "collector:4318", "colour": "x"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    paths = {p.path for p in info.value.problems}
    assert {"tracing.sample_ratio", "tracing.endpoint", "tracing.colour"} <= paths


async def test_openai_and_a2a_agents_get_the_traceparent_too(
    traced_gateway, make_openai, make_a2a, http, monkeypatch  # noqa: F811 (fixtures)
):
    """Every HTTP protocol sends it: aiohttp's client (chatgateway, openai) and httpx's (a2a)."""
    import uvicorn
    from starlette.datastructures import Headers

    a2a_headers: list[str | None] = []
    real_config = uvicorn.Config

    def recording_config(app: Any, **kwargs: Any) -> Any:
        async def recording(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] != "/.well-known/agent-card.json":
                a2a_headers.append(Headers(scope=scope).get("traceparent"))
            await app(scope, receive, send)

        return real_config(recording, **kwargs)

    monkeypatch.setattr(uvicorn, "Config", recording_config)  # the A2A test server's app
    openai = await make_openai()
    a2a = await make_a2a(streaming=False)
    openai_spec = openai_tenant(openai)
    a2a_spec = a2a_tenant(a2a)
    a2a_spec.update(id="globex", web={"enabled": True, "api_keys": [{"value": KEY}]})
    openai_spec["web"] = {"enabled": True, "api_keys": [{"value": KEY + "-openai"}]}
    daemon, exporter = await traced_gateway({"tenants": [openai_spec, a2a_spec]})
    for key in (KEY + "-openai", KEY):
        async with http.post(url(daemon, "/api/chat"), json={"message": "hi", "userId": "u"},
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200, await resp.text()
    calls = {(s.attributes or {})["chatgateway.tenant"]: s
             for s in by_name(exporter.get_finished_spans(), "chatgateway.agent_call")}
    sent = traceparent(openai.requests[0]["headers"]["traceparent"])
    assert sent[1] == f"{calls['acme'].context.span_id:016x}"
    assert a2a_headers and a2a_headers[-1] is not None
    assert traceparent(a2a_headers[-1])[1] == f"{calls['globex'].context.span_id:016x}"


def test_enabled_without_the_sdk_is_a_config_error_naming_the_extra(tmp_path):
    """Without the `tracing` extra installed, `enabled: true` is refused at its key path."""
    path = write_config(tmp_path, {"tracing": {"enabled": True}})
    script = f"""
import importlib.abc, sys
class NoOpenTelemetry(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NoOpenTelemetry())
from chatgateway.config import load_config
from chatgateway.errors import ConfigError
try:
    load_config({str(path)!r}, {{}})
except ConfigError as exc:
    print("|".join(f"{{p.path}}: {{p.message}}" for p in exc.problems))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "tracing.enabled: needs OpenTelemetry: pip install 'chatgateway[tracing]'")


async def test_changing_tracing_needs_a_restart(traced_gateway, tmp_path):
    daemon, _exporter = await traced_gateway({"tenants": [tenant("acme", None, keys=[KEY])]})
    config = {"tenants": [tenant("acme", None, keys=[KEY])],
              "tracing": {"enabled": True, "sample_ratio": 0.5}}
    write_config(tmp_path, config, daemon.config_path.name)
    result = await daemon.reload()
    assert result.ok and result.restart_needed == ["tracing"]
