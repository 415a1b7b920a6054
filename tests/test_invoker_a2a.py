"""protocol: a2a against a real A2A server built here from a2a-sdk's own server classes."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    Part,
    SecurityScheme,
)
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from chatgateway.config import AgentConfig
from chatgateway.invoker import AgentAnswer, AgentRequest, make_invoker
from chatgateway.models import (
    Attachment,
    Conversation,
    ConversationKind,
    NormalizedMessage,
    Platform,
    SessionId,
    TenantId,
    User,
)
from chatgateway.rich import MAX_DATA_BYTES
from tests.conftest import tenant, url
from tests.test_agent_calls import chat, log_events
from tests.test_lifecycle_supervisor import wait_until
from tests.test_store import A, B, store  # noqa: F401  (the backend-parametrized fixture)

TOKEN = "a2a-bearer-token-0123456789"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
KEY = "acme-key-0001"


@dataclass
class Recorder:
    """What the agent saw: each message's context id, the task it continued ("" if new), text."""

    calls: list[tuple[str, str, str]] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)
    files: list[tuple[str, str, str]] = field(default_factory=list)


class ShopAgent(AgentExecutor):
    """Answers by the message's first word: `ask` wants input, `fail` fails, `file` links."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        assert message is not None
        text = context.get_user_input()
        task = context.current_task
        continued = task is not None
        self.recorder.calls.append((message.context_id, task.id if task else "", text))
        self.recorder.files += [(p.url, p.filename, p.media_type) for p in message.parts if p.url]
        if task is None:
            task = new_task_from_user_message(message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work()
        if continued:
            await updater.add_artifact([Part(text=f"order {text} is on its way")])
            await updater.complete()
        elif text.startswith("ask"):
            await updater.requires_input(updater.new_agent_message(
                [Part(text="What is your order number?")]))
        elif text.startswith("fail"):
            await updater.failed(updater.new_agent_message([Part(text="the backend is down")]))
        elif text.startswith("file"):
            await updater.add_artifact([Part(text="Here is the invoice:"),
                                        Part(url="https://files.example/inv.pdf",
                                             filename="invoice.pdf")])
            await updater.complete()
        elif text.startswith("chart"):
            # Files by URL (no name: the URL's) and as bytes, one too large, and buttons.
            buttons = Value()
            json_format.ParseDict({"actions": [
                {"label": "Approve", "value": "approve-7", "style": "primary"},
                {"label": "Reject", "value": "reject-7"}]}, buttons)
            await updater.add_artifact([
                Part(text="Here is the chart."),
                Part(raw=PNG, media_type="image/png", filename="chart.png"),
                Part(url="https://files.example/r%20q/report.pdf", media_type="application/pdf"),
                Part(raw=b"x" * (MAX_DATA_BYTES + 1), filename="huge.bin"),
                Part(data=buttons),
            ])
            await updater.complete()
        else:
            # In three chunks, so a streaming caller sees them one by one.
            artifact = "answer"
            for i, word in enumerate(("you", "said:", text)):
                await updater.add_artifact([Part(text=("" if i == 0 else " ") + word)],
                                           artifact_id=artifact, append=i > 0,
                                           last_chunk=i == 2)
            await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


@dataclass
class A2AServer:
    base_url: str
    recorder: Recorder


@pytest.fixture
async def make_a2a() -> AsyncIterator[Callable[..., Awaitable[A2AServer]]]:
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
    sockets: list[socket.socket] = []

    async def make(*, streaming: bool = True, auth: bool = True) -> A2AServer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        recorder = Recorder()
        card = AgentCard(
            name="Shop agent", description="Answers about orders", version="1.0",
            supported_interfaces=[AgentInterface(url=base + "/", protocol_binding="JSONRPC",
                                                 protocol_version="1.0")],
            capabilities=AgentCapabilities(streaming=streaming),
            default_input_modes=["text/plain"], default_output_modes=["text/plain"],
            skills=[AgentSkill(id="orders", name="Orders", description="Order status",
                               tags=["orders"])],
        )
        if auth:
            card.security_schemes["bearer"].CopyFrom(SecurityScheme(
                http_auth_security_scheme=HTTPAuthSecurityScheme(scheme="bearer")))
        handler = DefaultRequestHandler(agent_executor=ShopAgent(recorder),
                                        task_store=InMemoryTaskStore(), agent_card=card)
        inner = Starlette(routes=[*create_agent_card_routes(card),
                                  *create_jsonrpc_routes(handler, rpc_url="/")])

        async def app(scope: Any, receive: Any, send: Any) -> None:
            # The bearer token the card asks for, on every call but the card's.
            if scope["type"] == "http" and scope["path"] != "/.well-known/agent-card.json":
                header = Request(scope).headers.get("authorization", "")
                recorder.authorization.append(header)
                if auth and header != f"Bearer {TOKEN}":
                    response = JSONResponse({"error": "unauthorized"}, status_code=401)
                    await response(scope, receive, send)
                    return
            await inner(scope, receive, send)

        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        servers.append((server, task))
        await wait_until(lambda: server.started)
        return A2AServer(base, recorder)

    yield make
    for server, task in servers:
        server.should_exit = True
        await task
    for sock in sockets:
        sock.close()


def a2a_tenant(server: A2AServer, **agent: Any) -> dict[str, Any]:
    spec = {"protocol": "a2a", "bearer_token": {"value": TOKEN}, "fallback_text": "FALLBACK",
            "timeout": 10, **agent}
    return tenant("acme", server.base_url, keys=[KEY], agent=spec)


async def stream(http, gw, message: str, **extra: Any) -> list[dict[str, Any]]:
    async with http.post(url(gw, "/api/chat/stream"),
                         json={"message": message, "userId": "u1", **extra},
                         headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200
        return [json.loads(line) async for line in resp.content if line.strip()]


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming-agent", "plain-agent"])
async def test_plain_answer_and_context_is_the_session(make_a2a, make_gateway, http, streaming):
    server = await make_a2a(streaming=streaming)
    gw = await make_gateway({"tenants": [a2a_tenant(server)]})
    status, first = await chat(http, gw, KEY, "hello")
    assert status == 200 and first["response"] == "you said: hello"
    _status, second = await chat(http, gw, KEY, "again")
    assert second["response"] == "you said: again"
    assert second["sessionId"] == first["sessionId"]
    _status, other = await chat(http, gw, KEY, "new", newSession=True)
    contexts = [c for c, _task, _text in server.recorder.calls]
    # The gateway's session is the A2A context: the same across a session, new with a new one.
    assert contexts == [first["sessionId"], first["sessionId"], other["sessionId"]]
    assert set(server.recorder.authorization) == {f"Bearer {TOKEN}"}


async def test_streamed_answer_arrives_as_deltas(make_a2a, make_gateway, http):
    server = await make_a2a(streaming=True)
    gw = await make_gateway({"tenants": [a2a_tenant(server)]})
    events = await stream(http, gw, "stream me")
    deltas = [e["text"] for e in events if e["type"] == "delta"]
    assert "".join(deltas) == "you said: stream me"
    assert events[-1]["type"] == "done" and events[-1]["response"] == "you said: stream me"


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming-agent", "plain-agent"])
async def test_input_required_is_asked_and_the_next_message_continues_the_task(
    make_a2a, make_gateway, http, streaming
):
    server = await make_a2a(streaming=streaming)
    gw = await make_gateway({"tenants": [a2a_tenant(server)]})
    _status, question = await chat(http, gw, KEY, "ask where my order is")
    assert question["response"] == "What is your order number?"
    _status, answer = await chat(http, gw, KEY, "A-1234")
    assert answer["response"] == "order A-1234 is on its way"
    (ctx1, task1, _), (ctx2, task2, _) = server.recorder.calls
    assert task1 == "" and task2 != "" and ctx1 == ctx2 == question["sessionId"]
    # The task is done: the next message starts a new one.
    _status, after = await chat(http, gw, KEY, "thanks")
    assert after["response"] == "you said: thanks" and server.recorder.calls[2][1] == ""


async def test_failed_task_gives_the_fallback_with_the_cause_logged(
    make_a2a, make_gateway, http, capsys
):
    server = await make_a2a()
    gw = await make_gateway({"tenants": [a2a_tenant(server)]})
    _status, body = await chat(http, gw, KEY, "fail please")
    assert body["response"] == "FALLBACK"
    failed = [e for e in log_events(capsys) if e.get("event") == "agent_failed"]
    assert failed[0]["cause"] == "task_failed"
    assert failed[0]["detail"].endswith("the backend is down")


async def test_file_parts_become_files(make_a2a, make_gateway, http):
    server = await make_a2a()
    gw = await make_gateway({"tenants": [a2a_tenant(server)]})
    _status, body = await chat(http, gw, KEY, "file me the invoice")
    assert body["response"] == "Here is the invoice:"
    assert [(f["name"], f["contentType"]) for f in body["attachments"]] == [
        ("invoice.pdf", "application/pdf")]


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming-agent", "plain-agent"])
async def test_file_and_data_parts_become_the_answers_files_and_buttons(
    make_a2a, make_gateway, http, capsys, streaming
):
    server = await make_a2a(streaming=streaming)
    gw = await make_gateway({"tenants": [a2a_tenant(server)]})
    _status, body = await chat(http, gw, KEY, "chart please")
    assert body["response"] == "Here is the chart."
    assert [(f["name"], f["contentType"], f["size"]) for f in body["attachments"]] == [
        ("chart.png", "image/png", len(PNG)),
        ("report.pdf", "application/pdf", None),
    ]
    assert body["actions"] == [
        {"label": "Approve", "value": "approve-7", "style": "primary"},
        {"label": "Reject", "value": "reject-7", "style": None},
    ]
    dropped = [e for e in log_events(capsys) if e.get("event") == "answer_part_dropped"]
    assert [e["reason"] for e in dropped] == [
        f"data: larger than {MAX_DATA_BYTES} bytes (give a url)"]
    # The bytes are kept with the transcript and served through the gateway's link.
    async with http.get(body["attachments"][0]["url"]) as resp:
        assert resp.status == 200 and await resp.read() == PNG
    # Kept with the answer's turn like any agent's files and buttons; the stream's done too.
    events = await stream(http, gw, "chart again")
    assert events[-1]["type"] == "done" and len(events[-1]["attachments"]) == 2
    assert [a["value"] for a in events[-1]["actions"]] == ["approve-7", "reject-7"]
    async with http.get(url(gw, f"/api/sessions/{body['sessionId']}"),
                        headers={"Authorization": f"Bearer {KEY}"}) as resp:
        turns = (await resp.json())["transcript"]
    assert [len(t.get("attachments", [])) for t in turns] == [0, 2, 0, 2]


async def test_a_wrong_token_gives_the_fallback(make_a2a, make_gateway, http, capsys):
    server = await make_a2a()
    spec = a2a_tenant(server, bearer_token={"value": "wrong-token-0123456789"})
    gw = await make_gateway({"tenants": [spec]})
    _status, body = await chat(http, gw, KEY, "hello")
    assert body["response"] == "FALLBACK"
    out = capsys.readouterr().out
    assert "wrong-token-0123456789" not in out


async def test_the_open_task_survives_a_gateway_restart(make_a2a, make_gateway, http):
    server = await make_a2a()
    config = {"tenants": [a2a_tenant(server)]}
    gw = await make_gateway(config)
    _status, question = await chat(http, gw, KEY, "ask where my order is")
    assert question["response"] == "What is your order number?"
    await gw.stop()
    # The task id was kept in the store with the session, not in the stopped gateway's memory.
    gw2 = await make_gateway(config)
    _status, answer = await chat(http, gw2, KEY, "B-77", sessionId=question["sessionId"])
    assert answer["response"] == "order B-77 is on its way"
    assert server.recorder.calls[0][1] == "" and server.recorder.calls[1][1] != ""


async def test_store_keeps_agent_state_per_session_and_tenant(store) -> None:  # noqa: F811
    session = SessionId("s_1")
    assert await store.agent_state(A, session) is None
    await store.set_agent_state(A, session, "task-1", now=1.0)
    await store.set_agent_state(A, session, "task-2", now=2.0)
    assert await store.agent_state(A, session) == "task-2"
    assert await store.agent_state(B, session) is None  # scoped by tenant
    await store.set_agent_state(A, session, None, now=3.0)
    assert await store.agent_state(A, session) is None


async def test_attachments_are_sent_as_file_links(make_a2a) -> None:
    server = await make_a2a()
    config = AgentConfig.model_validate(
        {"protocol": "a2a", "url": server.base_url, "bearer_token": {"value": TOKEN},
         "timeout": 10}, context={"environ": {}})
    invoker = make_invoker(config)
    message = NormalizedMessage(
        tenant_id=TenantId("acme"), platform=Platform.SLACK,
        conversation=Conversation("C1", ConversationKind.CHANNEL), user=User("U1"),
        text="see the photo", message_id="1700000000.000100", timestamp=0.0,
        attachments=(Attachment("cat.png", "image/png", 10, "https://files.example/cat.png"),
                     Attachment("no-url.txt")))
    try:
        answer = await invoker.invoke(AgentRequest(message, SessionId("s_1"), []))
    finally:
        await invoker.close()
    assert isinstance(answer, AgentAnswer) and answer.text == "you said: see the photo"
    assert server.recorder.files == [("https://files.example/cat.png", "cat.png", "image/png")]
