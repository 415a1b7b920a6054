"""Agents that answer later: 202 Accepted, then a POST to the request's callback.

Through the real web API, a real SQLite file and a loopback agent (chatgateway.testing.agent).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from chatgateway.callbacks import SWEEP_INTERVAL
from chatgateway.testing.agent import AgentCall, FakeAgent
from tests.conftest import tenant, url
from tests.test_store import postgres_schema

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "slow_agent.py"
KEY_A = "key-a-0123456789abcdef0123456789"
KEY_B = "key-b-0123456789abcdef0123456789"
FALLBACK = "The agent took too long."


async def accept_later(call: AgentCall) -> web.StreamResponse:
    return web.json_response({"status": "working"}, status=202)


def config(agent_url: str, **agent: Any) -> dict[str, Any]:
    settings = {"fallback_text": FALLBACK, **agent}
    return {
        "tenants": [
            tenant("acme", agent_url, keys=[KEY_A], agent=settings),
            tenant("beta", agent_url, keys=[KEY_B], agent=settings),
        ]
    }


async def chat(http: aiohttp.ClientSession, gw: Any, text: str, key: str = KEY_A,
               **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"message": text, "userId": "u1", **extra}
    async with http.post(url(gw, "/api/chat"), json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


async def transcript(http: aiohttp.ClientSession, gw: Any, session_id: str,
                     key: str = KEY_A) -> list[tuple[str, str]]:
    async with http.get(url(gw, f"/api/sessions/{session_id}"),
                        headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()
        return [(t["role"], t["text"]) for t in (await resp.json())["transcript"]]


async def pending(http: aiohttp.ClientSession, gw: Any, session_id: str) -> dict[str, Any]:
    async with http.get(url(gw, f"/api/sessions/{session_id}/callback"),
                        headers={"Authorization": f"Bearer {KEY_A}"}) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def post_callback(http: aiohttp.ClientSession, target: str, token: str | None,
                        body: Any, *, ndjson: bool = False) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if ndjson:
        headers["Content-Type"] = "application/x-ndjson"
        data = "".join(json.dumps(line) + "\n" for line in body).encode()
        async with http.post(target, data=data, headers=headers) as resp:
            return resp.status, await resp.json()
    async with http.post(target, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def wait_until(predicate: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.05)


def on(gw: Any, callback_url: str) -> str:
    """The callback URL on `gw` (another process's port after a restart)."""
    path = callback_url.split("/api/callbacks/", 1)[1]
    return url(gw, f"/api/callbacks/{path}")


async def test_a_callback_after_a_delay_reaches_the_web_session(make_agent, make_gateway, http):
    agent: FakeAgent = await make_agent(behaviour=accept_later)
    gw = await make_gateway(config(agent.url))
    status, body = await chat(http, gw, "write me a report")
    assert status == 200
    assert body["deferred"] is True and body["response"] == ""
    session_id = body["sessionId"]
    callback = agent.calls[0].body["callback"]
    assert callback["url"] == url(gw, callback["url"].split(f":{gw.port}", 1)[1])
    assert "/api/callbacks/" in callback["url"]
    assert callback["expiresAt"] > time.time() + 800  # the default: 15 minutes
    # The user's turn is recorded at once; the answer is pending.
    assert await transcript(http, gw, session_id) == [("user", "write me a report")]
    assert (await pending(http, gw, session_id))["pending"] is True

    await asyncio.sleep(0.5)
    status, answer = await post_callback(http, callback["url"], callback["token"],
                                         {"text": "Here is the **report**."})
    assert (status, answer) == (200, {"delivered": True})
    assert await transcript(http, gw, session_id) == [
        ("user", "write me a report"), ("agent", "Here is the **report**.")]
    assert await pending(http, gw, session_id) == {
        "pending": False, "text": "Here is the **report**.", "expired": False,
        "expiresAt": callback["expiresAt"], "callbackId": callback["url"].rsplit("/", 1)[1]}


async def test_a_retried_callback_is_delivered_once(make_agent, make_gateway, http):
    agent = await make_agent(behaviour=accept_later)
    gw = await make_gateway(config(agent.url))
    _, body = await chat(http, gw, "hello")
    callback = agent.calls[0].body["callback"]
    first = post_callback(http, callback["url"], callback["token"], {"text": "once"})
    second = post_callback(http, callback["url"], callback["token"], {"text": "once"})
    results = sorted(r[1]["delivered"] is True for r in await asyncio.gather(first, second))
    assert results == [False, True]
    status, again = await post_callback(http, callback["url"], callback["token"],
                                        {"text": "a different answer"})
    assert (status, again) == (200, {"delivered": "already"})
    assert await transcript(http, gw, body["sessionId"]) == [("user", "hello"), ("agent", "once")]
    # Progress after the final is refused.
    status, late = await post_callback(http, callback["url"], callback["token"],
                                       {"text": "more", "final": False})
    assert status == 409 and late["error"]["code"] == "callback_finished"


async def test_a_callback_survives_a_gateway_restart(make_agent, make_gateway, http, tmp_path):
    agent = await make_agent(behaviour=accept_later)
    settings = config(agent.url)
    settings["storage"] = {"path": str(tmp_path / "callbacks.db")}
    first = await make_gateway(settings)
    _, body = await chat(http, first, "long job")
    callback = agent.calls[0].body["callback"]
    await first.stop()

    second = await make_gateway(settings)  # a new daemon on the same SQLite file
    status, answer = await post_callback(http, on(second, callback["url"]), callback["token"],
                                         {"text": "done after the restart"})
    assert (status, answer) == (200, {"delivered": True})
    assert await transcript(http, second, body["sessionId"]) == [
        ("user", "long job"), ("agent", "done after the restart")]


async def test_an_expired_callback_gives_the_fallback_and_refuses_the_late_answer(
    make_agent, make_gateway, http
):
    agent = await make_agent(behaviour=accept_later)
    gw = await make_gateway(config(agent.url, callback_timeout=1))
    _, body = await chat(http, gw, "slow question")
    callback = agent.calls[0].body["callback"]
    session_id = body["sessionId"]

    async def fallback_given() -> bool:
        return ("agent", FALLBACK) in await transcript(http, gw, session_id)

    await wait_until(fallback_given, within=10)
    state = await pending(http, gw, session_id)
    assert state["pending"] is False and state["expired"] is True and state["text"] == FALLBACK
    status, late = await post_callback(http, callback["url"], callback["token"],
                                       {"text": "too late"})
    assert status == 410 and late["error"]["code"] == "callback_expired"
    assert await transcript(http, gw, session_id) == [
        ("user", "slow question"), ("agent", FALLBACK)]


async def test_a_later_message_of_the_session_waits_for_the_callback(
    make_agent, make_gateway, http
):
    async def first_later(call: AgentCall) -> web.StreamResponse:
        if call.body["message"]["text"] == "first":
            return await accept_later(call)
        return web.json_response({"response": "second answer"})

    agent = await make_agent(behaviour=first_later)
    gw = await make_gateway(config(agent.url))
    _, body = await chat(http, gw, "first")
    session_id = body["sessionId"]
    callback = agent.calls[0].body["callback"]
    second = asyncio.create_task(chat(http, gw, "second", sessionId=session_id))
    await asyncio.sleep(1.5)
    assert len(agent.calls) == 1 and not second.done()  # queued behind the pending answer

    await post_callback(http, callback["url"], callback["token"], {"text": "first answer"})
    status, answer = await asyncio.wait_for(second, 10)
    assert (status, answer["response"]) == (200, "second answer")
    # The agent saw the late answer in the history of the next message.
    history = [(t["role"], t["text"]) for t in agent.calls[1].body["history"]]
    assert history == [("user", "first"), ("agent", "first answer")]
    assert await transcript(http, gw, session_id) == [
        ("user", "first"), ("agent", "first answer"), ("user", "second"),
        ("agent", "second answer")]


async def test_forged_altered_and_other_tenants_tokens_are_refused(make_agent, make_gateway, http):
    agent = await make_agent(behaviour=accept_later)
    gw = await make_gateway(config(agent.url))
    _, a_body = await chat(http, gw, "from acme")
    _, b_body = await chat(http, gw, "from beta", key=KEY_B)
    a_cb, b_cb = (c.body["callback"] for c in agent.calls)
    assert agent.calls[1].body["tenant"] == "beta"

    # No token, a token altered, an API key, beta's token on acme's callback.
    for token in (None, a_cb["token"][:-2] + "xx", KEY_A, b_cb["token"]):
        status, refused = await post_callback(http, a_cb["url"], token, {"text": "evil"})
        assert status == 401, (token, refused)
        assert refused["error"]["code"] == "unauthorized"
    # A token with a longer expiry it was not signed for.
    fields = a_cb["token"].split(".")
    fields[-2] = str(int(fields[-2]) + 3600)
    status, _ = await post_callback(http, a_cb["url"], ".".join(fields), {"text": "evil"})
    assert status == 401
    # Beta's own callback still works and reaches only beta's session.
    status, _ = await post_callback(http, b_cb["url"], b_cb["token"], {"text": "for beta"})
    assert status == 200
    assert await transcript(http, gw, a_body["sessionId"]) == [("user", "from acme")]
    assert await transcript(http, gw, b_body["sessionId"], key=KEY_B) == [
        ("user", "from beta"), ("agent", "for beta")]
    # Bad bodies: 4xx with a JSON error naming the problem.
    status, bad = await post_callback(http, a_cb["url"], a_cb["token"], {"txt": "typo"})
    assert status == 400 and "text" in bad["error"]["message"]


async def test_progress_then_final_as_json_and_as_a_stream(make_agent, make_gateway, http):
    agent = await make_agent(behaviour=accept_later)
    gw = await make_gateway(config(agent.url))
    _, one = await chat(http, gw, "json progress")
    _, two = await chat(http, gw, "stream progress", newSession=True)
    json_cb, stream_cb = (c.body["callback"] for c in agent.calls)

    status, body = await post_callback(http, json_cb["url"], json_cb["token"],
                                       {"text": "Step 1 done. ", "final": False})
    assert (status, body) == (200, {"progress": True})
    state = await pending(http, gw, one["sessionId"])
    assert state["pending"] is True and state["text"] == "Step 1 done. "
    await post_callback(http, json_cb["url"], json_cb["token"], {"text": "All done."})
    assert (await transcript(http, gw, one["sessionId"]))[-1] == ("agent", "All done.")

    status, body = await post_callback(
        http, stream_cb["url"], stream_cb["token"],
        [{"delta": "Streamed "}, {"delta": "answer."}], ndjson=True)
    assert (status, body) == (200, {"delivered": True})
    assert (await transcript(http, gw, two["sessionId"]))[-1] == ("agent", "Streamed answer.")


async def test_the_chat_stream_says_deferred(make_agent, make_gateway, http):
    agent = await make_agent(behaviour=accept_later)
    gw = await make_gateway(config(agent.url))
    async with http.post(url(gw, "/api/chat/stream"), json={"message": "hi", "userId": "u1"},
                         headers={"Authorization": f"Bearer {KEY_A}"}) as resp:
        events = [json.loads(line) for line in (await resp.text()).splitlines() if line]
    assert events[-1]["type"] == "done" and events[-1]["outcome"] == "deferred"
    assert events[-1]["response"] == ""


# Several instances on PostgreSQL (row-level security on agent_callbacks, claims across them).


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    async with postgres_schema() as value:
        yield value


@pytest.mark.postgres
async def test_two_instances_on_postgres_deliver_once_and_keep_the_order(
    make_agent, make_gateway, http, pg_dsn
):
    async def first_later(call: AgentCall) -> web.StreamResponse:
        if call.body["message"]["text"] in ("first", "never answered"):
            return await accept_later(call)
        return web.json_response({"response": "second answer"})

    agent = await make_agent(behaviour=first_later)
    settings = config(agent.url)
    settings["tenants"].append(tenant("slowco", agent.url, keys=["key-s-0123456789abcdef0123"],
                                      agent={"fallback_text": FALLBACK, "callback_timeout": 1}))
    settings["storage"] = {"backend": "postgres", "dsn": {"value": pg_dsn}}
    settings["cluster"] = {"coordination": "postgres"}
    one = await make_gateway(settings)
    two = await make_gateway(settings)
    _, body = await chat(http, one, "first")
    session_id = body["sessionId"]
    callback = agent.calls[0].body["callback"]
    assert callback["url"].startswith(url(one, "/api/callbacks/"))
    # The session's next message arrives at the other instance: it waits for the answer.
    second = asyncio.create_task(chat(http, two, "second", sessionId=session_id))
    await asyncio.sleep(1.5)
    assert len(agent.calls) == 1 and not second.done()

    # The answer arrives at the other instance too, twice at once: delivered once.
    results = await asyncio.gather(*(
        post_callback(http, on(gw, callback["url"]), callback["token"], {"text": "first answer"})
        for gw in (two, one)))
    assert sorted(str(r[1]["delivered"]) for r in results) == ["True", "already"]
    status, answer = await asyncio.wait_for(second, 10)
    assert (status, answer["response"]) == (200, "second answer")
    assert await transcript(http, one, session_id) == [
        ("user", "first"), ("agent", "first answer"), ("user", "second"),
        ("agent", "second answer")]
    # Another tenant's token never reaches acme's callback, here either.
    _, slow = await chat(http, two, "never answered", key="key-s-0123456789abcdef0123")
    slow_cb = agent.calls[-1].body["callback"]
    status, _ = await post_callback(http, callback["url"], slow_cb["token"], {"text": "x"})
    assert status == 401
    # Its expiry gives the fallback once, whichever instance's sweep gets there first.

    async def expired() -> bool:
        turns = await transcript(http, one, slow["sessionId"], key="key-s-0123456789abcdef0123")
        return ("agent", FALLBACK) in turns

    await wait_until(expired, within=10)
    await asyncio.sleep(SWEEP_INTERVAL * 2)
    assert await transcript(http, two, slow["sessionId"], key="key-s-0123456789abcdef0123") == [
        ("user", "never answered"), ("agent", FALLBACK)]


async def test_the_example_slow_agent_answers_through_its_callback(make_gateway, http):
    """examples/slow_agent.py, as documented in docs/agent-protocol.md, works as it says."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slow_agent", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    runner = web.AppRunner(example.make_app(1.0), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        agent_url = f"http://127.0.0.1:{runner.addresses[0][1]}/agent"
        gw = await make_gateway(config(agent_url))
        status, body = await chat(http, gw, "the meaning of life")
        assert status == 200 and body["deferred"] is True

        async def answered() -> bool:
            turns = await transcript(http, gw, body["sessionId"])
            return len(turns) == 2

        await wait_until(answered, within=10)
        assert (await transcript(http, gw, body["sessionId"]))[1] == (
            "agent", "After 1 seconds of thought about **the meaning of life**: done.")
    finally:
        await runner.cleanup()


async def test_a_message_waiting_for_a_late_answer_is_answered_when_the_gateway_stops(
    make_agent, make_gateway, http
):
    async def first_later(call: AgentCall) -> web.StreamResponse:
        if call.body["message"]["text"] == "first":
            return await accept_later(call)
        return web.json_response({"response": "second answer"})

    agent = await make_agent(behaviour=first_later)
    gw = await make_gateway(config(agent.url))
    _, body = await chat(http, gw, "first")
    second = asyncio.create_task(chat(http, gw, "second", sessionId=body["sessionId"]))
    await asyncio.sleep(1.0)
    assert not second.done()
    started = time.monotonic()
    await gw.stop()  # the drain: the waiting message goes on rather than being lost
    assert time.monotonic() - started < 5
    status, answer = await asyncio.wait_for(second, 5)
    assert (status, answer["response"]) == (200, "second answer")
    assert [c.body["message"]["text"] for c in agent.calls] == ["first", "second"]


async def test_deleting_a_session_or_erasing_its_user_deletes_its_late_answers(
    make_agent, make_gateway, http
):
    await deleting_deletes_late_answers(make_agent, make_gateway, http, {})


@pytest.mark.postgres
async def test_deleting_deletes_late_answers_on_postgres(make_agent, make_gateway, http, pg_dsn):
    storage = {"backend": "postgres", "dsn": {"value": pg_dsn}}
    await deleting_deletes_late_answers(make_agent, make_gateway, http, {"storage": storage})


async def deleting_deletes_late_answers(make_agent: Any, make_gateway: Any,
                                        http: aiohttp.ClientSession, extra: dict[str, Any]) -> None:
    agent = await make_agent(behaviour=accept_later)
    gw = await make_gateway({**config(agent.url), **extra})
    auth = {"Authorization": f"Bearer {KEY_A}"}
    _, one = await chat(http, gw, "one")
    _, two = await chat(http, gw, "two", userId="u2")
    for body in (one, two):
        assert await gw.store.latest_callback("acme", body["sessionId"]) is not None
    async with http.delete(url(gw, f"/api/sessions/{one['sessionId']}"), headers=auth) as resp:
        assert resp.status == 204
    async with http.delete(url(gw, "/api/users/u2"), headers=auth) as resp:
        assert resp.status in (200, 204), await resp.text()
    for body in (one, two):
        assert await gw.store.latest_callback("acme", body["sessionId"]) is None


async def test_the_callback_url_follows_server_public_url_also_after_a_reload(
    make_agent, make_gateway, http
):
    import yaml

    agent = await make_agent(behaviour=accept_later)
    settings = {**config(agent.url), "server": {"public_url": "https://chat.example.com/"}}
    gw = await make_gateway(settings)
    await chat(http, gw, "one")
    assert agent.calls[0].body["callback"]["url"].startswith(
        "https://chat.example.com/api/callbacks/")
    settings["server"] = {"public_url": "https://gateway.example.org/base"}
    config_file = gw.config_path
    written = yaml.safe_load(config_file.read_text())
    written["server"] = settings["server"]
    config_file.write_text(yaml.safe_dump(written))
    await gw.reload()
    await chat(http, gw, "two", newSession=True)
    assert agent.calls[1].body["callback"]["url"].startswith(
        "https://gateway.example.org/base/api/callbacks/")


async def test_a_streamed_callback_is_capped_like_any_body(make_agent, make_gateway, http):
    agent = await make_agent(behaviour=accept_later)
    gw = await make_gateway({**config(agent.url), "server": {"max_body_bytes": 4096}})
    _, body = await chat(http, gw, "a lot")
    callback = agent.calls[0].body["callback"]
    status, refused = await post_callback(
        http, callback["url"], callback["token"],
        [{"delta": "x" * 1000} for _ in range(10)], ndjson=True)
    assert status == 413 and refused["error"]["code"] == "body_too_large"
    # Not taken as the answer: the agent may still send one that fits.
    status, _ = await post_callback(http, callback["url"], callback["token"], {"text": "short"})
    assert status == 200
    assert (await transcript(http, gw, body["sessionId"]))[-1] == ("agent", "short")
