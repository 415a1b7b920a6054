"""PostgreSQL leases: two instances contend, expiry, release, `lost` on a steal or a dead server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from chatgateway.coordination.pg_lease import PgLease, PgLeases
from tests.test_store import postgres_schema

pytestmark = pytest.mark.postgres

MakeLeases = Callable[[str], Awaitable[PgLeases]]


@pytest.fixture
async def make_leases() -> AsyncIterator[MakeLeases]:
    """Lease managers of several 'instances' on one fresh schema; closed at teardown."""
    made: list[PgLeases] = []
    async with postgres_schema() as dsn:

        async def make(owner: str) -> PgLeases:
            leases = PgLeases(dsn, owner)
            await leases.start()
            made.append(leases)
            return leases

        yield make
        for leases in made:
            await leases.close()


async def take_within(leases: PgLeases, name: str, ttl: float, within: float) -> PgLease:
    """Retry try_lease every 0.1 s, the way a standby instance does."""
    async with asyncio.timeout(within):
        while True:
            lease = await leases.try_lease(name, ttl=ttl)
            if lease is not None:
                return lease
            await asyncio.sleep(0.1)


async def test_only_one_instance_holds_a_name_and_the_other_learns_who(make_leases):
    a, b = await make_leases("host-a:1"), await make_leases("host-b:2")
    lease = await a.try_lease("discord:acme:bot", ttl=10)
    assert lease is not None and not lease.lost.is_set()
    assert await b.try_lease("discord:acme:bot", ttl=10) is None
    assert b.holder("discord:acme:bot") == "host-a:1"
    assert await a.try_lease("discord:acme:bot", ttl=10) is None  # not twice in one instance
    # Other names are independent.
    assert await b.try_lease("discord:acme:other", ttl=10) is not None


async def test_release_hands_over_at_once_with_the_saved_data(make_leases):
    a, b = await make_leases("a"), await make_leases("b")
    lease = await a.try_lease("bot", ttl=30)
    assert lease is not None and lease.data is None
    lease.save({"session": "s1", "seq": 7})
    await lease.release()
    assert lease.lost.is_set()
    started = time.monotonic()
    taken = await b.try_lease("bot", ttl=30)  # no waiting for the 30 s ttl
    assert taken is not None and time.monotonic() - started < 1
    assert taken.data == {"session": "s1", "seq": 7}


async def test_a_holder_that_stops_renewing_loses_the_name_after_the_ttl(make_leases):
    a, b = await make_leases("a"), await make_leases("b")
    lease = await a.try_lease("bot", ttl=1.5)
    assert lease is not None
    lease.save({"seq": 3}, now=True)
    # Renewals keep it past the ttl (and write the data).
    await asyncio.sleep(2.0)
    assert await b.try_lease("bot", ttl=1.5) is None
    # The holder dies (kill -9): nothing renews it any more.
    assert lease._task is not None
    lease._task.cancel()
    died = time.monotonic()
    taken = await take_within(b, "bot", 1.5, within=5)
    waited = time.monotonic() - died
    assert 0.5 < waited < 2.5
    assert taken.data == {"seq": 3}


async def test_a_stolen_lease_is_lost(make_leases):
    a = await make_leases("a")
    lease = await a.try_lease("bot", ttl=1.2)
    assert lease is not None
    conn = await a._connection()
    await conn.execute("UPDATE leases SET owner = 'thief' WHERE name = 'bot'")
    async with asyncio.timeout(1.2):
        await lease.lost.wait()
    # Renewal must not take it back.
    cur = await (await a._connection()).execute("SELECT owner FROM leases WHERE name = 'bot'")
    assert await cur.fetchall() == [("thief",)]


async def test_a_holder_cut_off_from_the_database_gives_up_before_the_lease_expires(make_leases):
    a, b = await make_leases("a"), await make_leases("b")
    lease = await a.try_lease("bot", ttl=2.0)
    assert lease is not None
    # The database becomes unreachable for `a` (its machine lost the network).
    a._conninfo = "postgresql://postgres@127.0.0.1:1/none"
    conn = await b._connection()
    assert a._conn is not None
    await conn.execute("SELECT pg_terminate_backend(%s)", (a._conn.info.backend_pid,))
    async with asyncio.timeout(3):
        await lease.lost.wait()
    # `a` stopped before anybody could take the lease over.
    assert await b.try_lease("bot", ttl=2.0) is None
    await take_within(b, "bot", 2.0, within=4)
