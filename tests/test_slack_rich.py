"""Files and buttons from the agent into Slack, and clicks back (docs/slack.md, "Files and
buttons"): the uploader against the fake Slack's external upload, then the whole path with the
real slack-bolt in the gateway."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.files import SlackFileUploader, UploadError
from chatgateway.models import OutFile
from tests.fakes.slack import FakeApp, FakeSlack
from tests.fakes.slack_files import SlackRich
from tests.test_slack_e2e import slack_tenant, start

#: What the big file repeats (64 KiB).
PATTERN = bytes(range(256)) * 256
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def rich(fake_slack: FakeSlack) -> AsyncIterator[SlackRich]:
    extra = await SlackRich(fake_slack).start()
    yield extra
    await extra.stop()


class FileServer:
    """The agent's file server: a small PNG with its length, the same without a length
    (chunked), and `big` bytes of a pattern made as they are sent."""

    def __init__(self, big: int = 0) -> None:
        self.big = big
        self.url = ""
        self.host = "127.0.0.1"
        self._runner: web.AppRunner | None = None

    async def start(self) -> FileServer:
        app = web.Application()
        app.router.add_get("/chart.png", self._png)
        app.router.add_get("/chunked.png", self._chunked)
        app.router.add_get("/big.bin", self._big)
        app.router.add_get("/redirect", self._redirect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _png(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=PNG, content_type="image/png")

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for offset in range(0, len(PNG), 1000):
            await response.write(PNG[offset : offset + 1000])
        await response.write_eof()
        return response

    async def _big(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = self.big
        await response.prepare(request)
        left = self.big
        while left > 0:
            piece = PATTERN[: min(left, len(PATTERN))]
            await response.write(piece)
            left -= len(piece)
        await response.write_eof()
        return response

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")


@pytest.fixture
async def files() -> AsyncIterator[FileServer]:
    server = await FileServer(big=50 * 1024 * 1024).start()
    yield server
    await server.stop()


@pytest.fixture
async def uploader(fake_slack: FakeSlack) -> AsyncIterator[tuple[SlackFileUploader, FakeApp]]:
    app = fake_slack.add_app()
    async with aiohttp.ClientSession() as session:
        web_client = AsyncWebClient(token=app.bot_token, base_url=fake_slack.api_url,
                                    session=session)
        yield SlackFileUploader(web_client, session, max_bytes=64 * 1024 * 1024), app


def pattern_digest(size: int) -> str:
    digest = hashlib.sha256()
    left = size
    while left > 0:
        piece = PATTERN[: min(left, len(PATTERN))]
        digest.update(piece)
        left -= len(piece)
    return digest.hexdigest()


# The uploader --------------------------------------------------------------------------------


async def test_bytes_from_the_agent_are_uploaded_into_the_thread(rich, uploader):
    upload, app = uploader
    result = await upload.upload(
        OutFile("report.pdf", "application/pdf", data=b"%PDF-1.4 tiny"),
        channel="C0GENERAL", thread_ts="1700000000.000100",
    )
    shared = await rich.wait_shared(1)
    assert shared[0].file_id == result.file_id
    assert (shared[0].channel, shared[0].thread_ts) == ("C0GENERAL", "1700000000.000100")
    assert shared[0].title == "report.pdf" and shared[0].data == b"%PDF-1.4 tiny"
    sent = rich.uploads[result.file_id]
    assert sent.token == app.bot_token  # getUploadURLExternal with the app's bot token
    assert sent.authorization is None  # the bytes go to the pre-signed URL without it
    assert sent.content_type == "application/pdf"
    assert [c.method for c in rich.fake.calls] == [
        "files.getUploadURLExternal", "files.completeUploadExternal"
    ]


async def test_a_url_is_fetched_and_streamed_with_its_length(rich, uploader, files):
    upload, _ = uploader
    await upload.upload(OutFile("chart.png", "image/png", url=f"{files.url}/chart.png"),
                        channel="DU0ALICE", thread_ts=None, trusted_hosts=[files.host])
    shared = await rich.wait_shared(1)
    assert shared[0].data == PNG and shared[0].thread_ts is None
    assert rich.uploads[shared[0].file_id].content_length == str(len(PNG))


async def test_a_url_without_a_length_is_spooled_then_uploaded(rich, uploader, files):
    upload, _ = uploader
    await upload.upload(OutFile("c.png", "image/png", url=f"{files.url}/chunked.png"),
                        channel="C1", thread_ts="1.2", trusted_hosts=[files.host])
    shared = await rich.wait_shared(1)
    assert shared[0].data == PNG
    assert rich.uploads[shared[0].file_id].length == len(PNG)


async def test_private_addresses_are_refused_unless_the_agents_host(rich, uploader, files):
    upload, _ = uploader
    for url in (f"{files.url}/chart.png", f"{files.url}/redirect",
                "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"):
        with pytest.raises(UploadError, match="could not be fetched"):
            await upload.upload(OutFile("x.png", "image/png", url=url),
                                channel="C1", thread_ts=None)
    # Trusting the agent's host does not open the redirect to another private address.
    with pytest.raises(UploadError):
        await upload.upload(OutFile("x.png", "image/png", url=f"{files.url}/redirect"),
                            channel="C1", thread_ts=None, trusted_hosts=[files.host])
    assert rich.shared == [] and rich.uploads == {}


async def test_a_file_over_the_cap_is_refused_before_slack_is_asked(rich, fake_slack, files):
    app = fake_slack.add_app()
    async with aiohttp.ClientSession() as session:
        web_client = AsyncWebClient(token=app.bot_token, base_url=fake_slack.api_url,
                                    session=session)
        small = SlackFileUploader(web_client, session, max_bytes=1024 * 1024)
        with pytest.raises(UploadError, match="larger than"):
            await small.upload(OutFile("big.bin", "application/octet-stream",
                                       url=f"{files.url}/big.bin"),
                               channel="C1", thread_ts=None, trusted_hosts=[files.host])
        with pytest.raises(UploadError, match="larger than"):
            await SlackFileUploader(web_client, session, max_bytes=10).upload(
                OutFile("a.txt", "text/plain", data=b"x" * 11), channel="C1", thread_ts=None)
    assert rich.uploads == {}


async def test_memory_stays_flat_while_a_50_mb_file_streams_through(rich, uploader, files):
    upload, _ = uploader
    tracemalloc.start()
    try:
        await upload.upload(OutFile("big.bin", "application/octet-stream",
                                    url=f"{files.url}/big.bin"),
                            channel="C1", thread_ts=None, trusted_hosts=[files.host])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    shared = await rich.wait_shared(1)
    assert shared[0].size == files.big
    assert shared[0].sha256 == pattern_digest(files.big)
    # The fake Slack and file server run in this process too: all of it stays far below 50 MB.
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    print(f"upload of {files.big / 2**20:.0f} MiB: peak traced memory {peak / 2**20:.1f} MiB")


async def test_a_refused_upload_says_why(rich, uploader):
    upload, _ = uploader
    rich.fake.revoke(uploader[1].bot_token)
    with pytest.raises(UploadError, match="invalid_auth"):
        await upload.upload(OutFile("a.txt", "text/plain", data=b"hello"),
                            channel="C1", thread_ts=None)


# Through the gateway: real slack-bolt, the fake Slack, an agent answering files and buttons -----


class RichAgent:
    """An agent answering its first call with text, files and buttons (JSON, or an NDJSON
    stream when `stream`), and every later call with a text naming what it got."""

    def __init__(self, files_url: str, *, stream: bool = False, data: bool = True) -> None:
        self.files_url, self.stream, self.data = files_url, stream, data
        self.calls: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> RichAgent:
        app = web.Application()
        app.router.add_post("/agent", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/agent"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_calls(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + within
        while len(self.calls) < count:
            assert asyncio.get_running_loop().time() < deadline, f"{len(self.calls)} calls"
            await asyncio.sleep(0.02)
        return self.calls

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append(body)
        if len(self.calls) > 1:
            return web.json_response({"response": f"you chose {body['message']['text']}"})
        extra: dict[str, Any] = {
            "attachments": [{"name": "chart.png", "url": f"{self.files_url}/chart.png"}],
            "actions": [{"label": "Approve", "value": "approve-42", "style": "primary"},
                        {"label": "Reject", "value": "reject-42", "style": "danger"}],
        }
        if self.data:
            extra["attachments"].append({"name": "notes.txt", "contentType": "text/plain",
                                         "data": base64.b64encode(b"the notes").decode()})
        if not self.stream:
            return web.json_response({"response": "Deploy **now**?", **extra})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for delta in ("Deploy ", "**now**", "?"):
            await response.write(json.dumps({"delta": delta}).encode() + b"\n")
            await asyncio.sleep(0.3)
        await response.write(json.dumps(extra).encode() + b"\n")
        await response.write_eof()
        return response


@pytest.fixture
async def make_rich_agent() -> AsyncIterator[Any]:
    agents: list[RichAgent] = []

    async def make(files_url: str, **kwargs: Any) -> RichAgent:
        agent = await RichAgent(files_url, **kwargs).start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.stop()


async def rich_gateway(fake_slack: FakeSlack, make_rich_agent: Any, make_gateway: Any,
                       files: FileServer, **kwargs: Any) -> tuple[RichAgent, FakeApp]:
    agent = await make_rich_agent(files.url, **kwargs)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    return agent, app


def action_blocks(message: Any) -> list[dict[str, Any]]:
    return [b for b in message.blocks if b["type"] == "actions"]


async def test_a_mention_gets_its_files_in_the_thread_and_buttons_on_the_answer(
    fake_slack, rich, make_rich_agent, make_gateway, files
):
    agent, app = await rich_gateway(fake_slack, make_rich_agent, make_gateway, files)
    delivery = await fake_slack.mention(app, "U0ALICE", "deploy?", channel="C0GENERAL")
    root = delivery.envelope["payload"]["event"]["ts"]

    shared = await rich.wait_shared(2)
    assert [f.title for f in shared] == ["chart.png", "notes.txt"]
    assert all((f.channel, f.thread_ts) == ("C0GENERAL", root) for f in shared)
    assert shared[0].data == PNG and shared[1].data == b"the notes"
    answer = await rich.wait_message(lambda m: action_blocks(m))
    assert (answer.channel, answer.thread_ts) == ("C0GENERAL", root)
    assert answer.blocks[0] == {"type": "section",
                                "text": {"type": "mrkdwn", "text": "Deploy *now*?"}}
    buttons = action_blocks(answer)[0]
    assert buttons["block_id"] == "cg_actions.U0ALICE"
    assert [(b["text"]["text"], b["value"], b.get("style")) for b in buttons["elements"]] == [
        ("Approve", "approve-42", "primary"), ("Reject", "reject-42", "danger")]
    # The answer itself is the message that carries them (no extra message, no text fallback),
    # posted with them in one call.
    assert [p.ts for p in fake_slack.posts()] == [answer.ts]
    assert [method for method, _ in answer.history] == ["chat.postMessage"]
    assert "Reply 1 for" not in fake_slack.posts()[0].text
    assert len(agent.calls) == 1


async def test_a_click_reaches_the_agent_in_the_askers_session_and_replaces_the_buttons(
    fake_slack, rich, make_rich_agent, make_gateway, files
):
    agent, app = await rich_gateway(fake_slack, make_rich_agent, make_gateway, files, data=False)
    delivery = await fake_slack.mention(app, "U0ALICE", "deploy?", channel="C0GENERAL")
    root = delivery.envelope["payload"]["event"]["ts"]
    answer = await rich.wait_message(lambda m: action_blocks(m))

    click = await rich.click(app, answer.ts, "Reject", user="U0ALICE")
    await fake_slack.wait_ack(click)
    assert click.ack_latency is not None and click.ack_latency < 1.0
    calls = await agent.wait_calls(2)
    first, second = calls[0], calls[1]
    assert second["sessionId"] == first["sessionId"]
    assert second["message"]["text"] == "reject-42"
    assert second["metadata"]["action"] == {
        "value": "reject-42", "label": "Reject", "index": 2, "via": "button"}
    assert (second["user"]["id"], second["conversation"]["threadId"]) == ("U0ALICE", root)
    assert [t["role"] for t in second["history"]] == ["user", "agent"]

    # The buttons became the choice; the agent's answer to it went into the same thread.
    await fake_slack.wait_for(lambda: not action_blocks(answer))
    assert answer.blocks[-1]["type"] == "context"
    assert answer.blocks[-1]["elements"][0]["text"] == "\u2713 *Reject* chosen by <@U0ALICE>"
    assert answer.blocks[0]["text"]["text"] == "Deploy *now*?"
    reply = await fake_slack.wait_for(
        lambda: [p for p in fake_slack.posts() if p.text == "you chose reject-42"])
    assert reply[0].thread_ts == root

    # Slack's redelivery of the click, or a second click from a client still showing the
    # buttons, is not a second choice: no agent call, and the choice shown stays.
    for same in (True, False):
        again = await fake_slack.redeliver(click, same_envelope=same)
        await fake_slack.wait_ack(again)
    await asyncio.sleep(0.5)
    assert len(agent.calls) == 2
    assert answer.blocks[-1]["elements"][0]["text"] == "\u2713 *Reject* chosen by <@U0ALICE>"
    # Posted with its buttons, then the buttons replaced: once.
    assert [method for method, _ in answer.history] == ["chat.postMessage", "chat.update"]


async def test_a_click_in_a_dm_goes_to_the_dm_session(
    fake_slack, rich, make_rich_agent, make_gateway, files
):
    agent, app = await rich_gateway(fake_slack, make_rich_agent, make_gateway, files, data=False)
    await fake_slack.dm(app, "U0ALICE", "deploy?")
    answer = await rich.wait_message(lambda m: action_blocks(m))
    assert answer.channel == "DU0ALICE"
    await rich.click(app, answer.ts, "Approve", user="U0ALICE")
    calls = await agent.wait_calls(2)
    assert calls[1]["sessionId"] == calls[0]["sessionId"]
    assert calls[1]["metadata"]["action"]["value"] == "approve-42"
    await fake_slack.wait_for(
        lambda: [p for p in fake_slack.posts(channel="DU0ALICE") if p.text == "you chose approve-42"])


async def test_someone_elses_click_is_refused_with_a_note(
    fake_slack, rich, make_rich_agent, make_gateway, files
):
    agent, app = await rich_gateway(fake_slack, make_rich_agent, make_gateway, files, data=False)
    await fake_slack.mention(app, "U0ALICE", "deploy?", channel="C0GENERAL")
    answer = await rich.wait_message(lambda m: action_blocks(m))

    click = await rich.click(app, answer.ts, "Approve", user="U0BOB")
    await fake_slack.wait_ack(click)
    note = await fake_slack.wait_posts(1, via="chat.postEphemeral")
    assert (note[0].user, note[0].text) == ("U0BOB", "Only <@U0ALICE> can choose here.")
    await asyncio.sleep(0.5)
    assert len(agent.calls) == 1  # Alice's session got nothing from Bob
    assert action_blocks(answer)  # the buttons are still Alice's to click


async def test_a_streamed_answer_gets_its_buttons_and_files_after_the_stream(
    fake_slack, rich, make_rich_agent, make_gateway, files
):
    agent, app = await rich_gateway(fake_slack, make_rich_agent, make_gateway, files, stream=True)
    delivery = await fake_slack.mention(app, "U0ALICE", "deploy?", channel="C0GENERAL")
    user_ts = delivery.envelope["payload"]["event"]["ts"]
    shared = await rich.wait_shared(2)
    assert all(f.thread_ts == user_ts for f in shared)
    answer = await rich.wait_message(lambda m: action_blocks(m))
    streamed = fake_slack.stream(answer.ts)
    assert streamed is not None and not streamed.streaming
    assert streamed.text == "Deploy **now**?"
    # Standard Markdown, as streamed: a markdown block, then the buttons.
    assert answer.blocks[0] == {"type": "markdown", "text": "Deploy **now**?"}
    await rich.click(app, answer.ts, "Approve", user="U0ALICE")
    calls = await agent.wait_calls(2)
    assert calls[1]["sessionId"] == calls[0]["sessionId"]
    await fake_slack.wait_for(lambda: not action_blocks(answer))
    assert answer.blocks[0] == {"type": "markdown", "text": "Deploy **now**?"}


async def test_a_file_that_cannot_be_fetched_is_named_to_the_user(
    fake_slack, rich, make_agent, make_gateway
):
    async def behaviour(call: Any) -> web.StreamResponse:
        return web.json_response({"response": "Here:", "attachments": [
            {"name": "secret.txt", "url": "http://169.254.169.254/latest/meta-data/"}]})

    agent = await make_agent(behaviour=behaviour)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.dm(app, "U0ALICE", "the file please")
    posts = await fake_slack.wait_posts(2, channel="DU0ALICE")
    assert posts[0].text == "Here:"
    assert posts[1].text == "• <http://169.254.169.254/latest/meta-data/|secret.txt>"
    assert rich.uploads == {} and rich.shared == []


async def test_an_answer_of_buttons_only_gets_a_message_for_them(
    fake_slack, rich, make_agent, make_gateway
):
    async def behaviour(call: Any) -> web.StreamResponse:
        return web.json_response({"response": "", "actions": [{"label": "Yes", "value": "y"}]})

    agent = await make_agent(behaviour=behaviour)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.dm(app, "U0ALICE", "ok?")
    posts = await fake_slack.wait_posts(1, channel="DU0ALICE")
    assert posts[0].text == "Reply 1 for Yes."  # the notification text
    message = rich.messages[posts[0].ts]
    assert [b["type"] for b in message.blocks] == ["actions"]
    assert message.blocks[0]["block_id"] == "cg_actions.U0ALICE"


async def test_buttons_come_with_the_last_edit_when_the_app_cannot_stream(
    fake_slack, rich, make_rich_agent, make_gateway, files
):
    agent, app = await rich_gateway(fake_slack, make_rich_agent, make_gateway, files,
                                    stream=True, data=False)
    app.refuse_streaming = "unknown_method"
    await fake_slack.dm(app, "U0ALICE", "deploy?")
    answer = await rich.wait_message(lambda m: action_blocks(m))
    await rich.wait_shared(1)
    assert fake_slack.streams == []
    assert answer.blocks[0]["text"]["text"] == "Deploy *now*?"
    methods = [method for method, _ in answer.history]
    # Posted with the first words, edited as the answer grew; the buttons came with the edit
    # that completed it, not with a call of their own.
    assert methods[0] == "chat.postMessage" and set(methods[1:]) == {"chat.update"}
    assert [bool(blocks) for _, blocks in answer.history][-1]
    assert sum(1 for _, blocks in answer.history if blocks) == 1
    assert [p.ts for p in fake_slack.posts(channel="DU0ALICE")] == [answer.ts]
    assert len(agent.calls) == 1


async def test_a_click_after_a_restart_reaches_the_same_session_once(
    fake_slack, rich, make_rich_agent, make_gateway, files
):
    agent = await make_rich_agent(files.url, data=False)
    app = fake_slack.add_app()
    config = slack_tenant("acme", agent.url, fake_slack, app)
    first = await start(make_gateway, fake_slack, config)
    await fake_slack.mention(app, "U0ALICE", "deploy?", channel="C0GENERAL")
    answer = await rich.wait_message(lambda m: action_blocks(m))
    await rich.wait_shared(1)
    await first.stop()

    # The buttons carry all a click needs: a new process routes it to the stored session.
    await make_gateway({"tenants": [config]})
    await fake_slack.wait_connected(app, count=2)
    click = await rich.click(app, answer.ts, "Approve", user="U0ALICE")
    calls = await agent.wait_calls(2)
    assert calls[1]["sessionId"] == calls[0]["sessionId"]
    assert calls[1]["metadata"]["action"]["value"] == "approve-42"
    await fake_slack.wait_for(lambda: not action_blocks(answer))
    await fake_slack.wait_for(
        lambda: [p for p in fake_slack.posts() if p.text == "you chose approve-42"])
    again = await fake_slack.redeliver(click, same_envelope=False)
    await fake_slack.wait_ack(again)
    await asyncio.sleep(0.5)
    assert len(agent.calls) == 2
