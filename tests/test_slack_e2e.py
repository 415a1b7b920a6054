"""End to end: the real slack-bolt inside the gateway against the loopback fake Slack."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from adapters.slack.adapter import BUSY_TEXT
from adapters.slack.convert import markdown_to_mrkdwn, split_message
from chatgateway.adapter import AdapterState
from chatgateway.daemon import Daemon
from chatgateway.testing.agent import AgentCall
from tests.conftest import tenant, write_config
from tests.fakes.slack import FakeApp, FakeSlack


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


def slack_tenant(tenant_id: str, agent_url: str | None, fake: FakeSlack, *apps: FakeApp,
                 agent: dict[str, Any] | None = None, **app_settings: Any) -> dict[str, Any]:
    """A tenant whose Slack apps point at the fake (1 s pings keep fault tests short)."""
    app_settings.setdefault("ping_interval", 1.0)
    return tenant(tenant_id, agent_url, agent=agent or {},
                  slack={"apps": [a.config(fake, **app_settings) for a in apps]})


def adapter_of(daemon: Daemon, tenant_id: str, name: str = "default") -> Any:
    assert daemon.supervisor is not None
    for adapter in daemon.supervisor.adapters():
        if adapter.status.tenant_id == tenant_id and adapter.status.name == name:
            return adapter
    raise AssertionError(f"no adapter {tenant_id}/{name}")


async def wait_until(predicate: Any, within: float = 10.0) -> None:
    """Poll a condition of the gateway's own state (the fake notifies; adapters do not)."""
    deadline = time.monotonic() + within
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.05)


async def start(make_gateway: Any, fake: FakeSlack, *tenants: dict[str, Any],
                **config: Any) -> Daemon:
    daemon = await make_gateway({"tenants": list(tenants), **config})
    for app in fake.apps:
        if any(a["bot_token"]["value"] == app.bot_token
               for t in tenants for a in t.get("slack", {}).get("apps", [])):
            await fake.wait_connected(app)
    return daemon


# Conversations ------------------------------------------------------------------------------


async def test_dm_round_trip_with_working_reaction(fake_slack, make_agent, make_gateway):
    agent = await make_agent(delay=0.3)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))

    delivery = await fake_slack.dm(app, "U0ALICE", "hello *there* &amp; you")
    await fake_slack.wait_ack(delivery)
    posts = await fake_slack.wait_posts(1, channel="DU0ALICE")

    assert posts[0].text == "agent: hello _there_ &amp; you"  # Markdown -> mrkdwn, escaped
    assert posts[0].token == app.bot_token
    assert posts[0].thread_ts is None
    body = agent.calls[0].body
    assert body["tenant"] == "acme"
    assert body["platform"] == "slack"
    assert body["message"]["text"] == "hello *there* & you"
    assert body["message"]["id"] == delivery.envelope["payload"]["event_id"]
    assert body["conversation"] == {"id": "DU0ALICE", "type": "dm", "threadId": None}
    assert body["user"] == {"id": "U0ALICE", "name": "U0Alice Display"}
    assert body["metadata"]["slack"]["channel"] == "DU0ALICE"
    # The working indicator: added on the user's message before the answer, removed after.
    await fake_slack.wait_for(lambda: len(fake_slack.reactions) == 2)
    added, removed = fake_slack.reactions
    user_ts = delivery.envelope["payload"]["event"]["ts"]
    assert (added.action, added.timestamp, added.name) == ("add", user_ts, "hourglass_flowing_sand")
    assert (removed.action, removed.timestamp) == ("remove", user_ts)
    assert added.at < posts[0].at <= removed.at
    # Slack echoes the bot's own reply as a message.im event: acked, never sent to the agent.
    echo = await fake_slack.wait_for(
        lambda: [d for d in fake_slack.deliveries
                 if d.envelope["payload"].get("event", {}).get("user") == app.bot_user_id])
    await fake_slack.wait_ack(echo[0])
    assert len(agent.calls) == 1


