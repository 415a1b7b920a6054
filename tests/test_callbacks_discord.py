"""A late answer (202, then the agent's callback) for a Discord bot on two instances sharing
PostgreSQL: the callback reaches the instance that does not run the bot, which leaves it to the
bot's owner; the owner posts it, once, as the reply. Real discord.py against the fake Discord."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from chatgateway.adapter import AdapterState
from tests.conftest import url
from tests.fakes.discord import FakeDiscord, user_object
from tests.test_callbacks import accept_later, on, post_callback
from tests.test_discord_adapter import discord_tenant, status_of, until
from tests.test_store import postgres_schema

pytestmark = pytest.mark.postgres

ALICE = user_object("1001", "alice")


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = await FakeDiscord().start()
    yield server
    await server.stop()


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with postgres_schema() as value:
        yield value


async def test_the_bots_owner_posts_a_late_answer_that_reached_another_instance(
    fake, make_agent, make_gateway, http: aiohttp.ClientSession, dsn
):
    agent = await make_agent(behaviour=accept_later)
    bot = fake.add_bot("acmebot")
    settings = {
        "storage": {"backend": "postgres", "dsn": {"value": dsn}},
        "cluster": {"coordination": "postgres"},
        "tenants": [discord_tenant("acme", agent.url, fake.bot_settings(bot))],
    }
    gateways = [await make_gateway(settings), await make_gateway(settings)]
    await fake.wait_ready(bot)

    def states() -> list[AdapterState]:
        return [status_of(gw, "acme", "acmebot").state for gw in gateways]

    await until(lambda: sorted(states()) == sorted([AdapterState.CONNECTED,
                                                    AdapterState.STANDBY]), within=20)
    owner, other = sorted(gateways, key=lambda gw: states()[gateways.index(gw)]
                          != AdapterState.CONNECTED)
    sent = await fake.message_create(bot, "summarise the thread", channel_id="2001",
                                     author=ALICE)
    callback = (await agent.wait_calls(1))[0].body["callback"]
    await asyncio.sleep(0.5)
    assert fake.posts(bot.token) == []  # the 202 posts nothing

    status, body = await post_callback(http, on(other, callback["url"]), callback["token"],
                                       {"text": "The thread agrees on **Tuesday**."})
    assert (status, body) == (200, {"delivered": True})
    [post] = await fake.wait_posts(1, token=bot.token, within=15)
    assert post.content == "The thread agrees on **Tuesday**."
    assert post.channel_id == "2001" and post.reference["message_id"] == sent["id"]
    # A retry at the owner is not posted again.
    status, body = await post_callback(http, on(owner, callback["url"]), callback["token"],
                                       {"text": "The thread agrees on **Tuesday**."})
    assert (status, body) == (200, {"delivered": "already"})
    await asyncio.sleep(2.5)
    assert len(fake.posts(bot.token)) == 1
    assert url(owner, "/") != url(other, "/")
