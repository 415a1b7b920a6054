"""Three real `chatgateway run` processes on one PostgreSQL database and one fake Discord bot.

Exactly one instance connects the bot; when it is killed (kill -9) another takes over within 15 s
by resuming the dead owner's gateway session, so Discord's replay brings back what the dead owner
had not answered, and the shared store's processed events stop what it had; a SIGTERM hands the
bot over at once (the lease is released), not after the lease's ttl.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import tenant
from tests.fakes.discord import FakeBot, FakeDiscord
from tests.process import GatewayProcess
from tests.test_store import postgres_schema

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: What issue 13 allows between the owner's death and another instance connecting.
TAKEOVER_LIMIT = 15.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = await FakeDiscord().start()
    yield server
    await server.stop()


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with postgres_schema() as value:
        yield value


def connections(fake: FakeDiscord, bot: FakeBot) -> int:
    """Gateway connections of this bot that are open right now."""
    return sum(
        1
        for c in fake.connections
        if not c.ws.closed and c.session is not None and c.session.bot is bot
    )


def connected_by(procs: list[GatewayProcess]) -> list[GatewayProcess]:
    """The processes whose last gateway event was a (re)connection, not a loss or a stop."""
    found = []
    for proc in procs:
        if proc.proc.poll() is not None:
            continue
        names = [e.get("event") for e in proc.events()]
        last_up = max((i for i, n in enumerate(names) if n in ("discord_ready", "discord_resumed")),
                      default=-1)
        # A stopping process may still be exiting after it released the bot.
        last_down = max((i for i, n in enumerate(names)
                         if n in ("adapter_lease_lost", "gateway_stopping")), default=-1)
        if last_up > last_down:
            found.append(proc)
    return found


def replies(fake: FakeDiscord, bot: FakeBot) -> Counter[str]:
    """How many replies each message got."""
    return Counter(
        p.reference["message_id"] for p in fake.posts(bot.token) if p.reference is not None
    )


async def wait_resume_point(dsn: str, seq: int, within: float) -> None:
    """Wait until the bot's lease row keeps the gateway resume point `seq` (renewals write it)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with asyncio.timeout(within):
            while True:
                cur = await conn.execute(
                    "SELECT data->>'seq' FROM leases WHERE name = 'discord:acme:clusterbot'"
                )
                row = await cur.fetchone()
                if row is not None and row[0] == str(seq):
                    return
                await asyncio.sleep(0.1)


async def wait_owner(fake: FakeDiscord, bot: FakeBot, procs: list[GatewayProcess],
                     within: float) -> GatewayProcess:
    """Wait until exactly one live process has the bot connected; return it."""
    async with asyncio.timeout(within):
        while True:
            owners = connected_by(procs)
            if len(owners) == 1 and fake.live_session(bot) is not None:
                return owners[0]
            assert len(owners) <= 1, "two instances connected the same bot"
            await asyncio.sleep(0.05)