async def test_dm_conversation_is_one_session(fake_slack, make_agent, make_gateway):
    agent = await make_agent()
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.dm(app, "U0ALICE", "first")
    await fake_slack.wait_posts(1)
    await fake_slack.dm(app, "U0ALICE", "second", thread_ts="123.000001")
    posts = await fake_slack.wait_posts(2)
    first, second = (c.body for c in await agent.wait_calls(2))
    assert first["sessionId"] == second["sessionId"]
    assert [t["text"] for t in second["history"]] == ["first", "agent: first"]
    assert posts[1].thread_ts == "123.000001"  # answered where the user wrote


async def test_mention_answered_in_thread_and_follow_up_keeps_session(
    fake_slack, make_agent, make_gateway
):
    agent = await make_agent()
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))

    first = await fake_slack.mention(app, "U0ALICE", "what is 2+2?", channel="C0GENERAL")
    root_ts = first.envelope["payload"]["event"]["ts"]
    posts = await fake_slack.wait_posts(1, channel="C0GENERAL")
    assert posts[0].thread_ts == root_ts
    assert posts[0].text == "agent: what is 2+2?"  # the bot's mention is stripped

    await fake_slack.mention(app, "U0ALICE", "and times 3?", channel="C0GENERAL",
                             thread_ts=root_ts)
    posts = await fake_slack.wait_posts(2, channel="C0GENERAL")
    assert posts[1].thread_ts == root_ts
    one, two = (c.body for c in await agent.wait_calls(2))
    assert one["conversation"] == {"id": "C0GENERAL", "type": "channel", "threadId": root_ts}
    assert two["conversation"]["threadId"] == root_ts
    assert one["sessionId"] == two["sessionId"]
    assert [t["text"] for t in two["history"]] == ["what is 2+2?", "agent: what is 2+2?"]

    # A new top-level mention starts a new thread and a new session.
    await fake_slack.mention(app, "U0ALICE", "new topic", channel="C0GENERAL")
    await fake_slack.wait_posts(3, channel="C0GENERAL")
    three = (await agent.wait_calls(3))[2].body
    assert three["sessionId"] != one["sessionId"]


async def test_slash_command_acked_at_once_and_answered(fake_slack, make_agent, make_gateway):
    agent = await make_agent(delay=1.0)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack,
                slack_tenant("acme", agent.url, fake_slack, app, slash_command="/ask"))

    delivery = await fake_slack.slash(app, "/ask", "what is **up**?", user="U0BOB")
    await fake_slack.wait_ack(delivery, within=1.0)
    assert delivery.ack is not None
    assert delivery.ack["payload"]["response_type"] == "ephemeral"
    assert "Working on it" in delivery.ack["payload"]["text"]
    posts = await fake_slack.wait_posts(1, via="response_url")
    assert posts[0].text == "agent: what is *up*?"
    assert posts[0].response_type == "in_channel"
    body = agent.calls[0].body
    assert body["message"]["text"] == "what is **up**?"
    assert body["message"]["id"] == "command:" + delivery.envelope["payload"]["trigger_id"]
    assert body["conversation"]["id"] == "C0GENERAL"

    # Another command is acked too, but never reaches the agent.
    other = await fake_slack.slash(app, "/other", "hi")
    await fake_slack.wait_ack(other)
    empty = await fake_slack.slash(app, "/ask", "  ")
    await fake_slack.wait_ack(empty)
    assert "Usage" in empty.ack["payload"]["text"]
    assert len(agent.calls) == 1


async def test_agent_failure_sends_fallback_text(fake_slack, make_agent, make_gateway):
    agent = await make_agent(status=500)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant(
        "acme", agent.url, fake_slack, app,
        agent={"fallback_text": "Sorry, *busy*.", "retry": {"attempts": 1}}))
    await fake_slack.dm(app, "U0ALICE", "hi")
    posts = await fake_slack.wait_posts(1)
    assert posts[0].text == "Sorry, _busy_."


