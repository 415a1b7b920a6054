"""Answers streamed into Slack: the real slack-bolt in the gateway, the loopback fake Slack and
an agent streaming NDJSON deltas slowly (docs/slack.md, "Streaming")."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from adapters.slack.convert import markdown_to_mrkdwn, split_message
from chatgateway.models import Platform
from chatgateway.outbound import Address
from tests.fakes.slack import FakeSlack
from tests.test_slack_e2e import adapter_of, slack_tenant, start

STREAM_METHODS = ("chat.startStream", "chat.appendStream", "chat.stopStream")


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


class SlowAgent:
    """An agent writing `chunks` as NDJSON deltas, `pause` seconds apart (an error line instead
    of chunk `error_after`, if given); `done` records when each answer was complete."""

    def __init__(self, chunks: list[str], pause: float, error_after: int | None) -> None:
        self.chunks, self.pause, self.error_after = chunks, pause, error_after
        self.done: list[float] = []
        #: When each answer's first delta was written.
        self.first: list[float] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> SlowAgent:
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

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for n, chunk in enumerate(self.chunks):
            if n == self.error_after:
                await resp.write(json.dumps({"error": "the model fell over"}).encode() + b"\n")
                break
            await resp.write(json.dumps({"delta": chunk}).encode() + b"\n")
            if n == 0:
                self.first.append(time.monotonic())
            await asyncio.sleep(self.pause)
        self.done.append(time.monotonic())
        await resp.write_eof()
        return resp


@pytest.fixture
async def slow_agent() -> AsyncIterator[Any]:
    agents: list[SlowAgent] = []

    async def make(chunks: list[str], pause: float, error_after: int | None = None) -> SlowAgent:
        agent = await SlowAgent(chunks, pause, error_after).start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.stop()


def words(n: int, size: int = 5) -> list[str]:
    return [f"w{i:0{size - 2}d} " for i in range(n)]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def test_mention_streams_in_its_thread_before_the_agent_finishes(
    fake_slack, slow_agent, make_gateway
):
    chunks = ["Hello **there**", ", this ", "is ", "streamed ", *words(12)]
    agent = await slow_agent(chunks, pause=0.25)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))

    delivery = await fake_slack.mention(app, "U0ALICE", "stream please", channel="C0GENERAL")
    user_ts = delivery.envelope["payload"]["event"]["ts"]
    streamed = await fake_slack.wait_for(lambda: fake_slack.streams_in("C0GENERAL"))
    message = streamed[0]
    assert not agent.done
    assert message.text.startswith("Hello **there**")  # standard Markdown, Slack renders it
    assert message.thread_ts == user_ts  # a reply in the user's thread
    assert (message.recipient_user_id, message.recipient_team_id) == ("U0ALICE", app.team_id)
    first_words = message.changes[0][1]

    await fake_slack.wait_for(lambda: not message.streaming, within=15)
    full = "".join(chunks)
    assert message.text == full.strip("\n")
    assert agent.done and first_words < agent.done[0] - 2
    assert fake_slack.posts() == []  # nothing posted besides the stream
    appends = [t for method, t, _ in message.changes if method == "chat.appendStream"]
    assert appends, "the answer grew by appendStream"
    assert all(gap >= 0.9 for gap in gaps([first_words, *appends])), gaps(appends)
    # The working reaction still brackets the answer outside assistant threads.
    await fake_slack.wait_for(lambda: len(fake_slack.reactions) == 2)
    added, removed = fake_slack.reactions
    assert added.at <= first_words and removed.at >= message.changes[-1][1]
    assert fake_slack.statuses == []


async def test_dm_is_streamed_as_a_reply_to_the_users_message(fake_slack, slow_agent,
                                                             make_gateway):
    agent = await slow_agent(["one ", "two ", "three"], pause=0.1)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    delivery = await fake_slack.dm(app, "U0ALICE", "hi")
    streamed = await fake_slack.wait_for(
        lambda: [m for m in fake_slack.streams_in("DU0ALICE") if not m.streaming])
    assert streamed[0].text == "one two three"
    assert streamed[0].thread_ts == delivery.envelope["payload"]["event"]["ts"]
    assert streamed[0].token == app.bot_token


async def test_agent_that_does_not_stream_is_one_post(fake_slack, make_agent, make_gateway):
    agent = await make_agent(delay=0.2)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.mention(app, "U0ALICE", "**one** piece", channel="C0GENERAL")
    posts = await fake_slack.wait_posts(1, channel="C0GENERAL")
    await fake_slack.wait_for(lambda: len(fake_slack.reactions) == 2)
    assert posts[0].text == "agent: *one* piece"  # mrkdwn, as posts always were
    assert [c.method for c in fake_slack.calls if c.method.startswith("chat.")] == [
        "chat.postMessage"
    ]
    assert fake_slack.streams == [] and posts[0].edits == []


async def test_refused_streaming_falls_back_to_post_and_edit_and_is_remembered(
    fake_slack, slow_agent, make_gateway
):
    chunks = ["Fallback ", "**answer** ", *words(10)]
    agent = await slow_agent(chunks, pause=0.25)
    app = fake_slack.add_app()
    app.refuse_streaming = "unknown_method"  # a Slack without the streaming methods
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, app))

    await fake_slack.dm(app, "U0ALICE", "first")
    posts = await fake_slack.wait_posts(1, channel="DU0ALICE")
    assert not agent.done  # words shown before the end
    assert posts[0].thread_ts is None  # posted where the user wrote, like any answer
    await fake_slack.wait_for(lambda: agent.done, within=15)
    full = "".join(chunks)
    await fake_slack.wait_for(lambda: posts[0].text == split_message(markdown_to_mrkdwn(full))[0])
    assert posts[0].edits, "the posted message was edited as the answer grew"
    edit_times = [posts[0].at] + [t for t, _ in posts[0].edits]
    assert all(gap >= 0.9 for gap in gaps(edit_times[:-1])), gaps(edit_times)
    assert len(fake_slack.calls_of("chat.startStream")) == 1
    assert adapter_of(daemon, "acme").stream_refusal == "unknown_method"

    await fake_slack.dm(app, "U0ALICE", "second")
    await fake_slack.wait_posts(2, channel="DU0ALICE", within=15)
    await fake_slack.wait_for(lambda: len(agent.done) == 2, within=15)
    assert len(fake_slack.calls_of("chat.startStream")) == 1  # not tried again


async def test_rate_limited_append_and_update_are_retried_after_retry_after(
    fake_slack, slow_agent, make_gateway
):
    chunks = ["Slow ", "and ", *words(12)]
    agent = await slow_agent(chunks, pause=0.2)
    app = fake_slack.add_app()
    other = fake_slack.add_app("other", team_id="T0002")
    other.refuse_streaming = "not_allowed_token_type"
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, app),
                         slack_tenant("globex", agent.url, fake_slack, other))
    fake_slack.rate_limit("chat.appendStream", times=1, retry_after=1)
    fake_slack.rate_limit("chat.update", times=1, retry_after=1)

    await fake_slack.mention(app, "U0ALICE", "stream", channel="C0ACME")
    await fake_slack.dm(other, "U0BOB", "edit")
    full = "".join(chunks)
    streamed = await fake_slack.wait_for(
        lambda: [m for m in fake_slack.streams_in("C0ACME") if not m.streaming], within=20)
    assert streamed[0].text == full
    posted = await fake_slack.wait_posts(1, channel="DU0BOB")
    await fake_slack.wait_for(lambda: posted[0].text == split_message(markdown_to_mrkdwn(full))[0],
                              within=20)
    for method in ("chat.appendStream", "chat.update"):
        calls = fake_slack.calls_of(method)
        refused = next(c for c in calls if c.status == 429)
        retried = calls[calls.index(refused) + 1]
        assert retried.at - refused.at >= 0.95, method  # waited for Retry-After
        assert retried.status == 200 and retried.params == refused.params
    # not_allowed_token_type on a streaming method means "no streaming", not a dead token.
    assert adapter_of(daemon, "globex", "other").status.state.value == "connected"


async def test_long_answer_continues_in_a_new_message(fake_slack, slow_agent, make_gateway):
    paragraph = "This paragraph is about forty-odd words long and it repeats. " * 12
    chunks = [paragraph[i:i + 400] for i in range(0, len(paragraph), 400)] + ["\n\n"]
    chunks = chunks * 6  # ~4,400 characters: two messages of at most 3,900
    agent = await slow_agent(chunks, pause=0.05)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.mention(app, "U0ALICE", "long", channel="C0GENERAL")
    await fake_slack.wait_for(lambda: agent.done, within=20)
    full = "".join(chunks)
    expected = split_message(full)
    assert len(expected) == 2
    await fake_slack.wait_for(
        lambda: [m.text for m in fake_slack.streams_in("C0GENERAL")] == expected
        and not any(m.streaming for m in fake_slack.streams), within=15)
    assert all(len(m.text) <= 3900 for m in fake_slack.streams)
    thread = fake_slack.streams[0].thread_ts
    assert all(m.thread_ts == thread for m in fake_slack.streams)


async def test_broken_stream_ends_with_exactly_the_fallback_text(fake_slack, slow_agent,
                                                                make_gateway):
    agent = await slow_agent(["Partial ", "answer ", "that ", "breaks"],
                                  pause=0.3, error_after=3)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant(
        "acme", agent.url, fake_slack, app, agent={"fallback_text": "Sorry, try again."}))
    await fake_slack.mention(app, "U0ALICE", "break", channel="C0GENERAL")
    streamed = await fake_slack.wait_for(
        lambda: [m for m in fake_slack.streams if not m.streaming
                 and m.changes[-1][0] == "chat.update"], within=15)
    assert streamed[0].text == "Sorry, try again."
    assert [m for m, _, _ in streamed[0].changes][-2:] == ["chat.stopStream", "chat.update"]


async def test_assistant_thread_status_is_set_then_cleared(fake_slack, slow_agent,
                                                           make_gateway):
    agent = await slow_agent(["Thinking ", "done ", "now"], pause=0.3)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant(
        "acme", agent.url, fake_slack, app, assistant_status="is pondering…"))
    await fake_slack.dm(app, "U0ALICE", "question", thread_ts="1700000000.000100")
    await fake_slack.wait_for(lambda: len(fake_slack.statuses) == 2, within=15)
    shown, cleared = fake_slack.statuses
    assert (shown.channel_id, shown.thread_ts, shown.status) == (
        "DU0ALICE", "1700000000.000100", "is pondering…")
    assert cleared.status == "" and cleared.thread_ts == "1700000000.000100"
    message = (await fake_slack.wait_for(lambda: fake_slack.streams))[0]
    assert shown.at < message.changes[0][1] <= cleared.at  # cleared once words show
    await fake_slack.wait_for(lambda: not message.streaming)
    assert message.text == "Thinking done now"
    assert fake_slack.reactions == []  # the status replaces the reaction there


async def test_an_address_reaches_the_same_thread_later(fake_slack, make_agent, make_gateway):
    agent = await make_agent()
    app = fake_slack.add_app()
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, app))
    adapter = adapter_of(daemon, "acme")
    address = Address.from_dict(json.loads(json.dumps(Address(
        Platform.SLACK, "default",
        {"channel": "C0GENERAL", "thread_ts": "1700000000.000200", "user": "U0ALICE",
         "team": app.team_id},
    ).as_dict())))
    later = adapter.outbound(address)
    await later.post("An answer that came **later**.")
    posts = await fake_slack.wait_posts(1, channel="C0GENERAL")
    assert posts[0].thread_ts == "1700000000.000200"
    assert posts[0].text == "An answer that came *later*."
    streamed = adapter.outbound(address)
    await streamed.append("Streamed ")
    await streamed.append("later")
    await streamed.finish("Streamed later, in full.")
    message = fake_slack.streams[0]
    assert message.thread_ts == "1700000000.000200" and not message.streaming
    assert message.text == "Streamed later, in full."
    assert adapter.outbound(Address(Platform.SLACK, "someone-else", {"channel": "C1"})) is None


async def test_calls_for_a_2000_character_answer_streamed_over_10_seconds(
    fake_slack, slow_agent, make_gateway
):
    chunks = [f"{i:03d} words, then " for i in range(125)]  # 125 deltas x 16 chars, 80 ms apart
    assert len("".join(chunks)) == 2000
    agent = await slow_agent(chunks, pause=0.08)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.mention(app, "U0ALICE", "count", channel="C0GENERAL")
    streamed = await fake_slack.wait_for(
        lambda: [m for m in fake_slack.streams if not m.streaming], within=30)
    assert streamed[0].text == "".join(chunks)
    calls = [c for c in fake_slack.calls if c.method.startswith("chat.")]
    counts = {m: sum(c.method == m for c in calls) for m in STREAM_METHODS}
    print(f"\n2,000 characters over {agent.done[0] - calls[0].at:.1f} s: {len(calls)} "
          f"chat.* calls {counts}")
    assert counts["chat.startStream"] == 1 and counts["chat.stopStream"] == 1
    assert 5 <= counts["chat.appendStream"] <= 12  # about one a second, never one per delta


async def test_a_conversation_refusing_streams_falls_back_for_that_answer_only(
    fake_slack, slow_agent, make_gateway
):
    agent = await slow_agent(["Posted ", "then ", "edited"], pause=0.2)
    app = fake_slack.add_app()
    app.refuse_streaming_in["C0LOCKED"] = "channel_type_not_supported"
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, app))
    delivery = await fake_slack.mention(app, "U0ALICE", "here", channel="C0LOCKED")
    posts = await fake_slack.wait_posts(1, channel="C0LOCKED")
    await fake_slack.wait_for(lambda: posts[0].text == "Posted then edited")
    assert posts[0].thread_ts == delivery.envelope["payload"]["event"]["ts"]
    assert adapter_of(daemon, "acme").stream_refusal is None  # not the app's setting

    await fake_slack.mention(app, "U0ALICE", "there", channel="C0GENERAL")
    streamed = await fake_slack.wait_for(
        lambda: [m for m in fake_slack.streams_in("C0GENERAL") if not m.streaming])
    assert streamed[0].text == "Posted then edited"


@pytest.mark.parametrize("pause", [0.05, 1.0], ids=["fast-deltas", "slow-deltas"])
async def test_first_words_are_visible_soon_after_the_first_delta(
    fake_slack, slow_agent, make_gateway, pause
):
    agent = await slow_agent(["First ", "words ", "then more"], pause=pause)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    delays = []
    for n in range(3):
        await fake_slack.mention(app, "U0ALICE", f"question {n}", channel=f"C0{n}")
        message = (await fake_slack.wait_for(lambda n=n: fake_slack.streams_in(f"C0{n}")))[0]
        delays.append(message.changes[0][1] - agent.first[n])
        await fake_slack.wait_for(lambda message=message: not message.streaming, within=10)
    print(f"\nfirst delta -> first words in Slack ({pause} s between deltas): "
          + ", ".join(f"{d * 1000:.0f} ms" for d in delays))
    assert max(delays) <= 0.3


def test_a_stream_is_for_the_askers_workspace_in_a_shared_channel():
    from adapters.slack.convert import BotIdentity, Inbound, event_to_inbound
    from chatgateway.models import TenantId

    body = {"event_id": "Ev1", "team_id": "T0HOST", "event": {
        "type": "app_mention", "channel": "C0SHARED", "user": "U0GUEST", "ts": "1.000001",
        "text": "<@UBOT> hi", "team": "T0HOST", "user_team": "T0GUEST"}}
    inbound = event_to_inbound(TenantId("acme"), body, BotIdentity("UBOT"))
    assert isinstance(inbound, Inbound)
    assert inbound.target.team == "T0GUEST"
    del body["event"]["user_team"]
    inbound = event_to_inbound(TenantId("acme"), body, BotIdentity("UBOT"))
    assert isinstance(inbound, Inbound) and inbound.target.team == "T0HOST"


async def test_fallback_continues_a_long_answer_in_new_messages(fake_slack, slow_agent,
                                                                make_gateway):
    paragraph = "Words that go on and on, edited as they come in. " * 10
    chunks = [paragraph + "\n\n"] * 9  # ~4,500 characters: two messages
    agent = await slow_agent(chunks, pause=0.15)
    app = fake_slack.add_app()
    app.refuse_streaming = "missing_scope"
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.dm(app, "U0ALICE", "long please")
    expected = split_message(markdown_to_mrkdwn("".join(chunks)))
    assert len(expected) == 2
    await fake_slack.wait_for(
        lambda: [p.text for p in fake_slack.posts(channel="DU0ALICE")] == expected, within=20)
    first, second = fake_slack.posts(channel="DU0ALICE")
    assert first.edits and second.at > first.at  # grown by edits, then continued


async def test_a_slash_address_answers_later_in_its_channel(fake_slack, make_agent,
                                                            make_gateway):
    agent = await make_agent()
    app = fake_slack.add_app()
    daemon = await start(make_gateway, fake_slack, slack_tenant(
        "acme", agent.url, fake_slack, app, slash_command="/ask"))
    adapter = adapter_of(daemon, "acme")
    public = adapter.outbound(Address(Platform.SLACK, "default", {
        "channel": "C0GENERAL", "user": "U0ALICE", "command": True, "ephemeral": False}))
    await public.append("never streamed")
    await public.finish("The **answer**.")
    private = adapter.outbound(Address(Platform.SLACK, "default", {
        "channel": "C0GENERAL", "user": "U0ALICE", "command": True, "ephemeral": True}))
    await private.finish("Only for you.")
    posts = await fake_slack.wait_posts(2, channel="C0GENERAL")
    assert [(p.via, p.text, p.user) for p in posts] == [
        ("chat.postMessage", "The *answer*.", None),
        ("chat.postEphemeral", "Only for you.", "U0ALICE"),
    ]
    assert fake_slack.streams == []


async def test_a_refused_assistant_status_falls_back_to_the_reaction(fake_slack, slow_agent,
                                                                     make_gateway):
    agent = await slow_agent(["In ", "a ", "thread"], pause=0.2)
    app = fake_slack.add_app()
    app.refuse_status = "missing_scope"
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    delivery = await fake_slack.dm(app, "U0ALICE", "question", thread_ts="1700000000.000300")
    await fake_slack.wait_for(lambda: len(fake_slack.reactions) == 2, within=10)
    added, removed = fake_slack.reactions
    assert added.timestamp == delivery.envelope["payload"]["event"]["ts"]
    message = fake_slack.streams[0]
    assert added.at <= message.changes[0][1] and removed.at >= message.changes[-1][1]
    assert message.text == "In a thread" and fake_slack.statuses == []
    assert [c.error for c in fake_slack.calls_of("assistant.threads.setStatus")] == [
        "missing_scope"]
