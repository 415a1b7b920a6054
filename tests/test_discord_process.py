"""The real `chatgateway run` process with Discord bots pointed at the fake by configuration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.conftest import tenant
from tests.fakes.discord import FakeDiscord


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = await FakeDiscord().start()
    yield server
    await server.stop()


@pytest.mark.slow
async def test_daemon_process_parks_a_bad_bot_answers_with_the_good_one_and_dedups_after_restart(
    fake, make_agent, gateway_process
):
    agent = await make_agent()
    good, bad = fake.add_bot("goodbot"), fake.add_bot("badbot")
    bad.gateway_valid = False
    config = {"tenants": [
        tenant("alpha", agent.url, discord={"bots": [
            fake.bot_settings(bad, token={"env": "ALPHA_DISCORD_TOKEN"})]}),
        tenant("beta", agent.url, discord={"bots": [
            fake.bot_settings(good, token={"env": "BETA_DISCORD_TOKEN"})]}),
    ]}
    env = {"ALPHA_DISCORD_TOKEN": bad.token, "BETA_DISCORD_TOKEN": good.token}
    # The fake runs in this event loop: never block it while the process talks to it.
    proc = await asyncio.to_thread(gateway_process, config, env)
    parked = await asyncio.to_thread(proc.wait_for_event, "adapter_parked", 30.0,
                                     tenant_id="alpha")
    assert "4004" in parked["reason"]
    await fake.wait_ready(good, within=30)
    sent = await fake.message_create(good, "hello process", channel_id="2001")
    [post] = await fake.wait_posts(1, token=good.token, within=30)
    assert post.content == "agent: hello process"
    assert post.reference is not None and post.reference["message_id"] == sent["id"]
    assert len(fake.ops(2, bad.token)) == 1  # parked, no restart loop
    assert await asyncio.to_thread(proc.stop) == 0
    output = proc.output()
    assert good.token not in output and bad.token not in output

    # A restarted gateway (same SQLite file) does not answer the same message again.
    second = await asyncio.to_thread(gateway_process, config, env)
    await fake.wait_for(lambda: len(fake.ops(2, good.token)) == 2, within=30)
    await fake.wait_ready(good, within=30)
    await fake.redeliver(good, sent)
    await asyncio.to_thread(second.wait_for_event, "message_duplicate", 30.0)
    await fake.message_create(good, "after restart", channel_id="2001")
    posts = await fake.wait_posts(2, token=good.token, within=30)
    assert [p.content for p in posts] == ["agent: hello process", "agent: after restart"]
    assert agent.texts() == ["hello process", "after restart"]
    assert await asyncio.to_thread(second.stop) == 0