async def test_flood_beyond_the_tenants_limit_gets_a_try_again_answer(fake_slack, make_agent,
                                                                     make_gateway):
    agent = await make_agent(delay=1.0)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant(
        "acme", agent.url, fake_slack, app, agent={"max_concurrency": 1, "max_queue": 0}))
    await fake_slack.dm(app, "U0001", "first")
    await agent.wait_calls(1)
    await fake_slack.dm(app, "U0002", "second")
    posts = await fake_slack.wait_posts(2, within=10)
    by_channel = {p.channel: p.text for p in posts}
    assert by_channel == {"DU0001": "agent: first", "DU0002": BUSY_TEXT}
    assert agent.texts() == ["first"]


# What never reaches the agent ---------------------------------------------------------------


async def test_own_and_bot_messages_edits_and_joins_are_acked_but_ignored(
    fake_slack, make_agent, make_gateway
):
    agent = await make_agent()
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    bot = app.bot_user_id
    ts = fake_slack.new_ts()
    events = [
        {"type": "message", "channel_type": "im", "channel": "DU1", "user": bot,
         "bot_id": app.bot_id, "text": "my own reply", "ts": fake_slack.new_ts()},
        {"type": "message", "channel_type": "im", "channel": "DU1", "user": bot,
         "text": "own, without bot_id", "ts": fake_slack.new_ts()},
        {"type": "message", "subtype": "bot_message", "channel_type": "im", "channel": "DU1",
         "bot_id": "BOTHER", "text": "another bot", "ts": fake_slack.new_ts()},
        {"type": "message", "channel_type": "im", "channel": "DU1", "user": "UOTHERBOT",
         "bot_id": "BOTHER", "text": "another bot with a user", "ts": fake_slack.new_ts()},
        {"type": "app_mention", "channel": "C1", "user": "UOTHERBOT", "bot_id": "BOTHER",
         "text": f"<@{bot}> bots talking", "ts": fake_slack.new_ts()},
        {"type": "message", "subtype": "message_changed", "channel_type": "im", "channel": "DU1",
         "message": {"type": "message", "user": "U1", "text": "edited", "ts": ts},
         "previous_message": {"type": "message", "user": "U1", "text": "orig", "ts": ts},
         "ts": fake_slack.new_ts()},
        {"type": "message", "subtype": "message_deleted", "channel_type": "im", "channel": "DU1",
         "deleted_ts": ts, "ts": fake_slack.new_ts()},
        {"type": "message", "subtype": "channel_join", "channel_type": "channel",
         "channel": "C1", "user": "U1", "text": "<@U1> has joined", "ts": fake_slack.new_ts()},
        {"type": "member_joined_channel", "channel": "C1", "user": "U1", "channel_type": "C"},
        {"type": "message", "channel_type": "channel", "channel": "C1", "user": "U1",
         "text": "chatter without a mention", "ts": fake_slack.new_ts()},
        {"type": "reaction_added", "user": "U1", "reaction": "thumbsup",
         "item": {"type": "message", "channel": "C1", "ts": ts}},
        {"type": "app_home_opened", "user": "U1", "channel": "DU1", "tab": "home"},
    ]
    deliveries = [await fake_slack.send_event(app, dict(e)) for e in events]
    interactive = await fake_slack.deliver(app, {
        "envelope_id": "env-interactive-1", "type": "interactive",
        "accepts_response_payload": False,
        "payload": {"type": "block_actions", "user": {"id": "U1"}, "actions": [
            {"action_id": "a1", "block_id": "b1", "type": "button", "value": "v"}]}})
    for delivery in [*deliveries, interactive]:
        await fake_slack.wait_ack(delivery)
    real = await fake_slack.dm(app, "U0ALICE", "the only real one")
    await fake_slack.wait_posts(1, channel="DU0ALICE")
    await fake_slack.wait_ack(real)
    assert agent.texts() == ["the only real one"]
    # Nothing was redelivered: every envelope was acked the first time.
    assert all(d.envelope.get("retry_attempt", 0) == 0 for d in fake_slack.deliveries)


# Exactly once ------------------------------------------------------------------------------


