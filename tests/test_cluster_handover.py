"""`systemctl stop` of a Discord bot's owner while it answers: two real `chatgateway run` processes
on one PostgreSQL database and the fake Discord.

The owner hands the bot over as soon as its drain begins (not after it): another instance is
connected while the owner's answer is still with the agent; that answer is posted once (the new
owner gets the message replayed, waits for the session's lock, finds it answered and re-posts it
with the same nonce, which Discord shows once), and messages sent meanwhile are answered by the new
owner.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from tests.conftest import tenant
from tests.test_cluster_discord import (  # noqa: F401  (fixtures)
    connections,
    dsn,
    fake,
    replies,
    wait_owner,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: How long the agent takes with the answer in flight at the SIGTERM.
SLOW = 5.0


async def test_sigterm_hands_the_bot_over_at_drain_start_and_finishes_the_answer_in_flight(
    fake, make_agent, gateway_process, dsn  # noqa: F811
):
    agent = await make_agent(delay=0.2)
    bot = fake.add_bot("drainbot")
    config: dict[str, Any] = {
        "storage": {"backend": "postgres", "dsn": {"value": dsn}},
        "cluster": {"coordination": "postgres"},
        "tenants": [tenant("acme", agent.url, discord={"bots": [fake.bot_settings(bot)]})],
    }
    procs = [await asyncio.to_thread(gateway_process, config) for _ in range(2)]
    owner = await wait_owner(fake, bot, procs, within=30)
    other = next(p for p in procs if p is not owner)
    await asyncio.to_thread(other.wait_for_event, "adapter_standby", 30.0)
    warm = await fake.message_create(bot, "before the stop")
    await fake.wait_for(lambda: replies(fake, bot)[warm["id"]] == 1, within=20)

    agent.delay = SLOW
    in_flight = await fake.message_create(bot, "in flight at the stop")
    await agent.wait_calls(2, within=20)
    stopped = time.monotonic()
    owner.signal(signal.SIGTERM)
    assert await wait_owner(fake, bot, [other], within=SLOW) is other
    handed = time.monotonic() - stopped
    # At once, not after the drain: the answer in flight is still with the agent.
    assert handed < SLOW - 1, f"hand-over after {handed:.1f}s"
    assert replies(fake, bot)[in_flight["id"]] == 0
    assert owner.proc.poll() is None, "the old owner is still draining"
    event = await asyncio.to_thread(owner.wait_for_event, "adapter_handed_over", 5.0)
    assert event["lease"] == "discord:acme:drainbot"
    agent.delay = 0.2
    meanwhile = await fake.message_create(bot, "sent during the drain")
    await fake.wait_for(lambda: replies(fake, bot)[meanwhile["id"]] == 1, within=20)

    # The draining owner finishes its answer; the new owner, which got the message replayed,
    # found it answered once the session's lock was free.
    await fake.wait_for(lambda: replies(fake, bot)[in_flight["id"]] >= 1, within=SLOW + 15)
    await asyncio.to_thread(other.wait_for_event, "message_duplicate", 20.0,
                            message_id=in_flight["id"], answered_elsewhere=True)
    assert await asyncio.to_thread(owner.proc.wait, 30) == 0
    counts = replies(fake, bot)
    assert {m: counts[m] for m in (warm["id"], in_flight["id"], meanwhile["id"])} == {
        warm["id"]: 1, in_flight["id"]: 1, meanwhile["id"]: 1}
    assert agent.texts().count("in flight at the stop") == 1
    assert len(fake.ops(2, bot.token)) == 1, "the new owner resumed the session, no IDENTIFY"
    assert connections(fake, bot) == 1
    assert await asyncio.to_thread(other.stop) == 0
