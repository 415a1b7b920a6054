"""The agent invoker through the real web API: protocol, signing, retries, deadlines, fallbacks."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web

from chatgateway.invoker import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    idempotency_key,
    verify_signature,
)
from chatgateway.testing.agent import AgentCall
from tests.conftest import tenant, url
from tests.test_lifecycle_supervisor import wait_until

FALLBACK = "The agent is away, try later."


@dataclass
class RawAgent:
    """An agent on 127.0.0.1:0 that answers every request with fixed bytes, then hangs up."""

    answer: bytes
    url: str = ""
    calls: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        self.calls += 1
        writer.write(self.answer)
        await writer.drain()
        writer.close()


@pytest.fixture
async def make_raw_agent() -> AsyncIterator[Callable[[bytes], Awaitable[RawAgent]]]:
    servers: list[asyncio.Server] = []

    async def make(answer: bytes) -> RawAgent:
        agent = RawAgent(answer)
        server = await asyncio.start_server(agent.handle, "127.0.0.1", 0)
        servers.append(server)
        agent.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/agent"
        return agent

    yield make
    for server in servers:
        server.close()
        await server.wait_closed()


async def chat(http, gw, key, message, user="u1", **extra):
    body = {"message": message, "userId": user, **extra}
    async with http.post(url(gw, "/api/chat"), json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


def log_events(capsys) -> list[dict]:
    events = []
    for line in capsys.readouterr().out.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


async def test_agent_receives_the_documented_payload_signed(make_agent, make_gateway, http):
    secret = "agent-signing-secret-42"
    agent = await make_agent(secret=secret.encode())
    gw = await make_gateway({"tenants": [tenant(
        "acme", agent.url, keys=["acme-key-0001"],
        agent={"secret": {"value": secret}, "bearer_token": {"value": "agent-bearer-xyz"}},
    )]})
    status, body = await chat(http, gw, "acme-key-0001", "first", userName="Alice",
                              metadata={"page": "/pricing"})
    assert status == 200 and body["response"] == "agent: first"
    status, body2 = await chat(http, gw, "acme-key-0001", "second")
    assert body2["sessionId"] == body["sessionId"]
    call = agent.calls[1]
    payload = call.body
    assert payload["version"] == 1
    assert payload["tenant"] == "acme"
    assert payload["sessionId"] == body["sessionId"]
    assert payload["platform"] == "web"
    assert payload["user"] == {"id": "u1", "name": None}
    assert payload["conversation"] == {"id": "u1", "type": "web", "threadId": None}
    assert payload["message"]["text"] == "second"
    assert [(t["role"], t["text"]) for t in payload["history"]] == [
        ("user", "first"), ("agent", "agent: first")]
    assert agent.calls[0].body["metadata"] == {"page": "/pricing"}
    assert agent.calls[0].body["user"]["name"] == "Alice"
    assert call.headers["Authorization"] == "Bearer agent-bearer-xyz"
    assert verify_signature(secret.encode(), call.headers[TIMESTAMP_HEADER], call.raw,
                            call.headers[SIGNATURE_HEADER])
    assert not verify_signature(b"wrong", call.headers[TIMESTAMP_HEADER], call.raw,
                                call.headers[SIGNATURE_HEADER])
    assert len(call.headers["Idempotency-Key"]) == 40
    assert call.headers["Idempotency-Key"] != agent.calls[0].headers["Idempotency-Key"]


async def test_history_length_is_per_tenant(make_agent, make_gateway, http):
    agent = await make_agent()
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=["acme-key-0001"],
                                                agent={"history_turns": 3})]})
    for i in range(4):
        await chat(http, gw, "acme-key-0001", f"m{i}")
    assert [t["text"] for t in agent.calls[3].body["history"]] == ["agent: m1", "m2", "agent: m2"]


async def test_each_tenant_reaches_its_own_agent_with_its_own_timeout(
    make_agent, make_gateway, http, capsys
):
    slow = await make_agent(delay=1.0, prefix="slow: ")
    fast = await make_agent(prefix="fast: ")
    gw = await make_gateway({"tenants": [
        tenant("patient", slow.url, keys=["key-patient-1"], agent={"timeout": 5}),
        tenant("hasty", slow.url, keys=["key-hasty-001"],
               agent={"timeout": 0.3, "fallback_text": FALLBACK}),
        tenant("other", fast.url, keys=["key-other-001"]),
    ]})
    results = await asyncio.gather(
        chat(http, gw, "key-patient-1", "p"),
        chat(http, gw, "key-hasty-001", "h"),
        chat(http, gw, "key-other-001", "o"),
    )
    assert results[0][1]["response"] == "slow: p"
    assert results[1][1]["response"] == FALLBACK
    assert results[2][1]["response"] == "fast: o"
    assert [c.body["tenant"] for c in fast.calls] == ["other"]
    assert sorted(c.body["tenant"] for c in slow.calls) == ["hasty", "patient"]
    failed = [e for e in log_events(capsys) if e.get("event") == "agent_failed"]
    assert [(e["tenant_id"], e["cause"]) for e in failed] == [("hasty", "timeout")]


async def test_5xx_is_retried_then_succeeds(make_agent, make_gateway, http):
    attempts: list[AgentCall] = []

    async def flaky(call: AgentCall) -> web.Response:
        attempts.append(call)
        if len(attempts) < 3:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"response": "third time lucky"})

    agent = await make_agent(behaviour=flaky)
    gw = await make_gateway({"tenants": [tenant(
        "acme", agent.url, keys=["acme-key-0001"],
        agent={"retry": {"attempts": 3, "backoff_initial": 0.01, "backoff_max": 0.05}},
    )]})
    status, body = await chat(http, gw, "acme-key-0001", "hi")
    assert (status, body["response"]) == (200, "third time lucky")
    assert len(attempts) == 3
    assert len({c.headers["Idempotency-Key"] for c in attempts}) == 1


async def test_500_gives_fallback_and_logged_cause(make_agent, make_gateway, http, capsys):
    agent = await make_agent(status=500)
    gw = await make_gateway({"tenants": [tenant(
        "acme", agent.url, keys=["acme-key-0001"],
        agent={"fallback_text": FALLBACK, "retry": {"attempts": 2, "backoff_initial": 0.01}},
    )]})
    status, body = await chat(http, gw, "acme-key-0001", "hi")
    assert (status, body["response"]) == (200, FALLBACK)
    assert len(agent.calls) == 2
    events = log_events(capsys)
    failed = [e for e in events if e.get("event") == "agent_failed"]
    assert failed and failed[0]["cause"] == "http_5xx" and "500" in failed[0]["detail"]
    handled = [e for e in events if e.get("event") == "message_handled"]
    assert handled[-1]["outcome"] == "fallback" and handled[-1]["tenant_id"] == "acme"


async def test_4xx_is_not_retried(make_agent, make_gateway, http):
    agent = await make_agent(status=422)
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=["acme-key-0001"],
                                                agent={"fallback_text": FALLBACK})]})
    _, body = await chat(http, gw, "acme-key-0001", "hi")
    assert body["response"] == FALLBACK and len(agent.calls) == 1


async def test_connection_refused_gives_fallback(make_gateway, http, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    gw = await make_gateway({"tenants": [tenant(
        "acme", f"http://127.0.0.1:{port}/agent", keys=["acme-key-0001"],
        agent={"fallback_text": FALLBACK, "retry": {"attempts": 2, "backoff_initial": 0.01}},
    )]})
    status, body = await chat(http, gw, "acme-key-0001", "hi")
    assert (status, body["response"]) == (200, FALLBACK)
    failed = [e for e in log_events(capsys) if e.get("event") == "agent_failed"]
    assert failed[0]["cause"] == "connection_error"


async def test_empty_response_sends_nothing_but_keeps_the_user_turn(make_agent, make_gateway, http):
    async def silent(call: AgentCall) -> web.Response:
        return web.json_response({"response": ""})

    agent = await make_agent(behaviour=silent)
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=["acme-key-0001"])]})
    status, body = await chat(http, gw, "acme-key-0001", "hi")
    assert (status, body["response"]) == (200, "")
    async with http.get(url(gw, f"/api/sessions/{body['sessionId']}"),
                        headers={"Authorization": "Bearer acme-key-0001"}) as resp:
        detail = await resp.json()
    assert [t["role"] for t in detail["transcript"]] == ["user"]


async def test_messages_of_one_session_reach_the_agent_in_order(make_agent, make_gateway, http):
    in_agent = 0
    overlaps = 0

    async def one_at_a_time(call: AgentCall) -> web.Response:
        nonlocal in_agent, overlaps
        in_agent += 1
        overlaps += in_agent > 1
        await asyncio.sleep(0.02)
        in_agent -= 1
        return web.json_response({"response": call.body["message"]["text"]})

    agent = await make_agent(behaviour=one_at_a_time)
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=["acme-key-0001"])]})
    first = await chat(http, gw, "acme-key-0001", "m0")
    sid = first[1]["sessionId"]
    tasks = [asyncio.create_task(chat(http, gw, "acme-key-0001", f"m{i}", sessionId=sid))
             for i in range(1, 8)]
    await asyncio.gather(*tasks)
    assert overlaps == 0
    texts = agent.texts()
    assert sorted(texts) == sorted(f"m{i}" for i in range(8))
    # Each call saw exactly the turns of the calls before it: no interleaving.
    for call in agent.calls:
        assert len(call.body["history"]) == 2 * agent.calls.index(call)


async def test_queued_messages_of_one_session_reach_the_agent_in_arrival_order(
    make_agent, make_gateway, http
):
    """Each message enters the gateway only after the one before it; the agent sees that order."""
    gate = asyncio.Event()

    async def held(call: AgentCall) -> web.Response:
        text = call.body["message"]["text"]
        if text != "m0":
            await gate.wait()  # m1 holds the session; m2..m7 queue behind it in the gateway
        return web.json_response({"response": f"re {text}"})

    agent = await make_agent(behaviour=held)
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=["acme-key-0001"])]})
    _, first = await chat(http, gw, "acme-key-0001", "m0")
    sid = first["sessionId"]
    tasks = []
    for i in range(1, 8):
        tasks.append(asyncio.create_task(chat(http, gw, "acme-key-0001", f"m{i}", sessionId=sid)))
        # The pipeline counts a message as active in the same step as it joins the session's
        # queue, so m{i+1} is sent only once m{i} is queued (or, for m1, holds the session).
        await wait_until(lambda i=i: gw.pipeline.active == i)
    await agent.wait_calls(2)
    assert agent.texts() == ["m0", "m1"], "m2..m7 must wait for m1's answer"
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [body["response"] for _, body in results] == [f"re m{i}" for i in range(1, 8)]
    assert agent.texts() == [f"m{i}" for i in range(8)]
    for n, call in enumerate(agent.calls):
        assert [(t["role"], t["text"]) for t in call.body["history"]] == [
            turn for i in range(n) for turn in (("user", f"m{i}"), ("agent", f"re m{i}"))
        ], f"history of m{n}"


async def test_different_sessions_run_concurrently(make_agent, make_gateway, http):
    agent = await make_agent(delay=0.5)
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=["acme-key-0001"])]})
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*(chat(http, gw, "acme-key-0001", "x", user=f"u{i}") for i in range(6)))
    # Six half-second calls in sequence would take 3 s.
    assert asyncio.get_running_loop().time() - started < 2.5


def test_idempotency_key_is_stable_per_platform_message():
    from chatgateway.models import (
        Conversation,
        ConversationKind,
        NormalizedMessage,
        Platform,
        TenantId,
        User,
    )

    def msg(tenant: str, mid: str) -> NormalizedMessage:
        return NormalizedMessage(TenantId(tenant), Platform.SLACK,
                                 Conversation("C1", ConversationKind.CHANNEL), User("U1"), "t",
                                 mid, 0.0)

    assert idempotency_key(msg("a", "1")) == idempotency_key(msg("a", "1"))
    assert idempotency_key(msg("a", "1")) != idempotency_key(msg("b", "1"))
    assert idempotency_key(msg("a", "1")) != idempotency_key(msg("a", "2"))


async def test_a_new_agent_url_lets_the_call_in_flight_finish(make_agent, make_gateway, http):
    from tests.conftest import ADMIN_TOKEN

    old = await make_agent(delay=0.5, prefix="old: ")
    new = await make_agent(prefix="new: ")
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}}, "tenants": []})
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    spec = {"id": "acme", "agent": {"url": old.url}}
    async with http.post(url(gw, "/admin/tenants"), json=spec, headers=admin) as resp:
        assert resp.status == 201
    async with http.post(url(gw, "/admin/tenants/acme/keys"), json={}, headers=admin) as resp:
        key = (await resp.json())["key"]
    in_flight = asyncio.create_task(chat(http, gw, key, "first"))
    await old.wait_calls(1)
    spec["agent"] = {"url": new.url}
    async with http.put(url(gw, "/admin/tenants/acme"), json=spec, headers=admin) as resp:
        assert resp.status == 200
    status, body = await in_flight
    assert (status, body["response"]) == (200, "old: first")
    assert len(old.calls) == 1  # finished on the old client, not cut off and sent again
    _, body = await chat(http, gw, key, "second")
    assert body["response"] == "new: second"


def _answer(body: bytes, content_type: str = "application/json", status: int = 200):
    async def behaviour(call: AgentCall) -> web.Response:
        return web.Response(body=body, status=status, headers={"Content-Type": content_type})

    return behaviour


@pytest.mark.parametrize("behaviour", [
    _answer(b"{not json"),
    _answer(b'["a", "list"]'),
    _answer(b'"just a string"'),
    _answer(b'{"response": 42}'),
    _answer(b'{"delta": "' + b"x" * 1_000_000 + b'"}\n', "application/x-ndjson"),
    _answer(b"[1]\n", "application/x-ndjson"),
], ids=["invalid_json", "json_list", "json_string", "response_not_text", "stream_line_too_long",
        "stream_line_not_object"])
async def test_a_malformed_answer_gives_fallback(behaviour, make_agent, make_gateway, http, capsys):
    agent = await make_agent(behaviour=behaviour)
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=["acme-key-0001"],
                                                agent={"fallback_text": FALLBACK})]})
    status, body = await chat(http, gw, "acme-key-0001", "hi")
    assert (status, body["response"]) == (200, FALLBACK)
    assert len(agent.calls) == 1
    failed = [e for e in log_events(capsys) if e.get("event") == "agent_failed"]
    assert [e["cause"] for e in failed] == ["bad_response"]


async def test_too_many_redirects_gives_fallback(make_agent, make_gateway, http, capsys):
    async def loop(call: AgentCall) -> web.Response:
        raise web.HTTPTemporaryRedirect("/agent")  # 307 keeps the POST: a redirect loop

    agent = await make_agent(behaviour=loop)
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=["acme-key-0001"],
                                                agent={"fallback_text": FALLBACK})]})
    status, body = await chat(http, gw, "acme-key-0001", "hi")
    assert (status, body["response"]) == (200, FALLBACK)
    failed = [e for e in log_events(capsys) if e.get("event") == "agent_failed"]
    assert [e["cause"] for e in failed] == ["bad_response"]
    assert "TooManyRedirects" in failed[0]["detail"]


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 abc\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: nonsense\r\n\r\n{}",
], ids=["bad_status_line", "bad_header"])
async def test_malformed_http_gives_fallback(answer, make_raw_agent, make_gateway, http, capsys):
    agent = await make_raw_agent(answer)
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=["acme-key-0001"],
                                                agent={"fallback_text": FALLBACK})]})
    status, body = await chat(http, gw, "acme-key-0001", "hi")
    assert (status, body["response"]) == (200, FALLBACK)
    assert agent.calls == 1
    failed = [e for e in log_events(capsys) if e.get("event") == "agent_failed"]
    assert [e["cause"] for e in failed] == ["bad_response"]


async def test_a_stream_broken_after_a_delta_is_not_retried(make_raw_agent, make_gateway, http,
                                                            capsys):
    line = b'{"delta": "Hel"}\n'
    agent = await make_raw_agent(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(line):x}".encode() + b"\r\n" + line
        + b"\r\n"  # ...and the connection drops before the last chunk
    )
    gw = await make_gateway({"tenants": [tenant(
        "acme", agent.url, keys=["acme-key-0001"],
        agent={"fallback_text": FALLBACK, "retry": {"attempts": 3, "backoff_initial": 0.01}},
    )]})
    async with http.post(url(gw, "/api/chat/stream"), json={"message": "hi", "userId": "u1"},
                         headers={"Authorization": "Bearer acme-key-0001"}) as resp:
        assert resp.status == 200
        events = [json.loads(line) async for line in resp.content if line.strip()]
    assert [e["text"] for e in events if e["type"] == "delta"] == ["Hel"]
    assert events[-1]["type"] == "done"
    assert (events[-1]["response"], events[-1]["outcome"]) == (FALLBACK, "fallback")
    assert agent.calls == 1
    failed = [e for e in log_events(capsys) if e.get("event") == "agent_failed"]
    assert [e["cause"] for e in failed] == ["stream_broken"]


async def test_every_retry_wait_is_jittered(make_agent, make_gateway, http):
    seen: dict[str, list[float]] = {}

    async def fails_once(call: AgentCall) -> web.Response:
        times = seen.setdefault(call.headers["Idempotency-Key"], [])
        times.append(time.monotonic())
        if len(times) == 1:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"response": "ok"})

    agent = await make_agent(behaviour=fails_once)
    gw = await make_gateway({"tenants": [tenant(
        "acme", agent.url, keys=["acme-key-0001"],
        agent={"retry": {"attempts": 2, "backoff_initial": 0.5, "backoff_max": 2}},
    )]})
    results = await asyncio.gather(
        *(chat(http, gw, "acme-key-0001", "x", user=f"u{i}") for i in range(6)))
    assert [body["response"] for _, body in results] == ["ok"] * 6
    waits = [times[1] - times[0] for times in seen.values()]
    # A fixed first wait would be 0.5 s for all six; full jitter draws each from [0, 0.5].
    assert max(waits) < 0.75 and min(waits) < 0.4, waits


async def test_an_unexpected_invoker_error_gives_fallback_and_a_scrubbed_traceback(
    make_gateway, http, capsys
):
    bearer = "bearer-that-must-not-leak-1234"

    class BrokenInvoker:
        async def invoke(self, request, on_delta=None):
            raise RuntimeError(f"a bug holding {bearer}")

        async def close(self):
            return None

    gw = await make_gateway({"tenants": [tenant(
        "acme", "http://127.0.0.1:9/agent", keys=["acme-key-0001"],
        agent={"fallback_text": FALLBACK, "bearer_token": {"value": bearer}},
    )]})
    runtime = gw.tenants.get("acme")
    await runtime.invoker.close()
    runtime.invoker = BrokenInvoker()
    status, body = await chat(http, gw, "acme-key-0001", "hi")
    assert (status, body["response"]) == (200, FALLBACK)
    out = capsys.readouterr().out
    assert bearer not in out
    failed = [json.loads(line) for line in out.splitlines()
              if line.startswith("{") and '"agent_failed"' in line]
    assert [e["cause"] for e in failed] == ["internal"]
    assert "RuntimeError" in failed[0]["detail"] and "Traceback" in failed[0]["exception"]


async def test_agent_headers_may_be_secret_references_and_are_scrubbed(
    make_agent, make_gateway, http, capsys
):
    import structlog

    header_secret = "header-secret-from-env-77"
    agent = await make_agent()
    gw = await make_gateway({"tenants": [tenant(
        "acme", agent.url, keys=["acme-key-0001"],
        agent={"headers": {"X-Api-Key": {"env": "AGENT_KEY"}, "X-Plain": "as-given"}},
    )]}, environ={"AGENT_KEY": header_secret})
    assert header_secret not in repr(gw.tenants.get("acme").config)
    _, body = await chat(http, gw, "acme-key-0001", "hi")
    assert body["response"] == "agent: hi"
    assert agent.calls[0].headers["X-Api-Key"] == header_secret
    assert agent.calls[0].headers["X-Plain"] == "as-given"
    structlog.get_logger("test").info("probe", detail=f"key={header_secret}")
    await asyncio.sleep(0)  # lines are written at the end of the loop iteration
    out = capsys.readouterr().out
    assert header_secret not in out and "key=[redacted]" in out