async def test_same_envelope_twice_one_agent_call_one_reply(fake_slack, make_agent,
                                                            make_gateway):
    agent = await make_agent(delay=0.5)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))

    first = await fake_slack.dm(app, "U0ALICE", "once please")
    again_in_flight = await fake_slack.redeliver(first)  # while the agent works
    await fake_slack.wait_posts(1, channel="DU0ALICE")
    retry_after_done = await fake_slack.redeliver(first, same_envelope=False)  # Slack's retry
    again_done = await fake_slack.redeliver(first)
    for delivery in (first, again_in_flight, retry_after_done, again_done):
        await fake_slack.wait_ack(delivery)
    # Give a wrongly processed duplicate every chance to show up.
    await asyncio.sleep(1.0)
    assert len(agent.calls) == 1
    assert len(fake_slack.posts(channel="DU0ALICE")) == 1
    assert len([r for r in fake_slack.reactions if r.action == "add"]) == 1


async def test_redelivery_after_gateway_restart_is_dropped(fake_slack, make_agent,
                                                           make_gateway):
    agent = await make_agent()
    app = fake_slack.add_app()
    config = slack_tenant("acme", agent.url, fake_slack, app)
    first_gateway = await start(make_gateway, fake_slack, config)
    delivery = await fake_slack.dm(app, "U0ALICE", "remember me")
    await fake_slack.wait_posts(1)
    await first_gateway.stop()

    await start(make_gateway, fake_slack, config)  # same SQLite file
    await fake_slack.wait_connected(app, count=2)
    retry = await fake_slack.redeliver(delivery, same_envelope=False)
    await fake_slack.wait_ack(retry)
    unseen = await fake_slack.dm(app, "U0ALICE", "new message")
    await fake_slack.wait_posts(2)
    await fake_slack.wait_ack(unseen)
    assert agent.texts() == ["remember me", "new message"]
    assert len(fake_slack.posts()) == 2


# Faults -----------------------------------------------------------------------------------


async def test_refresh_requested_mid_conversation_loses_nothing(fake_slack, make_agent,
                                                               make_gateway):
    agent = await make_agent(delay=0.5)
    app = fake_slack.add_app()
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.dm(app, "U0ALICE", "before")
    await agent.wait_calls(1)
    await fake_slack.refresh(app, close_after=2.0)  # while the agent is answering
    during = await fake_slack.dm(app, "U0ALICE", "during")
    await fake_slack.wait_connected(app, count=2)
    after = await fake_slack.dm(app, "U0ALICE", "after")
    await fake_slack.wait_posts(3, within=20)
    for delivery in (during, after):
        await fake_slack.wait_for(
            lambda d=delivery: any(x.acked_at for x in fake_slack.deliveries_of(
                d.envelope["payload"]["event_id"])), within=15)
    assert agent.texts() == ["before", "during", "after"]
    assert [p.text for p in fake_slack.posts()] == [
        "agent: before", "agent: during", "agent: after"]

    # A socket closed by the server reconnects too.
    await fake_slack.drop(app)
    await fake_slack.wait_connected(app, count=3)
    await fake_slack.dm(app, "U0ALICE", "after the drop")
    await fake_slack.wait_posts(4, within=20)
    assert agent.texts()[-1] == "after the drop"
    assert adapter_of(daemon, "acme").status.state == AdapterState.CONNECTED


async def test_rate_limited_reaction_does_not_delay_the_answer(fake_slack, make_agent,
                                                              make_gateway):
    agent = await make_agent()
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    fake_slack.rate_limit("reactions.add", times=1, retry_after=30)
    delivery = await fake_slack.dm(app, "U0ALICE", "quick one")
    posts = await fake_slack.wait_posts(1, within=5)
    assert posts[0].text == "agent: quick one"
    assert posts[0].at - delivery.sent_at < 3
    # The indicator is given up, not retried after Retry-After, and nothing is removed.
    await asyncio.sleep(0.5)
    assert [c.method for c in fake_slack.calls if c.method.startswith("reactions.")] == [
        "reactions.add"]
    assert fake_slack.reactions == []