async def test_one_owner_kill_9_takeover_within_15s_without_duplicates_and_sigterm_hand_over(
    fake, make_agent, gateway_process, dsn
):
    agent = await make_agent(delay=0.2)
    bot = fake.add_bot("clusterbot")
    config: dict[str, Any] = {
        "storage": {"backend": "postgres", "dsn": {"value": dsn}},
        "cluster": {"coordination": "postgres"},
        "tenants": [tenant("acme", agent.url, discord={"bots": [fake.bot_settings(bot)]})],
    }
    procs = [await asyncio.to_thread(gateway_process, config) for _ in range(3)]
    owner = await wait_owner(fake, bot, procs, within=30)
    # The two others wait in standby and know who owns the bot.
    for proc in procs:
        if proc is not owner:
            standby = await asyncio.to_thread(proc.wait_for_event, "adapter_standby", 30.0)
            assert standby["lease"] == "discord:acme:clusterbot"
            assert standby["owner"]
    assert len(fake.ops(2, bot.token)) == 1, "one IDENTIFY: only the owner connected"
    assert connections(fake, bot) == 1

    # Answered before the kill.
    first = await fake.message_create(bot, "before the kill")
    await fake.wait_for(lambda: replies(fake, bot)[first["id"]] == 1, within=20)
    # In the agent's hands when the owner dies: the resume point the owner keeps with the lease
    # stays just before it, although the session goes on (the bot's own echoed replies).
    agent.delay = 10.0
    in_flight = await fake.message_create(bot, "during the kill")
    await agent.wait_calls(2, within=20)
    [seq] = [f["s"] for f in fake.current_session(bot).events
             if f["t"] == "MESSAGE_CREATE" and f["d"]["id"] == in_flight["id"]]
    await wait_resume_point(dsn, seq - 1, within=10)
    await asyncio.to_thread(owner.kill)
    killed = time.monotonic()
    agent.delay = 0.2
    # Sent while nobody is connected.
    gap = await fake.message_create(bot, "while nobody owns the bot")

    survivors = [p for p in procs if p is not owner]
    new_owner = await wait_owner(fake, bot, survivors, within=TAKEOVER_LIMIT + 5)
    took = time.monotonic() - killed
    assert took <= TAKEOVER_LIMIT, f"takeover after {took:.1f}s"
    assert len(fake.ops(2, bot.token)) == 1, "the new owner resumed the session, no IDENTIFY"
    after = await fake.message_create(bot, "after the takeover")
    # Discord replays from the first message on the next RESUME: the new owner finds it answered
    # (by the dead owner) in the shared database.
    await fake.wait_for(lambda: replies(fake, bot)[after["id"]] == 1, within=30)
    await fake.force_resume_replay(bot, first["id"])

    expected = [first["id"], in_flight["id"], gap["id"], after["id"]]
    try:
        await fake.wait_for(lambda: all(replies(fake, bot)[m] >= 1 for m in expected), within=30)
    except TimeoutError:
        print("replies:", replies(fake, bot), "expected:", expected)
        print(new_owner.output()[-6000:])
        raise
    # The replayed "before the kill" was recognised from the shared store.
    await asyncio.to_thread(new_owner.wait_for_event, "message_duplicate", 20.0,
                            message_id=first["id"])
    assert {m: replies(fake, bot)[m] for m in expected} == dict.fromkeys(expected, 1)
    assert connections(fake, bot) == 1

    # systemctl stop of the owner: the bot moves at once, not after the 10 s ttl.
    last = next(p for p in survivors if p is not new_owner)
    session = fake.live_session(bot)
    assert session is not None and session.conn is not None
    handed_over = session.conn.ws
    stopped = time.monotonic()
    new_owner.signal(signal.SIGTERM)
    await wait_owner(fake, bot, [last], within=TAKEOVER_LIMIT)
    handed = time.monotonic() - stopped
    assert handed < 5.0, f"hand-over after SIGTERM took {handed:.1f}s"
    # Closed with 4000, not 1000 (which would end the session on the real Discord): discord.py's
    # close() asks for 1000, but its socket's reader closes first with its default, 4000. So the
    # next owner resumes the session and gets what was sent while nobody was connected.
    assert handed_over.close_code == 4000
    assert len(fake.ops(2, bot.token)) == 1
    assert await asyncio.to_thread(new_owner.stop) == 0
    final = await fake.message_create(bot, "after the hand-over")
    await fake.wait_for(lambda: replies(fake, bot)[final["id"]] == 1, within=20)
    await asyncio.sleep(0)
    counts = replies(fake, bot)
    assert all(n == 1 for n in counts.values()), counts
    assert connections(fake, bot) == 1
    assert await asyncio.to_thread(last.stop) == 0


async def test_an_owner_that_loses_its_lease_finishes_its_reply_and_the_replay_is_not_answered_again(
    fake, make_agent, gateway_process, dsn
):
    """The lease lost while alive (renewals too late under load): no second reply, no ping-pong."""
    import psycopg

    agent = await make_agent(delay=0.2)
    bot = fake.add_bot("fencedbot")
    config: dict[str, Any] = {
        "storage": {"backend": "postgres", "dsn": {"value": dsn}},
        "cluster": {"coordination": "postgres"},
        "tenants": [tenant("acme", agent.url, discord={"bots": [fake.bot_settings(bot)]})],
    }
    procs = [await asyncio.to_thread(gateway_process, config) for _ in range(2)]
    owner = await wait_owner(fake, bot, procs, within=30)
    other = next(p for p in procs if p is not owner)
    agent.delay = 6.0
    slow = await fake.message_create(bot, "answered by the old owner")
    await agent.wait_calls(1, within=20)
    # Somebody else's row now, and expired: the standby takes it; the owner's renewal fails.
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE leases SET owner = 'elsewhere', expires_at = clock_timestamp() - "
            "interval '1 second' WHERE name = 'discord:acme:fencedbot'"
        )
    await asyncio.to_thread(owner.wait_for_event, "adapter_lease_lost", 20.0)
    agent.delay = 0.2
    assert await wait_owner(fake, bot, procs, within=20) is other
    after = await fake.message_create(bot, "answered by the new owner")
    await fake.wait_for(
        lambda: replies(fake, bot)[slow["id"]] >= 1 and replies(fake, bot)[after["id"]] >= 1,
        within=30,
    )
    # The new owner got the slow message replayed, waited for the session's lock, and found it
    # answered by the old owner.
    await asyncio.to_thread(other.wait_for_event, "message_duplicate", 20.0,
                            message_id=slow["id"], answered_elsewhere=True)
    assert replies(fake, bot)[slow["id"]] == 1 and replies(fake, bot)[after["id"]] == 1
    assert agent.texts().count("answered by the old owner") == 1
    assert connections(fake, bot) == 1
    for proc in procs:
        assert await asyncio.to_thread(proc.stop) == 0
