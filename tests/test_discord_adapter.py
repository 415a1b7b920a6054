"""The Discord adapter end to end: real discord.py in an in-process daemon against a fake Discord."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.discord.convert import MAX_MESSAGE_LENGTH, reply_nonce
from chatgateway.adapter import AdapterState
from chatgateway.daemon import Daemon
from chatgateway.models import Platform
from tests.conftest import tenant
from tests.fakes.discord import FakeBot, FakeDiscord, user_object

GUILD = "3001"
CHANNEL = "3002"
ALICE = user_object("1001", "alice")
BOB = user_object("1002", "bob")


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = await FakeDiscord().start()
    yield server
    await server.stop()


def discord_tenant(tenant_id: str, agent_url: str | None, *bots: dict[str, Any],
                   **extra: Any) -> dict[str, Any]:
    return tenant(tenant_id, agent_url, discord={"bots": list(bots)}, **extra)


def status_of(daemon: Daemon, tenant_id: str, name: str) -> Any:
    assert daemon.supervisor is not None
    for status in daemon.supervisor.statuses():
        if status.tenant_id == tenant_id and status.platform == Platform.DISCORD \
                and status.name == name:
            return status
    raise AssertionError(f"no discord adapter {tenant_id}/{name}")


async def until(predicate: Any, within: float = 10.0) -> None:
    """Poll a condition nothing notifies about (adapter status, metrics) until it holds."""
    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


async def wait_state(daemon: Daemon, tenant_id: str, name: str, state: AdapterState,
                     within: float = 15.0) -> Any:
    await until(lambda: status_of(daemon, tenant_id, name).state == state, within)
    return status_of(daemon, tenant_id, name)


def mention(bot: FakeBot) -> dict[str, Any]:
    return {"mentions": [bot.user()]}


async def test_dm_round_trip(fake, make_agent, make_gateway):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    gw = await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    sent = await fake.message_create(bot, "hello there", channel_id="2001", author=ALICE)

    [post] = await fake.wait_posts(1, token=bot.token)
    assert post.content == "agent: hello there"
    assert post.channel_id == "2001"
    assert post.reference is not None and post.reference["message_id"] == sent["id"]
    assert post.nonce == reply_nonce(int(bot.user_id), sent["id"], 0)
    assert post.payload["enforce_nonce"] is True
    body = agent.calls[0].body
    assert body["tenant"] == "acme"
    assert body["platform"] == "discord"
    assert body["message"]["id"] == sent["id"]
    assert body["user"] == {"id": "1001", "name": "alice"}
    assert body["conversation"] == {"id": "2001", "type": "dm", "threadId": None}
    status = status_of(gw, "acme", "acmebot")
    assert status.state == AdapterState.CONNECTED
    assert status.last_event_at is not None


async def test_guild_mention_answered_as_reply_with_mention_stripped(fake, make_agent,
                                                                     make_gateway):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    sent = await fake.message_create(
        bot, f"<@{bot.user_id}> what is up?", guild_id=GUILD, channel_id=CHANNEL, author=ALICE,
        extra=mention(bot),
    )
    [post] = await fake.wait_posts(1, token=bot.token)
    assert agent.texts() == ["what is up?"]
    assert post.content == "agent: what is up?"
    assert post.channel_id == CHANNEL
    assert post.reference["message_id"] == sent["id"]
    assert post.reference["channel_id"] == CHANNEL
    assert post.payload["allowed_mentions"]["parse"] == []
    body = agent.calls[0].body
    assert body["conversation"] == {"id": CHANNEL, "type": "channel", "threadId": None}
    assert body["metadata"]["guildId"] == GUILD
    assert body["metadata"]["via"] == "mention"


async def test_typing_is_sent_before_the_reply(fake, make_agent, make_gateway):
    agent = await make_agent(delay=0.3)
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    await fake.message_create(bot, "slow question", channel_id="2001")
    [post] = await fake.wait_posts(1, token=bot.token)
    typing = [t for t in fake.typing if t.channel_id == "2001" and t.token == bot.token]
    assert typing, "no typing indicator was sent"
    assert typing[0].order < post.order


async def test_own_and_other_bots_messages_are_ignored(fake, make_agent, make_gateway):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(
        bot, channels=[CHANNEL]))]})
    await fake.wait_ready(bot)
    other_bot = user_object("1900", "otherbot", bot=True)
    # Another bot, in a DM, mentioning us, and in a channel where every message is answered.
    await fake.message_create(bot, "beep", author=other_bot)
    await fake.message_create(bot, f"<@{bot.user_id}> beep", guild_id=GUILD, channel_id=CHANNEL,
                              author=other_bot, extra=mention(bot))
    # Our own message (as Discord echoes it back), in the configured channel.
    await fake.message_create(bot, "my own words", guild_id=GUILD, channel_id=CHANNEL,
                              author=bot.user())
    # A person: answered; its reply is echoed back to the bot and must not be answered again.
    await fake.message_create(bot, "human here", guild_id=GUILD, channel_id=CHANNEL,
                              author=ALICE)
    await fake.wait_posts(1, token=bot.token)
    await agent.wait_calls(1)
    # Let the echo of our reply and everything before it be processed, then check nothing more.
    marker = await fake.message_create(bot, "last", channel_id="2001", author=BOB)
    posts = await fake.wait_posts(2, token=bot.token)
    assert [p.content for p in posts] == ["agent: human here", "agent: last"]
    assert agent.texts() == ["human here", "last"]
    assert posts[1].reference["message_id"] == marker["id"]


def dedup_count(daemon: Daemon, tenant_id: str) -> float:
    value: float = daemon.metrics.deduplicated.labels(tenant_id, "discord")._value.get()
    return value


async def test_same_user_same_channel_is_one_session(fake, make_agent, make_gateway):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    ask = f"<@{bot.user_id}> q"
    await fake.message_create(bot, ask, guild_id=GUILD, channel_id=CHANNEL, author=ALICE,
                              extra=mention(bot))
    await fake.wait_posts(1, token=bot.token)
    await fake.message_create(bot, ask, guild_id=GUILD, channel_id=CHANNEL, author=ALICE,
                              extra=mention(bot))
    await fake.wait_posts(2, token=bot.token)
    await fake.message_create(bot, ask, guild_id=GUILD, channel_id=CHANNEL, author=BOB,
                              extra=mention(bot))
    await fake.wait_posts(3, token=bot.token)
    await fake.message_create(bot, ask, guild_id=GUILD, channel_id="3003", author=ALICE,
                              extra=mention(bot))
    await fake.wait_posts(4, token=bot.token)
    sessions = [c.body["sessionId"] for c in agent.calls]
    assert sessions[0] == sessions[1]
    assert len(set(sessions)) == 3
    assert agent.calls[1].body["history"][0]["text"] == "q"


async def test_resume_replay_of_a_handled_message_is_not_answered_twice(
    fake, make_agent, make_gateway
):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    gw = await make_gateway({"tenants": [discord_tenant("acme", agent.url,
                                                        fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    sent = await fake.message_create(bot, "only once", channel_id="2001")
    await fake.wait_posts(1, token=bot.token)
    resumes = len(fake.ops(6, bot.token))

    await fake.force_resume_replay(bot, message_id=sent["id"])
    await fake.wait_for(lambda: len(fake.ops(6, bot.token)) > resumes)
    await until(lambda: dedup_count(gw, "acme") >= 1)
    await fake.message_create(bot, "next", channel_id="2001")
    posts = await fake.wait_posts(2, token=bot.token)
    assert [p.content for p in posts] == ["agent: only once", "agent: next"]
    assert agent.texts() == ["only once", "next"]
    # The typing indicator is not shown for the replay either.
    assert len([t for t in fake.typing if t.token == bot.token]) == 2


async def test_resume_replay_during_the_agent_call_is_not_answered_twice(
    fake, make_agent, make_gateway
):
    agent = await make_agent(delay=0.5)
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    sent = await fake.message_create(bot, "slow", channel_id="2001")
    await agent.wait_calls(1)
    await fake.force_resume_replay(bot, message_id=sent["id"])
    await fake.wait_posts(1, token=bot.token)
    await fake.message_create(bot, "next", channel_id="2001")
    posts = await fake.wait_posts(2, token=bot.token)
    assert [p.content for p in posts] == ["agent: slow", "agent: next"]
    assert agent.texts() == ["slow", "next"]


async def test_op7_reconnect_mid_conversation_then_next_message_answered(
    fake, make_agent, make_gateway
):
    agent = await make_agent(delay=0.3)
    bot = fake.add_bot("acmebot")
    gw = await make_gateway({"tenants": [discord_tenant("acme", agent.url,
                                                        fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    await fake.message_create(bot, "first", channel_id="2001")
    await agent.wait_calls(1)
    await fake.reconnect(bot)  # op 7 while the agent is still answering
    await fake.wait_for(lambda: fake.ops(6, bot.token))
    await fake.wait_ready(bot)
    await fake.message_create(bot, "second", channel_id="2001")
    posts = await fake.wait_posts(2, token=bot.token)
    assert [p.content for p in posts] == ["agent: first", "agent: second"]
    [resume] = fake.ops(6, bot.token)
    assert resume.path == "/resume"  # resumed on READY's resume_gateway_url
    assert len(fake.ops(2, bot.token)) == 1  # no new IDENTIFY: the session was resumed
    assert agent.calls[0].body["sessionId"] == agent.calls[1].body["sessionId"]
    status = await wait_state(gw, "acme", "acmebot", AdapterState.CONNECTED)
    assert status.reconnects == 1


async def test_op9_invalid_session_reidentifies_and_keeps_answering(
    fake, make_agent, make_gateway
):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    first = await fake.wait_ready(bot)
    await fake.invalidate(bot, resumable=True)  # op 9 d:true -> RESUME
    await fake.wait_for(lambda: fake.ops(6, bot.token))
    await fake.wait_ready(bot)
    await fake.invalidate(bot, resumable=False)  # op 9 d:false -> new IDENTIFY
    await fake.wait_for(lambda: len(fake.ops(2, bot.token)) == 2)
    second = await fake.wait_ready(bot)
    assert second.id != first.id
    await fake.message_create(bot, "still there?", channel_id="2001")
    [post] = await fake.wait_posts(1, token=bot.token)
    assert post.content == "agent: still there?"


async def test_dropped_connection_resumes_and_delivers_missed_messages(
    fake, make_agent, make_gateway
):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    session = await fake.wait_ready(bot)
    assert session.conn is not None
    session.conn.request.transport.abort()  # no close frame: a dropped TCP connection
    await fake.wait_for(lambda: session.conn is None)
    # Sent while the bot is away; Discord replays it on RESUME.
    await fake.message_create(bot, "while you were out", channel_id="2001")
    [post] = await fake.wait_posts(1, token=bot.token, within=20)
    assert post.content == "agent: while you were out"
    assert fake.ops(6, bot.token) and len(fake.ops(2, bot.token)) == 1


async def test_invalid_token_parks_one_tenant_while_the_other_answers(
    fake, make_agent, make_gateway
):
    agent_a, agent_b = await make_agent(prefix="A: "), await make_agent(prefix="B: ")
    bot_a, bot_b = fake.add_bot("abot"), fake.add_bot("bbot")
    bot_a.gateway_valid = False  # token reset: the gateway closes with 4004
    gw = await make_gateway({"tenants": [
        discord_tenant("alpha", agent_a.url, fake.bot_settings(bot_a)),
        discord_tenant("beta", agent_b.url, fake.bot_settings(bot_b)),
    ]})
    status = await wait_state(gw, "alpha", "abot", AdapterState.PARKED)
    assert "4004" in status.last_error and "token" in status.last_error
    await fake.wait_ready(bot_b)
    await fake.message_create(bot_b, "hi B", channel_id="2001")
    [post] = await fake.wait_posts(1)
    assert post.token == bot_b.token and post.content == "B: hi B"
    assert agent_a.calls == []
    # Parked, not retried in a loop.
    assert len(fake.ops(2, bot_a.token)) == 1
    assert status_of(gw, "alpha", "abot").state == AdapterState.PARKED


async def test_unknown_token_at_login_parks(fake, make_agent, make_gateway):
    agent = await make_agent()
    settings = fake.bot_settings(fake.add_bot("abot"), token={"value": "not-a-real-token-123"})
    gw = await make_gateway({"tenants": [discord_tenant("alpha", agent.url, settings)]})
    status = await wait_state(gw, "alpha", "abot", AdapterState.PARKED)
    assert "401" in status.last_error
    assert fake.gateway_ops == []


async def test_missing_privileged_intent_parks_and_works_without_it(
    fake, make_agent, make_gateway
):
    agent = await make_agent()
    strict = fake.add_bot("strictbot", message_content_allowed=False)
    relaxed = fake.add_bot("relaxedbot", message_content_allowed=False)
    gw = await make_gateway({"tenants": [
        discord_tenant("alpha", agent.url, fake.bot_settings(strict)),
        discord_tenant("beta", agent.url, fake.bot_settings(
            relaxed, message_content_intent=False, channels=[CHANNEL])),
    ]})
    status = await wait_state(gw, "alpha", "strictbot", AdapterState.PARKED)
    assert "4014" in status.last_error and "Message Content" in status.last_error
    assert len(fake.ops(2, strict.token)) == 1

    # Without the intent the bot still answers DMs and mentions; plain channel messages arrive
    # without content and are left alone.
    await fake.wait_ready(relaxed)
    await fake.message_create(relaxed, "no content for me", guild_id=GUILD, channel_id=CHANNEL)
    await fake.message_create(relaxed, "a DM", channel_id="2001")
    await fake.wait_posts(1, token=relaxed.token)
    await fake.message_create(relaxed, f"<@{relaxed.user_id}> a mention", guild_id=GUILD,
                              channel_id=CHANNEL, extra=mention(relaxed))
    posts = await fake.wait_posts(2, token=relaxed.token)
    assert [p.content for p in posts] == ["agent: a DM", "agent: a mention"]
    identify = fake.ops(2, relaxed.token)[0]
    assert not identify.data["intents"] & (1 << 15)


async def test_every_message_in_configured_channels(fake, make_agent, make_gateway):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(
        bot, channels=[int(CHANNEL)]))]})
    await fake.wait_ready(bot)
    await fake.message_create(bot, "not addressed", guild_id=GUILD, channel_id="3999")
    await fake.message_create(bot, "in the open channel", guild_id=GUILD, channel_id=CHANNEL)
    [post] = await fake.wait_posts(1, token=bot.token)
    assert post.content == "agent: in the open channel"
    assert agent.texts() == ["in the open channel"]


async def test_two_tenants_reply_with_their_own_token_and_agent(fake, make_agent, make_gateway):
    agent_a, agent_b = await make_agent(prefix="A: "), await make_agent(prefix="B: ")
    bot_a, bot_b = fake.add_bot("abot"), fake.add_bot("bbot")
    await make_gateway({"tenants": [
        discord_tenant("alpha", agent_a.url, fake.bot_settings(bot_a)),
        discord_tenant("beta", agent_b.url, fake.bot_settings(bot_b)),
    ]})
    await fake.wait_ready(bot_a)
    await fake.wait_ready(bot_b)
    await fake.message_create(bot_a, "to alpha", channel_id="2001")
    await fake.message_create(bot_b, "to beta", channel_id="2002")
    posts = await fake.wait_posts(2)
    by_token = {p.token: p for p in posts}
    assert by_token[bot_a.token].content == "A: to alpha"
    assert by_token[bot_a.token].channel_id == "2001"
    assert by_token[bot_b.token].content == "B: to beta"
    assert by_token[bot_b.token].channel_id == "2002"
    assert agent_a.texts() == ["to alpha"] and agent_b.texts() == ["to beta"]
    assert agent_a.calls[0].body["tenant"] == "alpha"
    assert agent_b.calls[0].body["tenant"] == "beta"


async def test_each_bot_uses_its_own_rest_and_gateway_urls(make_agent, make_gateway):
    import discord
    from discord.gateway import DiscordWebSocket

    base, gateway = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    one, two = await FakeDiscord().start(), await FakeDiscord().start()
    try:
        agent = await make_agent()
        bot_one, bot_two = one.add_bot("onebot"), two.add_bot("twobot")
        await make_gateway({"tenants": [
            discord_tenant("alpha", agent.url, one.bot_settings(bot_one)),
            discord_tenant("beta", agent.url, two.bot_settings(bot_two)),
        ]})
        await one.wait_ready(bot_one)
        await two.wait_ready(bot_two)
        await one.message_create(bot_one, "via one", channel_id="2001")
        await two.message_create(bot_two, "via two", channel_id="2001")
        [p1], [p2] = await one.wait_posts(1), await two.wait_posts(1)
        assert (p1.token, p1.content) == (bot_one.token, "agent: via one")
        assert (p2.token, p2.content) == (bot_two.token, "agent: via two")
        assert one.ops(2, bot_two.token) == [] and two.ops(2, bot_one.token) == []
        # Nothing process-global was changed.
        assert discord.http.Route.BASE == base
        assert DiscordWebSocket.DEFAULT_GATEWAY == gateway
    finally:
        await one.stop()
        await two.stop()


async def test_long_reply_with_code_block_is_split_outside_the_block(
    fake, make_agent, make_gateway
):
    from aiohttp import web

    prose = "".join(f"Line {i} of the explanation, a little filler text.\n" for i in range(25))
    code = "```python\n" + "".join(f"print('value number {i}')\n" for i in range(60)) + "```\n"
    tail = "".join(f"After the code, remark {i} goes here.\n" for i in range(48))
    answer = prose + code + tail
    assert 4400 <= len(answer) <= 4600 and len(code) < MAX_MESSAGE_LENGTH
    # A plain cut at 2,000 characters would land inside the code block.
    assert answer.index("```") < MAX_MESSAGE_LENGTH < answer.rindex("```")

    async def long_answer(call: Any) -> web.Response:
        return web.json_response({"response": answer})

    agent = await make_agent(behaviour=long_answer)
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    sent = await fake.message_create(bot, "explain", channel_id="2001")
    posts = await fake.wait_posts(3, token=bot.token)
    await until(lambda: len(fake.posts(bot.token)) >= 3)
    contents = [p.content for p in fake.posts(bot.token)]
    assert all(len(c) <= MAX_MESSAGE_LENGTH for c in contents)
    assert all(c.count("```") % 2 == 0 for c in contents)
    assert any(code.strip() in c for c in contents)  # the block travels whole
    assert "".join(contents).replace("\n", "") == answer.replace("\n", "")
    assert posts[0].reference["message_id"] == sent["id"]
    assert all(p.reference is None for p in posts[1:])
    assert len({p.nonce for p in posts}) == len(posts)


async def test_post_repeated_after_a_lost_response_does_not_post_twice(
    fake, make_agent, make_gateway
):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    fake.drop_after_create = 1  # the message is created, then the connection is cut
    await fake.message_create(bot, "hello", channel_id="2001")
    await fake.wait_posts(1, token=bot.token)
    # The adapter posts again after about a second, with the same nonce: Discord (and the fake)
    # return the message created the first time instead of a second one.
    await fake.wait_for(lambda: fake.nonce_hits > 0, within=15)
    await fake.message_create(bot, "marker", channel_id="2001")
    posts = await fake.wait_posts(2, token=bot.token, within=15)
    assert [p.content for p in posts] == ["agent: hello", "agent: marker"]


async def test_post_retried_by_discord_py_on_5xx_does_not_post_twice(
    fake, make_agent, make_gateway
):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    fake.fail_after_create = 1  # the message is created, but the response is a 500
    await fake.message_create(bot, "hello", channel_id="2001")
    await fake.wait_posts(1, token=bot.token)
    # discord.py retries the POST after about a second, with the same nonce.
    await fake.wait_for(lambda: fake.fail_after_create == 0)
    await fake.message_create(bot, "marker", channel_id="2001")
    posts = await fake.wait_posts(2, token=bot.token, within=15)
    assert [p.content for p in posts] == ["agent: hello", "agent: marker"]


async def test_replay_after_a_gateway_restart_is_not_answered(fake, make_agent, make_gateway):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    config = {"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]}
    first = await make_gateway(config)
    await fake.wait_ready(bot)
    sent = await fake.message_create(bot, "before restart", channel_id="2001")
    await fake.wait_posts(1, token=bot.token)
    await first.stop()

    second = await make_gateway(config)  # same SQLite file
    await fake.wait_for(lambda: len(fake.ops(2, bot.token)) == 2)
    await fake.wait_ready(bot)
    await fake.redeliver(bot, sent)
    await until(lambda: dedup_count(second, "acme") >= 1)
    await fake.message_create(bot, "after restart", channel_id="2001")
    posts = await fake.wait_posts(2, token=bot.token)
    assert [p.content for p in posts] == ["agent: before restart", "agent: after restart"]
    assert agent.texts() == ["before restart", "after restart"]


async def test_message_received_before_shutdown_is_answered(fake, make_agent, make_gateway):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    gw = await make_gateway({"tenants": [discord_tenant("acme", agent.url,
                                                        fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    # Hold the message between its arrival and the pipeline (at the typing check's store read).
    arrived, go_on = asyncio.Event(), asyncio.Event()
    check = gw.pipeline.already_processed

    async def held(message: Any) -> bool:
        arrived.set()
        await go_on.wait()
        return await check(message)

    gw.pipeline.already_processed = held  # type: ignore[method-assign]
    await fake.message_create(bot, "just before shutdown", channel_id="2001")
    await arrived.wait()
    stopping = asyncio.create_task(gw.stop())
    await until(lambda: not gw.pipeline.accepting)
    go_on.set()
    await stopping
    assert agent.texts() == ["just before shutdown"]
    assert [p.content for p in fake.posts(bot.token)] == ["agent: just before shutdown"]


async def test_missing_permissions_are_survived(fake, make_agent, make_gateway):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))]})
    await fake.wait_ready(bot)
    fake.forbidden_channels.add("2001")
    fake.no_history_channels.add("2002")
    await fake.message_create(bot, "nowhere to answer", channel_id="2001")
    await agent.wait_calls(1)
    sent = await fake.message_create(bot, "answer without reply", channel_id="2002")
    [post] = await fake.wait_posts(1, token=bot.token)
    assert post.channel_id == "2002" and post.reference is None
    assert post.content == "agent: answer without reply"
    assert sent["id"] != post.message["id"]


async def test_reidentify_respects_the_identify_interval(fake, make_agent, make_gateway):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    await make_gateway({"tenants": [discord_tenant("acme", agent.url, fake.bot_settings(
        bot, identify_interval=1.0))]})
    await fake.wait_ready(bot)
    await fake.invalidate(bot, resumable=False)
    await fake.wait_for(lambda: len(fake.ops(2, bot.token)) == 2)
    first, second = fake.ops(2, bot.token)
    assert second.at - first.at >= 0.9  # Discord allows one IDENTIFY per interval per bot
    assert second.path == "/gateway"  # no RESUME happened before, so the configured gateway


async def test_status_and_metrics_show_connected_and_parked_bots(fake, make_agent, make_gateway,
                                                                 http):
    from tests.conftest import ADMIN_TOKEN, url

    agent = await make_agent()
    good, strict = fake.add_bot("goodbot"), fake.add_bot("strictbot",
                                                         message_content_allowed=False)
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}}, "tenants": [
        discord_tenant("acme", agent.url, fake.bot_settings(good), fake.bot_settings(strict)),
    ]})
    await wait_state(gw, "acme", "strictbot", AdapterState.PARKED)
    await wait_state(gw, "acme", "goodbot", AdapterState.CONNECTED)
    await fake.message_create(good, "hi", channel_id="2001")
    await fake.wait_posts(1, token=good.token)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.get(url(gw, "/admin/status"), headers=headers) as resp:
        assert resp.status == 200
        report = await resp.json()
    [acme] = report["tenants"]
    adapters = {a["name"]: a for a in acme["adapters"]}
    assert adapters["goodbot"]["platform"] == "discord"
    assert adapters["goodbot"]["state"] == "connected"
    assert adapters["goodbot"]["connectedAt"] is not None
    assert adapters["goodbot"]["lastEventAt"] is not None
    assert adapters["strictbot"]["state"] == "parked"
    assert "4014" in adapters["strictbot"]["lastError"]
    async with http.get(url(gw, "/metrics")) as resp:
        metrics = await resp.text()
    assert 'chatgateway_adapter_up{adapter="goodbot",platform="discord",tenant="acme"} 1.0' \
        in metrics
    assert 'chatgateway_adapter_parked{adapter="strictbot",platform="discord",tenant="acme"} 1.0' \
        in metrics