async def test_rate_limited_reply_is_sent_after_retry_after(fake_slack, make_agent,
                                                            make_gateway):
    agent = await make_agent()
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    fake_slack.rate_limit("chat.postMessage", times=1, retry_after=1)
    await fake_slack.dm(app, "U0ALICE", "are you there?")
    posts = await fake_slack.wait_posts(1, within=15)
    limited = [c for c in fake_slack.calls if c.status == 429]
    assert len(limited) == 1 and limited[0].method == "chat.postMessage"
    assert posts[0].at - limited[0].at >= 1.0  # waited for Retry-After
    assert posts[0].text == "agent: are you there?"
    await asyncio.sleep(0.5)
    assert len(fake_slack.posts()) == 1


@pytest.mark.parametrize(
    "agent_delay", [5.0, pytest.param(30.0, marks=pytest.mark.slow)], ids=["5s", "30s"]
)
async def test_acks_within_a_second_while_the_agent_is_slow(fake_slack, make_agent,
                                                            make_gateway, agent_delay):
    agent = await make_agent(delay=agent_delay)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant(
        "acme", agent.url, fake_slack, app, agent={"timeout": agent_delay + 30},
        slash_command="/ask"))
    deliveries = []
    for i in range(12):
        deliveries.append(await fake_slack.dm(app, f"U{i:04d}", f"question {i}"))
        deliveries.append(await fake_slack.mention(app, f"U{i:04d}", f"mention {i}"))
    deliveries.append(await fake_slack.slash(app, "/ask", "slow one"))
    for delivery in deliveries:
        await fake_slack.wait_ack(delivery, within=5)
    latencies = sorted(d.ack_latency for d in deliveries)
    assert latencies[-1] < 1.0, latencies
    assert fake_slack.posted == []  # every ack came while the agent was still working
    await fake_slack.wait_posts(len(deliveries), within=agent_delay + 30)
    assert all(d.envelope.get("retry_attempt", 0) == 0 for d in fake_slack.deliveries)


async def test_invalid_token_parks_that_tenant_only(fake_slack, make_agent, make_gateway):
    agent_a, agent_b = await make_agent(prefix="A: "), await make_agent(prefix="B: ")
    app_a, app_b, app_c = fake_slack.add_app("a"), fake_slack.add_app("b"), fake_slack.add_app("c")
    bad_bot = slack_tenant("tenant-a", agent_a.url, fake_slack, app_a)
    bad_bot["slack"]["apps"][0]["bot_token"] = {"value": "xoxb-not-a-real-token"}
    bad_app = slack_tenant("tenant-c", agent_a.url, fake_slack, app_c)
    bad_app["slack"]["apps"][0]["app_token"] = {"value": "xapp-not-a-real-token"}
    good = slack_tenant("tenant-b", agent_b.url, fake_slack, app_b)
    daemon = await make_gateway({"tenants": [bad_bot, good, bad_app]})
    await fake_slack.wait_connected(app_b)

    await fake_slack.dm(app_b, "U0ALICE", "hi b")
    posts = await fake_slack.wait_posts(1)
    assert posts[0].text == "B: hi b" and posts[0].token == app_b.bot_token

    a, c = adapter_of(daemon, "tenant-a", "a"), adapter_of(daemon, "tenant-c", "c")
    await wait_until(lambda: a.status.state == AdapterState.PARKED
                     and c.status.state == AdapterState.PARKED)
    assert "invalid_auth" in a.status.last_error and "bot_token" in a.status.last_error
    assert "invalid_auth" in c.status.last_error and "app_token" in c.status.last_error
    assert not a.alive()
    statuses = {s.tenant_id: s.as_dict() for s in daemon.supervisor.statuses()}
    assert statuses["tenant-a"]["state"] == "parked"
    assert statuses["tenant-b"]["state"] == "connected"
    # Parked means parked: no retry loop against Slack.
    await asyncio.sleep(2.5)
    assert len([c for c in fake_slack.calls if c.token == "xoxb-not-a-real-token"]) == 1
    assert len([c for c in fake_slack.calls if c.token == "xapp-not-a-real-token"]) == 1
    assert app_a.connections_opened == 0 and app_c.connections_opened == 0
    assert agent_a.calls == []


