"""protocol: openai against a local server speaking Chat Completions, checked by the openai client.

The fake's answers are parsed by the `openai` library in `test_the_fake_speaks_what_openai_parses`
(and the gateway's request compared with the library's own), so the fake cannot drift from the
real wire format.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from aiohttp import web

from chatgateway.config import parse_tenant
from chatgateway.errors import ConfigError
from tests.conftest import ADMIN_TOKEN, tenant, url, write_config
from tests.test_agent_calls import chat, log_events

API_KEY = "sk-test-openai-key-0123456789abcdef"
KEY = "acme-key-0001"


@dataclass
class Reply:
    """One scripted answer: an HTTP error, or a completion of `text`."""

    status: int = 200
    text: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""
    finish_reason: str = "stop"


@dataclass
class FakeOpenAI:
    """POST /v1/chat/completions as OpenAI answers it: JSON, or SSE chunks when stream=true."""

    replies: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    base_url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(
            {"body": body, "headers": dict(request.headers), "query": dict(request.query)}
        )
        self.times.append(time.monotonic())
        reply = self.replies.pop(0) if self.replies else Reply(text=default_text(body))
        if reply.status != 200:
            error = {"message": reply.error, "type": "invalid_request_error", "param": None,
                     "code": None}
            return web.json_response({"error": error}, status=reply.status,
                                     headers=reply.headers)
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        usage = {"prompt_tokens": prompt, "completion_tokens": len(reply.text.split()),
                 "total_tokens": prompt + len(reply.text.split())}
        base = {"id": "chatcmpl-1", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            return web.json_response({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": reply.finish_reason, "logprobs": None,
                             "message": {"role": "assistant", "content": reply.text}}],
                "usage": usage,
            })
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(chunk: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        chunk = {**base, "object": "chat.completion.chunk"}
        await event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                  "content": ""},
                                          "finish_reason": None}]})
        for word in reply.text.split(" "):
            await event({**chunk, "choices": [{"index": 0, "delta": {"content": word + " "},
                                              "finish_reason": None}]})
        await event({**chunk, "choices": [{"index": 0, "delta": {},
                                          "finish_reason": reply.finish_reason}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await event({**chunk, "choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def default_text(body: dict[str, Any]) -> str:
    return f"model says {body['messages'][-1]['content']}"


@pytest.fixture
async def make_openai() -> AsyncIterator[Callable[..., Awaitable[FakeOpenAI]]]:
    runners: list[web.AppRunner] = []

    async def make(*replies: Reply) -> FakeOpenAI:
        fake = FakeOpenAI(list(replies))
        app = web.Application()
        app.router.add_post("/v1/chat/completions", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        fake.base_url = f"http://127.0.0.1:{port}/v1"
        return fake

    yield make
    for runner in runners:
        await runner.cleanup()


def openai_tenant(fake: FakeOpenAI, **agent: Any) -> dict[str, Any]:
    spec = {"protocol": "openai", "model": "gpt-test", "bearer_token": {"value": API_KEY},
            "fallback_text": "FALLBACK", "timeout": 5,
            "retry": {"attempts": 3, "backoff_initial": 0.01, "backoff_max": 0.05}, **agent}
    return tenant("acme", fake.base_url, keys=[KEY], agent=spec)


async def gateway(make_gateway, fake: FakeOpenAI, **agent: Any):
    return await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}},
                               "tenants": [openai_tenant(fake, **agent)]})


async def stream(http, gw, message: str) -> list[dict[str, Any]]:
    async with http.post(url(gw, "/api/chat/stream"), json={"message": message, "userId": "u1"},
                         headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200
        return [json.loads(line) async for line in resp.content if line.strip()]


async def usage(http, gw, tenant_id: str = "acme", **query: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url(gw, f"/admin/tenants/{tenant_id}/usage"), params=query,
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        return resp.status, await resp.json()


async def test_the_fake_speaks_what_openai_parses(make_openai, make_gateway, http):
    fake = await make_openai()
    client = openai.AsyncOpenAI(base_url=fake.base_url, api_key=API_KEY, max_retries=0)
    try:
        completion = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi there"}])
        assert completion.choices[0].message.content == "model says hi there"
        assert completion.usage is not None and completion.usage.prompt_tokens == 2
        chunks = [c async for c in await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip() == "model says hi"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    finally:
        await client.close()
    library_plain, library_stream = fake.requests
    gw = await gateway(make_gateway, fake)
    await chat(http, gw, KEY, "hello")
    await stream(http, gw, "again")
    ours_plain, ours_stream = fake.requests[2:]
    # Our requests have the library's shape: the same keys, roles and auth header.
    assert set(library_plain["body"]) <= set(ours_plain["body"])
    assert set(library_stream["body"]) <= set(ours_stream["body"])
    assert ours_stream["body"]["stream_options"] == {"include_usage": True}
    for ours in (ours_plain, ours_stream):
        assert ours["headers"]["Authorization"] == library_plain["headers"]["Authorization"]
        assert ours["headers"]["Content-Type"] == "application/json"


async def test_plain_call_maps_system_prompt_and_history(make_openai, make_gateway, http):
    fake = await make_openai()
    gw = await gateway(make_gateway, fake, system_prompt="Be brief.",
                       headers={"api-key": {"value": "azure-key-0123456789"}},
                       query={"api-version": "2024-10-21"})
    status, body = await chat(http, gw, KEY, "first")
    assert status == 200 and body["response"] == "model says first"
    status, body = await chat(http, gw, KEY, "second")
    assert body["response"] == "model says second"
    request = fake.requests[1]
    assert request["body"]["model"] == "gpt-test"
    assert "stream" not in request["body"]
    assert request["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "model says first"},
        {"role": "user", "content": "second"},
    ]
    assert request["query"] == {"api-version": "2024-10-21"}
    assert request["headers"]["api-key"] == "azure-key-0123456789"


async def test_streamed_answer_is_relayed_as_deltas_and_usage_counted(
    make_openai, make_gateway, http
):
    fake = await make_openai()
    gw = await gateway(make_gateway, fake)
    events = await stream(http, gw, "tell me")
    deltas = [e["text"] for e in events if e["type"] == "delta"]
    assert "".join(deltas).strip() == "model says tell me"
    done = events[-1]
    assert done["type"] == "done" and done["response"].strip() == "model says tell me"
    assert fake.requests[0]["body"]["stream"] is True
    status, report = await usage(http, gw)
    assert status == 200
    # The fake counts words: 2 prompt tokens, 4 completion tokens.
    assert report["total"] == {"calls": 1, "tokensIn": 2, "tokensOut": 4}


async def test_429_is_retried_after_retry_after(make_openai, make_gateway, http):
    fake = await make_openai(Reply(429, error="Rate limit reached", headers={"Retry-After": "0.3"}))
    gw = await gateway(make_gateway, fake)
    status, body = await chat(http, gw, KEY, "hi")
    assert status == 200 and body["response"] == "model says hi"
    assert len(fake.requests) == 2
    # The backoff alone would have waited at most 0.05 s.
    assert fake.times[1] - fake.times[0] >= 0.3


async def test_retry_after_past_the_deadline_gives_the_fallback_at_once(
    make_openai, make_gateway, http, capsys
):
    fake = await make_openai(Reply(429, error="slow down", headers={"Retry-After": "60"}))
    gw = await gateway(make_gateway, fake)
    started = time.monotonic()
    _status, body = await chat(http, gw, KEY, "hi")
    assert body["response"] == "FALLBACK" and time.monotonic() - started < 4
    assert len(fake.requests) == 1
    failed = [e for e in log_events(capsys) if e.get("event") == "agent_failed"]
    assert failed[0]["cause"] == "http_429" and "slow down" in failed[0]["detail"]


async def test_5xx_is_retried(make_openai, make_gateway, http):
    fake = await make_openai(Reply(503, error="overloaded"), Reply(500, error="oops"))
    gw = await gateway(make_gateway, fake)
    _status, body = await chat(http, gw, KEY, "hi")
    assert body["response"] == "model says hi" and len(fake.requests) == 3


async def test_401_is_not_retried_and_logged_without_the_key(make_openai, make_gateway, http,
                                                             capsys):
    fake = await make_openai(Reply(401, error=f"Incorrect API key provided: {API_KEY}."))
    gw = await gateway(make_gateway, fake)
    status, body = await chat(http, gw, KEY, "hi")
    assert status == 200 and body["response"] == "FALLBACK"
    assert len(fake.requests) == 1
    out = capsys.readouterr().out
    assert API_KEY not in out
    failed = [json.loads(line) for line in out.splitlines()
              if '"agent_failed"' in line]
    assert failed[0]["cause"] == "http_4xx"
    assert "HTTP 401: Incorrect API key provided" in failed[0]["detail"]


async def test_content_filter_gives_the_notice_or_the_fallback(make_openai, make_gateway, http):
    fake = await make_openai(Reply(text="", finish_reason="content_filter"),
                             Reply(text="", finish_reason="content_filter"))
    gw = await gateway(make_gateway, fake, content_filter_notice="I can't help with that.")
    _status, body = await chat(http, gw, KEY, "bad")
    assert body["response"] == "I can't help with that."
    events = await stream(http, gw, "bad again")
    assert events[-1]["response"] == "I can't help with that."
    plain = await make_openai(Reply(text="", finish_reason="content_filter"))
    gw2 = await make_gateway({"tenants": [openai_tenant(plain)]})
    _status, body = await chat(http, gw2, KEY, "bad")
    assert body["response"] == "FALLBACK"


def test_config_validation_names_the_problem():
    base = {"id": "acme", "agent": {"url": "http://127.0.0.1:1/v1", "protocol": "openai"}}
    with pytest.raises(ConfigError) as info:
        parse_tenant(base, environ={})
    assert "needs model" in str(info.value.problems[0].message)
    assert info.value.problems[0].path.endswith("agent")
    with pytest.raises(ConfigError) as info:
        parse_tenant({"id": "acme", "agent": {"url": "http://127.0.0.1:1/", "model": "m"}},
                     environ={})
    assert "only for protocol: openai" in info.value.problems[0].message
    with pytest.raises(ConfigError) as info:
        parse_tenant({"id": "acme", "agent": {"url": "http://127.0.0.1:1/", "protocol": "gpt"}},
                     environ={})
    assert info.value.problems[0].path.endswith("agent.protocol")


async def test_a_reload_switches_the_protocol(make_openai, make_agent, make_gateway, http):
    agent = await make_agent()
    fake = await make_openai()
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=[KEY])]})
    _status, body = await chat(http, gw, KEY, "hi")
    assert body["response"] == "agent: hi"
    write_config(gw.config_path.parent, {"tenants": [openai_tenant(fake)]},
                 gw.config_path.name)
    result = await gw.reload()
    assert result.ok and result.changes == ["changed acme"]
    _status, body = await chat(http, gw, KEY, "hi")
    assert body["response"] == "model says hi" and len(fake.requests) == 1
