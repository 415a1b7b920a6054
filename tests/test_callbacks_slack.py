"""A late answer (202, then the agent's callback) reaches the user's Slack thread: the real
slack-bolt in the gateway against the loopback fake Slack (tests/fakes/slack.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from chatgateway.testing.agent import FakeAgent
from tests.fakes.slack import FakeSlack
from tests.test_callbacks import accept_later, post_callback
from tests.test_slack_e2e import slack_tenant, start


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


async def test_a_late_answer_with_progress_reaches_the_thread_once(
    fake_slack, make_agent, make_gateway, http: aiohttp.ClientSession
):
    agent: FakeAgent = await make_agent(behaviour=accept_later)
    app = fake_slack.add_app()
    await start(make_gateway, fake_slack, slack_tenant("acme", agent.url, fake_slack, app))
    delivery = await fake_slack.mention(app, "U0ALICE", "audit the **books**",
                                        channel="C0GENERAL")
    user_ts = delivery.envelope["payload"]["event"]["ts"]
    callback = (await agent.wait_calls(1))[0].body["callback"]
    # The working indicator ends when the agent says it answers later; nothing is posted.
    await fake_slack.wait_for(lambda: len(fake_slack.reactions) == 2)
    await asyncio.sleep(0.3)
    assert fake_slack.posts() == [] and fake_slack.streams_in("C0GENERAL") == []

    status, body = await post_callback(http, callback["url"], callback["token"],
                                       {"text": "Checking Q1… ", "final": False})
    assert (status, body) == (200, {"progress": True})
    shown = await fake_slack.wait_for(lambda: fake_slack.streams_in("C0GENERAL")
                                      or fake_slack.posts(channel="C0GENERAL"))
    assert shown[0].thread_ts == user_ts and shown[0].text.startswith("Checking Q1")

    final = "The books balance. **No** findings."
    status, body = await post_callback(http, callback["url"], callback["token"], {"text": final})
    assert (status, body) == (200, {"delivered": True})
    status, body = await post_callback(http, callback["url"], callback["token"], {"text": final})
    assert (status, body) == (200, {"delivered": "already"})
    message = shown[0]
    await fake_slack.wait_for(lambda: not getattr(message, "streaming", False))
    assert message.text in (final, "The books balance. *No* findings.")
    # One message in the thread shows the answer: the progress became the answer, once.
    await asyncio.sleep(0.5)
    in_thread = [m for m in [*fake_slack.streams_in("C0GENERAL"),
                             *fake_slack.posts(channel="C0GENERAL")]
                 if m.thread_ts == user_ts]
    assert len(in_thread) == 1