async def test_two_tenants_answer_with_their_own_token_and_agent(fake_slack, make_agent,
                                                                 make_gateway):
    agent_a, agent_b = await make_agent(prefix="A: "), await make_agent(prefix="B: ")
    app_a = fake_slack.add_app("a", team_id="T0AAA", bot_user_id="UBOTA")
    app_b = fake_slack.add_app("b", team_id="T0BBB", bot_user_id="UBOTB")
    await start(make_gateway, fake_slack,
                slack_tenant("tenant-a", agent_a.url, fake_slack, app_a),
                slack_tenant("tenant-b", agent_b.url, fake_slack, app_b))
    await fake_slack.dm(app_a, "U0ALICE", "to a", channel="DA")
    await fake_slack.mention(app_b, "U0ALICE", "to b", channel="CB")
    await fake_slack.wait_posts(2)
    by_channel = {p.channel: p for p in fake_slack.posts()}
    assert by_channel["DA"].text == "A: to a" and by_channel["DA"].token == app_a.bot_token
    assert by_channel["CB"].text == "B: to b" and by_channel["CB"].token == app_b.bot_token
    assert agent_a.texts() == ["to a"] and agent_b.texts() == ["to b"]
    assert agent_a.calls[0].body["tenant"] == "tenant-a"
    assert agent_b.calls[0].body["tenant"] == "tenant-b"
    reactions = {(r.channel, r.token) for r in fake_slack.reactions}
    assert reactions == {("DA", app_a.bot_token), ("CB", app_b.bot_token)}


async def test_two_apps_of_one_tenant_run_side_by_side(fake_slack, make_agent, make_gateway):
    agent = await make_agent()
    one = fake_slack.add_app("one", team_id="T0ONE", bot_user_id="UBOTONE")
    two = fake_slack.add_app("two", team_id="T0TWO", bot_user_id="UBOTTWO")
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, one, two))
    await fake_slack.dm(one, "U0ALICE", "to one", channel="DONE")
    await fake_slack.dm(two, "U0ALICE", "to two", channel="DTWO")
    await fake_slack.wait_posts(2)
    by_channel = {p.channel: p for p in fake_slack.posts()}
    assert by_channel["DONE"].text == "agent: to one"
    assert by_channel["DONE"].token == one.bot_token
    assert by_channel["DTWO"].text == "agent: to two"
    assert by_channel["DTWO"].token == two.bot_token
    assert sorted(agent.texts()) == ["to one", "to two"]
    assert {c.body["tenant"] for c in agent.calls} == {"acme"}
    assert {c.body["metadata"]["slack"]["app"] for c in agent.calls} == {"one", "two"}
    for name in ("one", "two"):
        assert adapter_of(daemon, "acme", name).status.state == AdapterState.CONNECTED


async def test_long_reply_with_code_block_is_split(fake_slack, make_agent, make_gateway):
    code = "\n".join(f"    print('line {i:03d}')  # {'x' * 30}" for i in range(40))
    long_text = ("Intro **paragraph** " * 120 + "\n\n```python\n" + code + "\n```\n\n"
                 + "Outro _words_ here. " * 220)
    assert len(long_text) > 9000

    async def answer(call: AgentCall) -> web.StreamResponse:
        return web.json_response({"response": long_text})

    agent = await make_agent(behaviour=answer)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    delivery = await fake_slack.mention(app, "U0ALICE", "write a lot")
    root = delivery.envelope["payload"]["event"]["ts"]
    expected = split_message(markdown_to_mrkdwn(long_text))
    assert len(expected) >= 3
    await fake_slack.wait_posts(len(expected), channel="C0GENERAL")
    await asyncio.sleep(0.3)
    posts = fake_slack.posts(channel="C0GENERAL")
    assert [p.text for p in posts] == expected  # all parts, in order
    assert all(len(p.text) <= 3900 for p in posts)
    assert all(p.thread_ts == root for p in posts)
    assert all(p.text.count("```") % 2 == 0 for p in posts)
    with_code = [p for p in posts if "```" in p.text]
    assert len(with_code) == 1  # the block fits in one message, so it was not cut
    assert "print('line 000')" in with_code[0].text and "print('line 039')" in with_code[0].text
    joined = "\n".join(p.text for p in posts)
    assert joined.count("Intro *paragraph*") == 120
    assert joined.count("Outro _words_ here.") == 220


