"""Files and buttons from the agent into Discord, and clicks back: real discord.py in an
in-process daemon against the fake Discord (tests/fakes/discord_interactions.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from adapters.discord.components import STYLE_DANGER, STYLE_PRIMARY, STYLE_SUCCESS, parse_custom_id
from chatgateway.testing.agent import AgentCall
from tests.fakes.discord import FakeBot, user_object
from tests.fakes.discord_interactions import DEFERRED_UPDATE, FakeDiscordRich
from tests.test_discord_adapter import discord_tenant, mention, until

GUILD = "3001"
CHANNEL = "3002"
ALICE = user_object("1001", "alice")
BOB = user_object("1002", "bob")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
PDF = b"%PDF-1.4\n" + b"0" * 300_000
LONG_VALUE = "deploy:" + "x" * 300  # longer than a custom_id holds


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscordRich]:
    server = await FakeDiscordRich().start()
    yield server
    await server.stop()


@pytest.fixture
async def files_server() -> AsyncIterator[str]:
    """Where the agent keeps its files (on 127.0.0.1, the agent's own host)."""

    async def pdf(request: web.Request) -> web.Response:
        return web.Response(body=PDF, content_type="application/pdf")

    async def big(request: web.Request) -> web.StreamResponse:
        # Over Discord's 10 MiB, sent without a length: the cap is found while reading.
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for _ in range(11):
            await response.write(b"\0" * (1024 * 1024))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/report.pdf", pdf)
    app.router.add_get("/big.bin", big)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def answers(files_url: str):
    """An agent: "deploy?" gets text, two files and two buttons; "only buttons" gets buttons
    and no text; anything else is echoed."""

    async def behaviour(call: AgentCall) -> web.StreamResponse:
        text = call.body["message"]["text"]
        if text == "deploy?":
            return web.json_response({
                "response": "Here is the plan.",
                "attachments": [
                    {"name": "chart.png", "contentType": "image/png",
                     "data": base64.b64encode(PNG).decode()},
                    {"name": "report.pdf", "url": files_url + "/report.pdf"},
                    {"name": "gone.txt", "url": files_url + "/gone.txt"},  # 404: listed
                ],
                "actions": [
                    {"label": "Approve", "value": "approve-7", "style": "primary"},
                    {"label": "Reject", "value": "reject-7", "style": "danger"},
                ],
            })
        if text == "big file":
            return web.json_response({"response": "Too big?", "attachments": [
                {"name": "big.bin", "url": files_url + "/big.bin"},
                {"name": "chart.png", "data": base64.b64encode(PNG).decode()}]})
        if text == "only buttons":
            return web.json_response({"response": "", "actions": [
                {"label": "Deploy", "value": LONG_VALUE}, {"label": "Wait", "value": "wait"}]})
        return web.json_response({"response": f"you chose {text[:20]}"})

    return behaviour


async def ask(fake: FakeDiscordRich, bot: FakeBot, text: str, *, author: dict[str, Any] = ALICE
              ) -> dict[str, Any]:
    return await fake.message_create(bot, f"<@{bot.user_id}> {text}", guild_id=GUILD,
                                     channel_id=CHANNEL, author=author, extra=mention(bot))


async def test_files_are_attached_and_buttons_shown_on_the_answer(
        fake, make_agent, make_gateway, files_server):
    agent = await make_agent(behaviour=answers(files_server))
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    asked = await ask(fake, bot, "deploy?")

    [post] = await fake.wait_posts(1, token=bot.token)
    await fake.wait_for(lambda: fake.buttons_of(post) and fake.files_of(post))
    assert post.reference is not None and post.reference["message_id"] == asked["id"]
    # The file the agent's server did not have is listed as a link instead.
    assert post.text.startswith("Here is the plan.")
    assert f"[gone.txt]({files_server}/gone.txt)" in post.text
    uploads = fake.files_of(post)
    assert [(u.filename, u.data) for u in uploads] == [("chart.png", PNG), ("report.pdf", PDF)]
    assert [a["filename"] for a in post.message["attachments"]] == ["chart.png", "report.pdf"]
    buttons = fake.buttons_of(post)
    assert [(b["label"], b["style"]) for b in buttons] == [
        ("Approve", STYLE_PRIMARY), ("Reject", STYLE_DANGER)]
    refs = [parse_custom_id(b["custom_id"]) for b in buttons]
    assert [(r.owner, r.index, r.value) for r in refs if r is not None] == [
        (ALICE["id"], 1, "approve-7"), (ALICE["id"], 2, "reject-7")]
    assert not any(b.get("disabled") for b in buttons)
    assert len(fake.posts(bot.token)) == 1  # one message: text, files and buttons


async def test_a_click_is_acknowledged_routed_to_the_session_and_disables_the_buttons(
        fake, make_agent, make_gateway, files_server):
    agent = await make_agent(behaviour=answers(files_server))
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    await ask(fake, bot, "deploy?")
    [post] = await fake.wait_posts(1, token=bot.token)
    await fake.wait_for(lambda: fake.buttons_of(post))
    reject = fake.buttons_of(post)[1]["custom_id"]

    click = await fake.click(bot, post, reject, user=ALICE, guild_id=GUILD)
    response = await fake.wait_acknowledged(click)
    assert response.type == DEFERRED_UPDATE and response.data is None
    assert response.after < 3.0  # Discord's deadline

    first, second = await agent.wait_calls(2)
    assert second.body["message"]["text"] == "reject-7"
    assert second.body["metadata"]["action"] == {
        "value": "reject-7", "label": "Reject", "index": 2, "via": "button"}
    assert second.body["sessionId"] == first.body["sessionId"]
    assert second.body["user"]["id"] == ALICE["id"]
    assert second.body["conversation"] == first.body["conversation"]
    assert second.body["message"]["id"] == click.id

    # The buttons now show the choice, disabled, through the interaction's own token.
    await fake.wait_for(lambda: click.edits)
    buttons = fake.buttons_of(post)
    assert all(b["disabled"] for b in buttons)
    assert [(b["label"], b["style"]) for b in buttons] == [
        ("Approve", STYLE_PRIMARY), ("✓ Reject", STYLE_SUCCESS)]
    # The agent's answer to the click replies to the message with the buttons.
    [_, answer] = await fake.wait_posts(2, token=bot.token)
    assert answer.content == "you chose reject-7"
    assert answer.reference is not None and answer.reference["message_id"] == post.message["id"]
    # Interaction calls went to the fake, none to discord.com.
    assert any(path.endswith("/callback") for _, path, _ in fake.rest_calls)


async def test_another_users_click_is_acknowledged_and_ignored(
        fake, make_agent, make_gateway, files_server):
    agent = await make_agent(behaviour=answers(files_server))
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    await ask(fake, bot, "deploy?")
    [post] = await fake.wait_posts(1, token=bot.token)
    await fake.wait_for(lambda: fake.buttons_of(post))

    click = await fake.click(bot, post, fake.buttons_of(post)[0]["custom_id"], user=BOB,
                             guild_id=GUILD)
    await fake.wait_acknowledged(click)
    # Alice still may choose: her click is taken.
    mine = await fake.click(bot, post, fake.buttons_of(post)[0]["custom_id"], user=ALICE,
                            guild_id=GUILD)
    calls = await agent.wait_calls(2)
    assert calls[1].body["message"]["text"] == "approve-7"
    assert calls[1].body["user"]["id"] == ALICE["id"]
    await fake.wait_for(lambda: mine.edits)
    assert not click.edits
    assert len(agent.calls) == 2


async def test_buttons_without_text_and_a_value_too_long_for_a_custom_id(
        fake, make_agent, make_gateway, files_server):
    agent = await make_agent(behaviour=answers(files_server))
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    await fake.message_create(bot, "only buttons", channel_id="2001", author=ALICE)  # a DM

    [post] = await fake.wait_posts(1, token=bot.token)
    assert post.content == ""
    buttons = fake.buttons_of(post)
    assert [b["label"] for b in buttons] == ["Deploy", "Wait"]
    assert buttons[0]["custom_id"].startswith("cg1h:") and len(buttons[0]["custom_id"]) <= 100

    click = await fake.click(bot, post, buttons[0]["custom_id"], user=ALICE)
    await fake.wait_acknowledged(click)
    calls = await agent.wait_calls(2)
    assert calls[1].body["message"]["text"] == LONG_VALUE
    assert calls[1].body["metadata"]["action"]["label"] == "Deploy"
    assert calls[1].body["conversation"]["type"] == "dm"
    assert calls[1].body["sessionId"] == calls[0].body["sessionId"]
    await until(lambda: all(b.get("disabled") for b in fake.buttons_of(post)))


async def test_a_replayed_click_reaches_the_agent_once(fake, make_agent, make_gateway,
                                                       files_server):
    agent = await make_agent(behaviour=answers(files_server))
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    await ask(fake, bot, "deploy?")
    [post] = await fake.wait_posts(1, token=bot.token)
    await fake.wait_for(lambda: fake.buttons_of(post))
    click = await fake.click(bot, post, fake.buttons_of(post)[0]["custom_id"], user=ALICE,
                             guild_id=GUILD)
    await fake.wait_posts(2, token=bot.token)
    # Discord replays the INTERACTION_CREATE (a RESUME): acknowledged already, answered once.
    await fake.dispatch(fake.current_session(bot), "INTERACTION_CREATE", click.payload)
    await fake.message_create(bot, "after", channel_id="2001", author=BOB)
    await fake.wait_posts(3, token=bot.token)
    assert agent.texts().count("approve-7") == 1
    assert len(fake.posts(bot.token)) == 3


async def test_an_answer_posted_again_after_a_replay_keeps_its_files_and_buttons(
        fake, make_agent, make_gateway, files_server, tmp_path):
    agent = await make_agent(behaviour=answers(files_server))
    bot = fake.add_bot("acmebot")
    gateway = await make_gateway(
        {"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    asked = await ask(fake, bot, "deploy?")
    [post] = await fake.wait_posts(1, token=bot.token)
    await fake.wait_for(lambda: fake.buttons_of(post) and fake.files_of(post))
    shown = post.text
    edits = fake.rich_edits
    assert gateway.pipeline is not None
    await gateway.pipeline.wait_idle()
    await asyncio.sleep(0.2)  # the adapter's own bookkeeping after the answer
    # As if the instance had died after storing the answer but before learning that its post
    # went through: the processed message still points at its answer (see _post_again).
    db = sqlite3.connect(tmp_path / "gateway.db")
    with db:
        db.execute(
            "UPDATE processed_events SET session_id = (SELECT session_id FROM turns "
            "WHERE role = 'agent'), answer_seq = (SELECT seq FROM turns WHERE role = 'agent') "
            "WHERE platform = 'discord'")
    db.close()

    # Discord delivers the message again (a RESUME after a takeover): the stored answer is
    # posted again with the same nonces, i.e. shown once, files and buttons included.
    await fake.redeliver(bot, asked)
    await fake.wait_for(lambda: fake.nonce_hits >= 1 and fake.rich_edits > edits)
    assert len(agent.calls) == 1
    assert len(fake.posts(bot.token)) == 1
    assert post.text == shown and "\x1e" not in post.text
    assert [u.filename for u in fake.files_of(post)] == ["chart.png", "report.pdf"]
    assert [b["label"] for b in fake.buttons_of(post)] == ["Approve", "Reject"]


async def test_a_streamed_answer_past_one_message_gets_the_buttons_on_its_last(
        fake, make_agent, make_gateway):
    words = ("word " * 500).strip()  # 2,499 characters: two messages
    lines = [{"delta": words[:1200]}, {"delta": words[1200:]},
             {"actions": [{"label": "More", "value": "more"}]}]

    async def stream(call: AgentCall) -> web.StreamResponse:
        return web.Response(text="".join(json.dumps(x) + "\n" for x in lines),
                            content_type="application/x-ndjson")

    agent = await make_agent(behaviour=stream)
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    await fake.message_create(bot, "tell me", channel_id="2001", author=ALICE)
    first, last = await fake.wait_posts(2, token=bot.token)
    await fake.wait_for(lambda: fake.buttons_of(last))
    assert (first.text + " " + last.text).split() == words.split()
    assert not fake.buttons_of(first)
    assert [b["label"] for b in fake.buttons_of(last)] == ["More"]


async def test_a_click_in_a_thread_goes_to_the_threads_session(fake, make_agent, make_gateway,
                                                               files_server):
    agent = await make_agent(behaviour=answers(files_server))
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    session = await fake.wait_ready(bot)
    thread = "3003"
    fake.threads[thread] = CHANNEL
    # Discord tells the bot about the server, its channel and the thread (Guilds intent).
    now = "2026-01-01T00:00:00+00:00"
    await fake.dispatch(session, "GUILD_CREATE", {
        "id": GUILD, "name": "guild", "member_count": 2, "members": [], "roles": [],
        "emojis": [], "stickers": [], "features": [], "unavailable": False,
        "channels": [{"id": CHANNEL, "type": 0, "name": "general", "position": 0,
                      "guild_id": GUILD, "permission_overwrites": []}],
        "threads": [{"id": thread, "type": 11, "parent_id": CHANNEL, "guild_id": GUILD,
                     "name": "a thread", "owner_id": ALICE["id"], "message_count": 1,
                     "member_count": 1, "rate_limit_per_user": 0,
                     "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                         "archive_timestamp": now, "locked": False}}],
    })
    await fake.message_create(bot, f"<@{bot.user_id}> deploy?", guild_id=GUILD,
                              channel_id=thread, author=ALICE, extra=mention(bot))
    [post] = await fake.wait_posts(1, token=bot.token)
    await fake.wait_for(lambda: fake.buttons_of(post))
    click = await fake.click(bot, post, fake.buttons_of(post)[0]["custom_id"], user=ALICE,
                             guild_id=GUILD)
    await fake.wait_acknowledged(click)
    first, second = await agent.wait_calls(2)
    assert first.body["conversation"] == {"id": CHANNEL, "type": "channel", "threadId": thread}
    assert second.body["conversation"] == first.body["conversation"]
    assert second.body["sessionId"] == first.body["sessionId"]
    assert second.body["message"]["text"] == "approve-7"


async def test_a_file_over_discords_limit_is_listed_not_attached(fake, make_agent, make_gateway,
                                                                  files_server):
    agent = await make_agent(behaviour=answers(files_server))
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    await fake.message_create(bot, "big file", channel_id="2001", author=ALICE)
    [post] = await fake.wait_posts(1, token=bot.token)
    await fake.wait_for(lambda: fake.files_of(post))
    assert [u.filename for u in fake.files_of(post)] == ["chart.png"]
    assert post.text == f"Too big?\n\n- [big.bin]({files_server}/big.bin)"
