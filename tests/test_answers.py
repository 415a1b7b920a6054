"""Agents' answers with files and buttons through the web API: the JSON, the stream's done
event, the transcript, the signed file links, and a typed choice reaching the agent as a value."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from adapters.web.answers import PATH
from chatgateway.models import (
    Action,
    Conversation,
    ConversationKind,
    NormalizedMessage,
    OutFile,
    Platform,
    TenantId,
    User,
)
from chatgateway.outbound import Address
from chatgateway.signing import Signer
from chatgateway.testing.agent import AgentCall
from tests.conftest import tenant, url

KEY_A = "key-of-tenant-a-000001"
KEY_B = "key-of-tenant-b-000002"
SECRET = "gateway-secret-for-answer-tests-0123"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
PDF = b"%PDF-1.4\n" + b"0" * 300_000


@pytest.fixture
async def files_server() -> AsyncIterator[str]:
    """Where the agent keeps its files (127.0.0.1: the agent's own host)."""

    async def pdf(request: web.Request) -> web.Response:
        return web.Response(body=PDF, content_type="application/pdf")

    app = web.Application()
    app.router.add_get("/report.pdf", pdf)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def rich_answer(files_url: str) -> dict[str, Any]:
    return {
        "attachments": [
            {"name": "chart.png", "contentType": "image/png", "data": base64.b64encode(PNG).decode()},
            {"name": "report.pdf", "contentType": "application/pdf", "url": files_url + "/report.pdf"},
            {"name": "bad", "url": "ftp://nope"},  # dropped, the answer still delivered
        ],
        "actions": [
            {"label": "Approve", "value": "approve-7", "style": "primary"},
            {"label": "Reject", "value": "reject-7", "style": "danger"},
        ],
    }


@pytest.fixture
async def gateway(make_agent, make_gateway, files_server):
    async def behaviour(call: AgentCall) -> web.StreamResponse:
        text = call.body["message"]["text"]
        if text == "deploy?":
            return web.json_response({"response": "Here is the plan.", **rich_answer(files_server)})
        return web.json_response({"response": f"got {text}"})

    agent = await make_agent(behaviour=behaviour)
    gw = await make_gateway({
        "server": {"visitor_secret": {"value": SECRET}},
        "tenants": [tenant("default", agent.url, keys=[KEY_A]), tenant("acme", agent.url, keys=[KEY_B])],
    })
    return gw, agent


async def post(http, gw, path: str, body: dict[str, Any], key: str = KEY_A) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with http.post(url(gw, path), data=json.dumps(body), headers=headers) as resp:
        text = await resp.text()
        if resp.content_type == "application/x-ndjson":
            return resp.status, [json.loads(line) for line in text.splitlines() if line]
        return resp.status, json.loads(text)


async def test_answer_files_and_buttons_in_the_api_and_links(gateway, http) -> None:
    gw, agent = gateway
    status, answer = await post(http, gw, "/api/chat", {"message": "deploy?", "userId": "u1"})
    assert status == 200 and answer["response"] == "Here is the plan."
    assert [(a["name"], a["contentType"]) for a in answer["attachments"]] == [
        ("chart.png", "image/png"), ("report.pdf", "application/pdf")]
    assert answer["actions"] == [
        {"label": "Approve", "value": "approve-7", "style": "primary"},
        {"label": "Reject", "value": "reject-7", "style": "danger"},
    ]
    png_url, pdf_url = (a["url"] for a in answer["attachments"])
    assert png_url.startswith(url(gw, PATH))
    async with http.get(png_url) as resp:  # no credential: the link is the capability
        assert resp.status == 200 and await resp.read() == PNG
        assert resp.headers["Content-Type"] == "image/png"
        assert resp.headers["Content-Disposition"].startswith("inline")
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    async with http.get(pdf_url) as resp:  # fetched from the agent's host and streamed through
        assert resp.status == 200 and await resp.read() == PDF
        assert resp.headers["Content-Disposition"].startswith('attachment; filename="report.pdf"')

    # The transcript shows them again, with fresh links.
    headers = {"Authorization": f"Bearer {KEY_A}"}
    async with http.get(url(gw, f"/api/sessions/{answer['sessionId']}"), headers=headers) as resp:
        detail = await resp.json()
    agent_turn = detail["transcript"][1]
    assert agent_turn["text"] == "Here is the plan."
    assert [a["name"] for a in agent_turn["attachments"]] == ["chart.png", "report.pdf"]
    assert [a["label"] for a in agent_turn["actions"]] == ["Approve", "Reject"]
    async with http.get(agent_turn["attachments"][0]["url"]) as resp:
        assert await resp.read() == PNG
    assert "attachments" not in detail["transcript"][0]  # the user's turn

    # Typing "2" right after the buttons sends the second button's value to the agent.
    status, second = await post(http, gw, "/api/chat",
                                {"message": "2", "userId": "u1", "sessionId": answer["sessionId"]})
    assert status == 200 and second["response"] == "got reject-7"
    assert "attachments" not in second and "actions" not in second
    last = agent.calls[-1].body
    assert last["message"]["text"] == "reject-7"
    assert last["metadata"]["action"] == {
        "value": "reject-7", "label": "Reject", "index": 2, "via": "typed", "typed": "2"}
    assert last["history"][-1] == {"role": "agent", "text": "Here is the plan.",
                                   "timestamp": agent_turn["timestamp"]}
    # Afterwards "1" is just "1".
    _, third = await post(http, gw, "/api/chat",
                          {"message": "1", "userId": "u1", "sessionId": answer["sessionId"]})
    assert third["response"] == "got 1"


async def test_file_links_are_signed_scoped_and_expire(gateway, http) -> None:
    gw, _ = gateway
    _, answer = await post(http, gw, "/api/chat", {"message": "deploy?", "userId": "u1"})
    link = answer["attachments"][0]["url"]
    token = link.rsplit("/", 1)[1]
    fields = Signer(SECRET, "file").verify(token, now=time.time(), count=5)
    assert fields[:3] == ["answer", "default", answer["sessionId"]]

    async def get(token: str) -> tuple[int, dict[str, Any]]:
        async with http.get(url(gw, PATH + token)) as resp:
            return resp.status, await resp.json()

    signer = Signer(SECRET, "file")
    # Altered: another tenant's name in an otherwise good token.
    head, _, mac = token.rpartition(".")
    parts = head.split(".")
    parts[1] = base64.urlsafe_b64encode(b"acme").rstrip(b"=").decode()
    status, body = await get(".".join(parts) + "." + mac)
    assert status == 403 and body["error"]["code"] == "invalid_link"
    # Expired.
    expired = signer.sign(fields, expires_at=int(time.time()) - 1)
    status, body = await get(expired)
    assert status == 410 and body["error"]["code"] == "link_expired"
    # Signed, but for tenant acme: tenant default's session is not acme's.
    foreign = signer.sign(["answer", "acme", *fields[2:]], expires_at=int(time.time()) + 60)
    status, body = await get(foreign)
    assert status == 404
    # A file link of another purpose (a user's file) is not an answer's.
    other = Signer(SECRET, "callback").sign(fields, expires_at=int(time.time()) + 60)
    assert (await get(other))[0] == 403
    # The session deleted: its links die with it.
    headers = {"Authorization": f"Bearer {KEY_A}"}
    async with http.delete(url(gw, f"/api/sessions/{answer['sessionId']}"), headers=headers) as resp:
        assert resp.status == 204
    status, body = await get(token)
    assert status == 404 and body["error"]["code"] == "not_found"


async def test_private_urls_other_than_the_agents_host_are_refused(make_agent, make_gateway, http,
                                                                  files_server) -> None:
    port = files_server.rsplit(":", 1)[1]

    async def behaviour(call: AgentCall) -> web.StreamResponse:
        return web.json_response({"response": "see", "attachments": [
            {"name": "a.pdf", "url": f"http://localhost:{port}/report.pdf"},  # not the agent's host
        ]})

    agent = await make_agent(behaviour=behaviour)
    gw = await make_gateway({"tenants": [tenant("default", agent.url, keys=[KEY_A])]})
    _, answer = await post(http, gw, "/api/chat", {"message": "x", "userId": "u1"})
    async with http.get(answer["attachments"][0]["url"]) as resp:
        body = await resp.json()
        assert resp.status == 502 and body["error"]["code"] == "file_unavailable"
        assert "public address" in body["error"]["message"]


async def test_the_stream_done_event_carries_files_and_buttons(make_agent, make_gateway, http,
                                                               files_server) -> None:
    lines = [{"delta": "Pick "}, {"delta": "one."}, {"actions": rich_answer(files_server)["actions"],
                                                      "attachments": rich_answer(files_server)["attachments"][:1]}]

    async def stream(call: AgentCall) -> web.StreamResponse:
        return web.Response(text="".join(json.dumps(x) + "\n" for x in lines),
                            content_type="application/x-ndjson")

    agent = await make_agent(behaviour=stream)
    gw = await make_gateway({"tenants": [tenant("default", agent.url, keys=[KEY_A])]})
    status, events = await post(http, gw, "/api/chat/stream", {"message": "hi", "userId": "u1"})
    assert status == 200
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "Pick one."
    done = events[-1]
    assert done["type"] == "done" and done["response"] == "Pick one." and done["outcome"] == "ok"
    assert [a["label"] for a in done["actions"]] == ["Approve", "Reject"]
    assert [a["name"] for a in done["attachments"]] == ["chart.png"]
    async with http.get(done["attachments"][0]["url"]) as resp:
        assert await resp.read() == PNG


class TextOnly:
    """An outbound of a platform that shows text only (what Slack and Discord are until they
    show files and buttons themselves)."""

    def __init__(self) -> None:
        self.address = Address(Platform.SLACK, "app", {})
        self.idempotent = False
        self.shown: list[str] = []

    async def post(self, text: str) -> None:
        self.shown.append(text)

    async def append(self, delta: str) -> None:
        pass

    async def finish(self, text: str) -> None:
        self.shown.append(text)


class Rich(TextOnly):
    def __init__(self) -> None:
        super().__init__()
        self.rich: list[tuple[str, tuple[OutFile, ...], tuple[Action, ...]]] = []

    async def finish_rich(self, text: str, files: tuple[OutFile, ...],
                          actions: tuple[Action, ...]) -> None:
        self.rich.append((text, files, actions))


def slack_message(text: str, n: int) -> NormalizedMessage:
    return NormalizedMessage(
        tenant_id=TenantId("default"), platform=Platform.SLACK,
        conversation=Conversation("C1", ConversationKind.CHANNEL, "1.0"), user=User("U1"),
        text=text, message_id=f"m{n}", timestamp=time.time(),
    )


async def test_platforms_without_files_or_buttons_get_the_text_fallback(gateway) -> None:
    gw, agent = gateway
    pipeline = gw.pipeline
    text_only = TextOnly()
    reply = await pipeline.handle(slack_message("deploy?", 1), outbound=text_only)
    assert reply.outcome == "ok" and len(reply.files) == 2 and len(reply.actions) == 2
    [shown] = text_only.shown
    # The files as links (the agent's bytes through the gateway's signed link), the buttons as
    # numbered choices.
    lines = shown.split("\n")
    assert lines[:2] == ["Here is the plan.", ""]
    assert lines[2].startswith(f"- [chart.png]({url(gw, PATH)}")
    assert lines[3].startswith("- [report.pdf](http://127.0.0.1:")
    assert lines[4:] == ["", "Reply 1 for Approve, 2 for Reject."]
    # The user types the label: the agent gets the value, in the same session.
    second = await pipeline.handle(slack_message(" approve ", 2), outbound=TextOnly())
    assert second.session is not None and reply.session is not None
    assert second.session.id == reply.session.id
    assert agent.calls[-1].body["message"]["text"] == "approve-7"
    assert agent.calls[-1].body["metadata"]["action"]["via"] == "typed"
    # An outbound that shows them itself gets them as they are.
    rich = Rich()
    await pipeline.handle(slack_message("deploy?", 3), outbound=rich)
    [(text, files, actions)] = rich.rich
    assert text == "Here is the plan." and [f.name for f in files] == ["chart.png", "report.pdf"]
    assert [a.value for a in actions] == ["approve-7", "reject-7"] and rich.shown == []


async def test_a_large_file_streams_through_without_being_held(make_agent, make_gateway, http):
    """A 20 MiB file the agent gives by URL goes through the link in chunks: the gateway's
    (and this test's) Python allocations stay far below the file's size (tracemalloc peak)."""
    import tracemalloc

    size = 20 * 1024 * 1024
    block = b"z" * 65536

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        for _ in range(size // len(block)):
            await response.write(block)
        return response

    app = web.Application()
    app.router.add_get("/big.bin", big)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        files = f"http://127.0.0.1:{runner.addresses[0][1]}"

        async def behaviour(call: AgentCall) -> web.StreamResponse:
            return web.json_response({"response": "here", "attachments": [
                {"name": "big.bin", "contentType": "application/octet-stream", "url": files + "/big.bin"}]})

        agent = await make_agent(behaviour=behaviour)
        gw = await make_gateway({"tenants": [tenant("default", agent.url, keys=[KEY_A])]})
        _, answer = await post(http, gw, "/api/chat", {"message": "x", "userId": "u1"})
        received = 0
        tracemalloc.start()
        try:
            async with http.get(answer["attachments"][0]["url"]) as resp:
                assert resp.status == 200 and resp.content_length == size
                async for chunk in resp.content.iter_chunked(65536):
                    received += len(chunk)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert received == size
        print(f"tracemalloc peak while 20 MiB streamed through: {peak / 1e6:.2f} MB")
        assert peak < 5 * 1024 * 1024
    finally:
        await runner.cleanup()