# The socket watchdog -----------------------------------------------------------------------


async def test_silently_dead_socket_is_replaced(fake_slack, make_agent, make_gateway):
    agent = await make_agent()
    app = fake_slack.add_app()
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, app))
    adapter = adapter_of(daemon, "acme")
    await fake_slack.go_silent(app)
    died = time.monotonic()
    lost = await fake_slack.dm(app, "U0ALICE", "sent into the void")
    await fake_slack.wait_connected(app, count=2, within=30)
    assert time.monotonic() - died < 30
    await wait_until(adapter.alive, within=10)
    fresh = await fake_slack.dm(app, "U0ALICE", "after recovery")
    await fake_slack.wait_ack(fresh)
    # The envelope written into the dead socket was redelivered by Slack and answered once.
    await fake_slack.wait_posts(2, within=20)
    assert sorted(agent.texts()) == ["after recovery", "sent into the void"]
    assert any(d.acked_at for d in fake_slack.deliveries_of(
        lost.envelope["payload"]["event_id"]))


async def test_wedged_socket_client_is_recreated(fake_slack, make_agent, make_gateway):
    """python-slack-sdk #1913/#1922: the client's loops die on a closed session while the
    websocket still looks open; nothing inside the SDK recovers from that."""
    agent = await make_agent()
    app = fake_slack.add_app()
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, app, ping_interval=2.0))
    adapter = adapter_of(daemon, "acme")
    assert adapter.alive()
    client = adapter._handler.client
    await client.aiohttp_client_session.close()
    client.message_receiver.cancel()
    client.current_session_monitor.cancel()
    wedged = time.monotonic()
    await wait_until(lambda: not adapter.alive(), within=5)
    await fake_slack.wait_connected(app, count=2, within=30)
    assert time.monotonic() - wedged < 30
    assert adapter.status.reconnects == 1
    assert "socket replaced" in (adapter.status.last_error or "")
    await wait_until(adapter.alive, within=10)
    await fake_slack.dm(app, "U0ALICE", "still there?")
    posts = await fake_slack.wait_posts(1)
    assert posts[0].text == "agent: still there?"


async def test_status_reports_connection_and_last_event(fake_slack, make_agent, make_gateway):
    agent = await make_agent()
    app = fake_slack.add_app("support")
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, app))
    adapter = adapter_of(daemon, "acme", "support")
    status = adapter.status.as_dict()
    assert status["state"] == "connected" and status["name"] == "support"
    assert status["connectedAt"] is not None and status["lastEventAt"] is None
    before = time.time()
    await fake_slack.dm(app, "U0ALICE", "hi")
    await fake_slack.wait_posts(1)
    assert adapter.status.last_event_at >= before


# Lifecycle ----------------------------------------------------------------------------------


async def test_envelope_arriving_during_shutdown_is_left_for_redelivery(
    fake_slack, make_agent, make_gateway
):
    agent = await make_agent(delay=1.5)
    app = fake_slack.add_app()
    config = slack_tenant("acme", agent.url, fake_slack, app)
    first = await start(make_gateway, fake_slack, config)
    await fake_slack.dm(app, "U0ALICE", "in flight at shutdown")
    await agent.wait_calls(1)
    stopping = asyncio.create_task(first.stop())
    await wait_until(lambda: not first.pipeline.accepting)
    late = await fake_slack.dm(app, "U0ALICE", "arrives while draining")
    await stopping
    assert late.acked_at is None  # not acked, so not lost: Slack redelivers it
    assert [p.text for p in fake_slack.posts()] == ["agent: in flight at shutdown"]

    await start(make_gateway, fake_slack, config)  # same SQLite file
    await fake_slack.wait_posts(2, within=20)  # the fake's own redelivery after 3 s
    assert agent.texts() == ["in flight at shutdown", "arrives while draining"]


