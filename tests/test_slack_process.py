"""The real daemon process (`python -m chatgateway run`) against the loopback fake Slack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.fakes.slack import FakeSlack
from tests.test_slack_e2e import slack_tenant


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


async def test_daemon_answers_and_drops_redelivery_after_restart(fake_slack, make_agent,
                                                                 gateway_process):
    agent = await make_agent()
    app = fake_slack.add_app()
    config = {"tenants": [slack_tenant("acme", agent.url, fake_slack, app)]}
    proc = await asyncio.to_thread(gateway_process, config)
    await asyncio.to_thread(proc.wait_for_event, "slack_connected", tenant_id="acme")
    delivery = await fake_slack.dm(app, "U0ALICE", "hello process")
    posts = await fake_slack.wait_posts(1, within=20)
    assert posts[0].text == "agent: hello process"
    assert posts[0].token == app.bot_token
    assert await asyncio.to_thread(proc.stop) == 0

    again = await asyncio.to_thread(gateway_process, config)  # same SQLite file
    await fake_slack.wait_connected(app, count=2, within=30)
    retry = await fake_slack.redeliver(delivery, same_envelope=False)
    await fake_slack.wait_ack(retry)
    await fake_slack.dm(app, "U0ALICE", "second")
    await fake_slack.wait_posts(2, within=20)
    assert agent.texts() == ["hello process", "second"]
    assert [p.text for p in fake_slack.posts()] == ["agent: hello process", "agent: second"]
    await asyncio.to_thread(again.wait_for_event, "message_duplicate")
    assert await asyncio.to_thread(again.stop) == 0
    output = proc.output() + again.output()
    assert app.bot_token not in output and app.app_token not in output


async def test_retry_of_a_message_a_crashed_gateway_never_finished_is_processed(
    fake_slack, make_agent, gateway_process
):
    agent = await make_agent(delay=2.0)
    app = fake_slack.add_app()
    config = {"tenants": [slack_tenant("acme", agent.url, fake_slack, app)]}
    proc = await asyncio.to_thread(gateway_process, config)
    await fake_slack.wait_connected(app, within=30)
    delivery = await fake_slack.dm(app, "U0ALICE", "answer me despite the crash")
    await agent.wait_calls(1)
    await asyncio.to_thread(proc.kill)  # SIGKILL while the agent is still working

    await asyncio.to_thread(gateway_process, config)
    await fake_slack.wait_connected(app, count=2, within=30)
    await fake_slack.redeliver(delivery, same_envelope=False)
    posts = await fake_slack.wait_posts(1, within=30)
    assert posts[0].text == "agent: answer me despite the crash"
    assert len(agent.calls) == 2  # the first call's answer died with the first process
    await asyncio.sleep(0.5)
    assert len(fake_slack.posts()) == 1
