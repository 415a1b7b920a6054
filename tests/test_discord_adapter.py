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


async def wait_state(daemon: Daemon, tenant_id: str, name: str, state: AdapterState,
                     within: float = 15.0) -> Any:
    async with asyncio.timeout(within):
        while (status := status_of(daemon, tenant_id, name)).state != state:
            await asyncio.sleep(0.02)
    return status


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