async def test_acked_messages_queued_behind_the_agent_are_answered_at_shutdown(
    fake_slack, make_agent, make_gateway
):
    agent = await make_agent(delay=1.0)
    app = fake_slack.add_app()
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.dm(app, "U0ALICE", "first")
    await agent.wait_calls(1)
    # Same session: acked, then queued in the adapter behind the first, outside the pipeline.
    second = await fake_slack.dm(app, "U0ALICE", "second")
    await fake_slack.wait_ack(second)
    assert daemon.pipeline.active == 2
    await daemon.stop()
    assert agent.texts() == ["first", "second"]
    assert [p.text for p in fake_slack.posts()] == ["agent: first", "agent: second"]
    assert all(d.acked_at is not None for d in fake_slack.deliveries
               if d.envelope["payload"]["event"].get("user") == "U0ALICE")


async def test_reload_while_the_agent_works_still_answers(fake_slack, make_agent,
                                                          make_gateway, tmp_path):
    agent = await make_agent(delay=1.5)
    app = fake_slack.add_app()
    daemon = await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    await fake_slack.dm(app, "U0ALICE", "across a reload")
    await agent.wait_calls(1)
    changed = slack_tenant("acme", agent.url, fake_slack, app, working_indicator="none")
    write_config(tmp_path, {"tenants": [changed]}, daemon.config_path.name)
    assert (await daemon.reload()).changes == ["changed acme"]
    await fake_slack.wait_connected(app, count=2)
    posts = await fake_slack.wait_posts(1, within=10)
    assert posts[0].text == "agent: across a reload"
    await fake_slack.dm(app, "U0ALICE", "after the reload")
    await fake_slack.wait_posts(2)
    assert len(fake_slack.posts()) == 2
    assert len(fake_slack.reactions) == 2  # the new settings: no reaction for the second
    assert agent.texts() == ["across a reload", "after the reload"]


async def test_credentials_refused_mid_run_park_the_adapter(fake_slack, make_agent,
                                                            make_gateway):
    agent = await make_agent()
    app_token_app, uninstalled = fake_slack.add_app("one"), fake_slack.add_app("two")
    daemon = await start(make_gateway, fake_slack,
                         slack_tenant("acme", agent.url, fake_slack, app_token_app),
                         slack_tenant("other", agent.url, fake_slack, uninstalled))
    one, two = adapter_of(daemon, "acme", "one"), adapter_of(daemon, "other", "two")

    fake_slack.revoke(app_token_app.app_token)
    await fake_slack.drop(app_token_app)  # the reconnect finds the token refused
    await fake_slack.send_event(uninstalled, {"type": "app_uninstalled"})
    await wait_until(lambda: one.status.state == AdapterState.PARKED
                     and two.status.state == AdapterState.PARKED, within=20)
    assert "app_token" in one.status.last_error and "invalid_auth" in one.status.last_error
    assert "uninstalled" in two.status.last_error
    # Parked until a reload replaces it: its HTTP session and sockets are closed meanwhile.
    for adapter in (one, two):
        await wait_until(lambda a=adapter: not a._closing)
        assert adapter._session is None and adapter._handler is None
    assert not app_token_app.sockets and not uninstalled.sockets


async def test_refused_bot_token_at_start_closes_the_parked_adapters_session(
    fake_slack, make_agent, make_gateway
):
    agent = await make_agent()
    app = fake_slack.add_app()
    config = slack_tenant("acme", agent.url, fake_slack, app)
    config["slack"]["apps"][0]["bot_token"] = {"value": "xoxb-not-a-real-token"}
    daemon = await make_gateway({"tenants": [config]})
    adapter = adapter_of(daemon, "acme")
    await wait_until(lambda: adapter.status.state == AdapterState.PARKED)
    assert adapter._session is None
