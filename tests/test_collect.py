"""sessions.while_answering: queue (one agent call per message, in order) or collect (what a
user sent while the agent answered goes to the agent in one call)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import tenant
from tests.test_web_api import call

KEY = "key-of-the-collecting-tenant-01"


async def _burst(http, gw) -> list[tuple[int, dict]]:
    """One message, then two more while the agent is still answering the first."""
    def send(text: str) -> asyncio.Task:
        body = {"message": text, "userId": "u"}
        return asyncio.create_task(call(http, gw, "POST", "/api/chat", KEY, body))

    first = send("one")
    await asyncio.sleep(0.3)  # the agent (0.8 s) is answering "one"
    second = send("two")
    await asyncio.sleep(0.1)
    third = send("three")
    return await asyncio.gather(first, second, third)


@pytest.mark.parametrize("mode", ["queue", "collect"])
async def test_messages_sent_while_the_agent_answers(make_agent, make_gateway, http, mode):
    agent = await make_agent(prefix="re: ", delay=0.8)
    gw = await make_gateway({"tenants": [
        tenant("acme", agent.url, keys=[KEY], sessions={"while_answering": mode})]})
    (s1, r1), (s2, r2), (s3, r3) = await _burst(http, gw)
    assert (s1, s2, s3) == (200, 200, 200)
    assert r1["response"] == "re: one"
    bodies = [c.body for c in agent.calls]
    if mode == "queue":
        assert [b["message"]["text"] for b in bodies] == ["one", "two", "three"]
        assert all("earlier" not in b for b in bodies)
        assert (r2["response"], r3["response"]) == ("re: two", "re: three")
        return
    # collect: "two" and "three" arrived while "one" was answered: one call carries both.
    assert len(bodies) == 2
    assert bodies[1]["message"]["text"] == "three"
    assert [m["text"] for m in bodies[1]["earlier"]] == ["two"]
    assert r2["response"] == "re: three"  # the first waiting request gets the answer
    assert r3["response"] == ""  # it went to the agent with "two"
    session = r1["sessionId"]
    status, detail = await call(http, gw, "GET", f"/api/sessions/{session}", KEY)
    assert status == 200
    turns = detail["transcript"]
    assert [(t["role"], t["text"]) for t in turns] == [
        ("user", "one"), ("agent", "re: one"), ("user", "two"), ("user", "three"),
        ("agent", "re: three")]


async def test_a_message_naming_another_users_session_never_joins_its_batch(
    make_agent, make_gateway, http
):
    agent = await make_agent(prefix="re: ", delay=0.8)
    gw = await make_gateway({"tenants": [
        tenant("acme", agent.url, keys=[KEY], sessions={"while_answering": "collect"})]})
    _, first = await call(http, gw, "POST", "/api/chat", KEY, {"message": "one", "userId": "u"})
    session = first["sessionId"]

    def send(text: str, user: str) -> asyncio.Task:
        body = {"message": text, "userId": user, "sessionId": session}
        return asyncio.create_task(call(http, gw, "POST", "/api/chat", KEY, body))

    busy = send("two", "u")  # the agent answers it for 0.8 s
    await asyncio.sleep(0.3)
    mine = send("three", "u")  # waits for the session's lock
    await asyncio.sleep(0.05)
    intruder = send("let me in", "v")  # someone else naming u's session
    (s2, _), (s3, r3), (sv, rv) = await asyncio.gather(busy, mine, intruder)
    assert (s2, s3) == (200, 200) and sv == 404, rv
    assert r3["response"] == "re: three"
    assert all("let me in" not in json.dumps(c.body) for c in agent.calls)
