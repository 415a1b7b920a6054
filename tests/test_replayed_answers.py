"""The commit-then-post window: an answer stored with its platform event but never posted (the
instance died in between) is posted when the platform replays the message, where posting twice
shows it once (Discord's nonces: an idempotent Outbound); other platforms keep the plain dedup.

The store keeps, with a processed event, which turn was its answer (`keep_answer`) until its post
returned (`answer_posted`); the pipeline's duplicate branches post such an answer again through an
idempotent outbound. Tested on the real stores, through the real pipeline (with an Outbound that
shows what a channel would; an instance killed mid-post is a cancelled task), across two instances
on PostgreSQL, and end to end through discord.py and the fake Discord.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatgateway.models import (
    Action,
    Conversation,
    ConversationKind,
    NormalizedMessage,
    Platform,
    Role,
    SessionKey,
    TenantId,
    Turn,
    User,
)
from chatgateway.outbound import Address
from chatgateway.store.base import SessionStore
from tests.conftest import tenant
from tests.fakes.discord import FakeDiscord
from tests.test_store import postgres_schema, store  # noqa: F401  (the store fixture)

ACME, OTHER = TenantId("acme"), TenantId("other")


class Channel:
    """What users see in a chat channel. An idempotent post (Discord's nonce, derived from the
    message answered) whose answer is shown already shows nothing new."""

    def __init__(self) -> None:
        self.visible: list[tuple[str, str]] = []
        self.posts = 0
        self._nonces: set[str] = set()

    def show(self, answered: str, text: str, *, nonce: bool) -> None:
        self.posts += 1
        if nonce:
            if answered in self._nonces:
                return
            self._nonces.add(answered)
        self.visible.append((answered, text))

    def answers_to(self, message_id: str) -> list[str]:
        return [text for answered, text in self.visible if answered == message_id]


class ChannelOutbound:
    """An Outbound into a Channel; `dies`: the instance is killed before the post (the task is
    cancelled there, as at a shutdown that cannot wait)."""

    def __init__(self, channel: Channel, message_id: str, *, idempotent: bool,
                 dies: bool = False) -> None:
        self.address = Address(Platform.DISCORD, "bot", {"message_id": message_id})
        self.idempotent = idempotent
        self.channel = channel
        self.message_id = message_id
        self.dies = dies
        self.calls: list[str] = []

    async def post(self, text: str) -> None:
        self.calls.append("post")
        self._show(text)

    async def append(self, delta: str) -> None:
        self.calls.append("append")

    async def finish(self, text: str) -> None:
        self.calls.append("finish")
        self._show(text)

    def _show(self, text: str) -> None:
        if self.dies:
            raise asyncio.CancelledError
        if text:
            self.channel.show(self.message_id, text, nonce=self.idempotent)


def message(message_id: str, text: str = "hello", platform: Platform = Platform.DISCORD,
            tenant_id: TenantId = ACME) -> NormalizedMessage:
    return NormalizedMessage(
        tenant_id, platform, Conversation("C1", ConversationKind.CHANNEL), User("U1"), text,
        message_id, time.time(),
    )


# The store ----------------------------------------------------------------------------------


async def test_a_processed_event_keeps_its_answer_scoped_by_tenant(
    store: SessionStore,  # noqa: F811
) -> None:
    discord = Platform.DISCORD
    key = SessionKey(ACME, discord, "C1", "", "U1")
    session = await store.create_session(key, kind=ConversationKind.CHANNEL, user_name=None,
                                         now=time.time())
    now = time.time()
    await store.record_exchange(
        ACME, session.id, [Turn(Role.USER, "q1", now), Turn(Role.AGENT, "answer one", now)],
        max_turns=100, processed_event=(discord, "m1"), keep_answer=True,
    )
    # An answer with buttons comes back with them (the transcript's stored form decoded).
    buttons = (Action("Approve", "yes", "primary"), Action("Reject", "no"))
    await store.record_exchange(
        ACME, session.id, [Turn(Role.USER, "q4", now), Turn(Role.AGENT, "pick", now, (), buttons)],
        max_turns=100, processed_event=(discord, "m4"), keep_answer=True,
    )
    # Without keep_answer (Slack, the web), the event is processed but points at nothing.
    await store.record_exchange(
        ACME, session.id, [Turn(Role.USER, "q2", now), Turn(Role.AGENT, "answer two", now)],
        max_turns=100, processed_event=(discord, "m2"),
    )
    # An empty answer has no agent turn: nothing to post again.
    await store.record_exchange(
        ACME, session.id, [Turn(Role.USER, "q3", now)], max_turns=100,
        processed_event=(discord, "m3"), keep_answer=True,
    )
    assert await store.is_processed(ACME, discord, "m1")
    found = await store.processed_answer(ACME, discord, "m1")
    assert found is not None
    assert found[0] == session.id and found[1].text == "answer one" and found[1].role == Role.AGENT
    assert found[1].timestamp == now
    rich = await store.processed_answer(ACME, discord, "m4")
    assert rich is not None and rich[1].text == "pick" and rich[1].actions == buttons
    assert await store.processed_answer(ACME, discord, "m2") is None
    assert await store.is_processed(ACME, discord, "m3")
    assert await store.processed_answer(ACME, discord, "m3") is None
    assert await store.processed_answer(ACME, discord, "unknown") is None
    # Another tenant's event of the same id, or another platform's, is not this one.
    assert await store.processed_answer(OTHER, discord, "m1") is None
    assert await store.processed_answer(ACME, Platform.SLACK, "m1") is None
    # Once its post returned, a replay needs it no more.
    await store.answer_posted(ACME, discord, "m4")
    assert await store.processed_answer(ACME, discord, "m4") is None
    assert await store.is_processed(ACME, discord, "m4")
    await store.answer_posted(OTHER, discord, "m1")  # another tenant's: nothing changes
    # The answer is the transcript's turn: a deleted session (an erasure) takes it with it.
    assert await store.delete_session(ACME, session.id)
    assert await store.processed_answer(ACME, discord, "m1") is None
    assert await store.is_processed(ACME, discord, "m1")


# The pipeline -------------------------------------------------------------------------------


async def test_a_replay_of_an_answer_stored_but_never_posted_is_posted_once(
    make_gateway, make_agent
):
    agent = await make_agent()
    daemon = await make_gateway({"tenants": [tenant("acme", agent.url)]})
    pipeline = daemon.pipeline
    assert pipeline is not None
    channel = Channel()

    # The instance "dies" between storing the answer and posting it.
    dying = ChannelOutbound(channel, "m1", idempotent=True, dies=True)
    with pytest.raises(asyncio.CancelledError):
        await pipeline.handle(message("m1", "what time is it?"), dedup=True, outbound=dying)
    assert channel.visible == []

    # Discord replays the message (to the next owner): the stored answer is posted, once.
    replay = ChannelOutbound(channel, "m1", idempotent=True)
    again = await pipeline.handle(message("m1", "what time is it?"), dedup=True, outbound=replay)
    assert again.outcome == "duplicate"
    assert replay.calls == ["post"]
    assert channel.answers_to("m1") == ["agent: what time is it?"]
    assert agent.texts() == ["what time is it?"], "the agent is not asked again"

    # That post returned: another replay posts nothing.
    third = ChannelOutbound(channel, "m1", idempotent=True)
    assert (await pipeline.handle(message("m1"), dedup=True, outbound=third)).outcome == "duplicate"
    assert third.calls == [] and channel.posts == 1
    assert channel.answers_to("m1") == ["agent: what time is it?"]


async def test_a_replay_of_an_answer_posted_normally_posts_nothing(make_gateway, make_agent):
    """The usual replay (a RESUME after a reconnect or a takeover brings back messages answered
    long ago): no second post, not even one Discord would deduplicate."""
    agent = await make_agent()
    daemon = await make_gateway({"tenants": [tenant("acme", agent.url)]})
    assert daemon.pipeline is not None and daemon.store is not None
    channel = Channel()
    posting = ChannelOutbound(channel, "m2", idempotent=True)
    assert (await daemon.pipeline.handle(message("m2"), dedup=True, outbound=posting)).outcome \
        == "ok"
    assert posting.calls[-1] == "finish" and channel.answers_to("m2") == ["agent: hello"]
    assert await daemon.store.processed_answer(ACME, Platform.DISCORD, "m2") is None
    replay = ChannelOutbound(channel, "m2", idempotent=True)
    assert (await daemon.pipeline.handle(message("m2"), dedup=True, outbound=replay)).outcome \
        == "duplicate"
    assert replay.calls == [] and channel.posts == 1


async def test_a_non_idempotent_outbound_gets_the_plain_dedup(make_gateway, make_agent):
    """Slack's posts cannot be deduplicated: a replay posts nothing (today's behaviour), and
    nothing is kept for it."""
    agent = await make_agent()
    daemon = await make_gateway({"tenants": [tenant("acme", agent.url)]})
    pipeline = daemon.pipeline
    assert pipeline is not None and daemon.store is not None
    channel = Channel()
    msg = message("Ev1", platform=Platform.SLACK)
    dying = ChannelOutbound(channel, "Ev1", idempotent=False, dies=True)
    with pytest.raises(asyncio.CancelledError):
        await pipeline.handle(msg, dedup=True, outbound=dying)
    replay = ChannelOutbound(channel, "Ev1", idempotent=False)
    assert (await pipeline.handle(msg, dedup=True, outbound=replay)).outcome == "duplicate"
    assert replay.calls == [] and channel.visible == []
    assert await daemon.store.processed_answer(ACME, Platform.SLACK, "Ev1") is None
    # A message still being answered by this instance is not posted twice either.
    channel_two = Channel()
    slow = await make_agent(delay=0.5)
    daemon_two = await make_gateway({"tenants": [tenant("acme", slow.url)]})
    assert daemon_two.pipeline is not None
    answering = asyncio.create_task(daemon_two.pipeline.handle(
        message("m9"), dedup=True, outbound=ChannelOutbound(channel_two, "m9", idempotent=True)))
    await slow.wait_calls(1, within=10)
    twice = ChannelOutbound(channel_two, "m9", idempotent=True)
    assert (await daemon_two.pipeline.handle(message("m9"), dedup=True, outbound=twice)).outcome \
        == "duplicate"
    assert twice.calls == []
    assert (await answering).outcome == "ok"
    assert channel_two.answers_to("m9") == ["agent: hello"]


@pytest.mark.postgres
async def test_a_replay_answered_by_the_previous_owner_meanwhile_is_posted_idempotently(
    make_gateway, make_agent
):
    """Two instances: the bot's previous owner still answers a message when Discord replays it
    to the new owner, which waits for the session's lock, finds it answered, and posts the stored
    answer through its nonce'd outbound (shown once whether or not the old owner's post landed)."""
    agent = await make_agent(delay=1.0)
    async with postgres_schema() as dsn:
        config = {
            "storage": {"backend": "postgres", "dsn": {"value": dsn}},
            "cluster": {"coordination": "postgres"},
            "tenants": [tenant("acme", agent.url)],
        }
        old, new = await make_gateway(config), await make_gateway(config)
        assert old.pipeline is not None and new.pipeline is not None
        channel = Channel()
        # The old owner stores the answer and dies before posting it.
        dying = ChannelOutbound(channel, "m1", idempotent=True, dies=True)
        answering = asyncio.create_task(
            old.pipeline.handle(message("m1", "slow one"), dedup=True, outbound=dying))
        await agent.wait_calls(1, within=10)
        replay = ChannelOutbound(channel, "m1", idempotent=True)
        reply = await new.pipeline.handle(message("m1", "slow one"), dedup=True, outbound=replay)
        with pytest.raises(asyncio.CancelledError):
            await answering
        assert reply.outcome == "duplicate"
        assert replay.calls == ["post"]
        assert channel.answers_to("m1") == ["agent: slow one"]
        assert agent.texts() == ["slow one"]
        await old.stop()
        await new.stop()


# End to end: discord.py and the fake Discord ---------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = await FakeDiscord().start()
    yield server
    await server.stop()


def _replies(fake: FakeDiscord, token: str, message_id: str) -> list[Any]:
    return [p for p in fake.posts(token)
            if p.reference is not None and p.reference.get("message_id") == message_id]


async def test_discord_replay_completes_an_answer_whose_post_was_cut_off(
    fake, make_agent, make_gateway, tmp_path
):
    """The answer is stored and its first words are posted, but the instance stops for good
    while Discord holds the final edit back (429, retry in 30 s) and the answering task is
    cancelled: the message shows only the first words. When Discord delivers the message again,
    the next instance posts the stored answer with the same nonce: Discord returns the message
    already posted, and it is edited to the whole answer. One message, the whole answer, one
    agent call."""
    agent = await make_agent(stream_chunks=["The first words", " and the rest of it."],
                             stream_pause=0.1)
    bot = fake.add_bot("acmebot")
    config = {
        "storage": {"path": str(tmp_path / "replay.db")},
        "server": {"drain_seconds": 0.2},
        "tenants": [tenant("acme", agent.url, discord={
            "bots": [fake.bot_settings(bot, typing_indicator=False)]})],
    }
    first = await make_gateway(config)
    await fake.wait_ready(bot)
    fake.rate_limit_edits, fake.rate_limit_retry_after = 1, 30.0
    sent = await fake.message_create(bot, "answer me", channel_id="2001")
    await fake.wait_for(lambda: fake.rate_limited_edits == 1, within=20)
    [cut] = _replies(fake, bot.token, sent["id"])
    assert cut.content == "The first words"
    await first.stop()  # the drain gives up; the adapter cancels the answer stuck in the 429
    assert fake.message_of(cut.message["id"]).text == "The first words"

    second = await make_gateway(config)
    await fake.wait_ready(bot)
    hits = fake.nonce_hits
    await fake.redeliver(bot, sent)
    full = "The first words and the rest of it."
    await fake.wait_for(
        lambda: fake.message_of(cut.message["id"]).text == full, within=20)
    assert fake.nonce_hits == hits + 1
    assert len(_replies(fake, bot.token, sent["id"])) == 1
    assert agent.texts() == ["answer me"], "the agent is not asked again"
    # Once that post returned, the event no longer points at the answer.
    kept = second.store
    assert kept is not None
    async with asyncio.timeout(5):
        while True:
            if await kept.processed_answer(ACME, Platform.DISCORD, sent["id"]) is None:
                break
            await asyncio.sleep(0.02)
