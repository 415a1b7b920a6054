"""PostgresCoordinator against the real server: advisory session locks, NOTIFY change notices,
the listener's reconnect; and the store-level event claim both backends provide."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from pydantic import SecretStr

from chatgateway.coordination.postgres import PostgresCoordinator, channel_name, lock_id
from chatgateway.models import Platform, TenantId
from chatgateway.store.base import SessionStore
from tests.test_store import PG_SERVER, postgres_schema
from tests.test_store import store as store  # the parametrized store fixture

MakeCoordinator = Callable[..., Awaitable[PostgresCoordinator]]


@pytest.fixture
async def make_coordinator() -> AsyncIterator[MakeCoordinator]:
    """Started coordinators on a fresh schema (or the given dsn), closed at teardown."""
    async with AsyncExitStack() as stack:
        shared: list[str] = []

        async def make(dsn: str | None = None) -> PostgresCoordinator:
            if dsn is None:
                if not shared:
                    shared.append(await stack.enter_async_context(postgres_schema()))
                dsn = shared[0]
            coordinator = PostgresCoordinator(SecretStr(dsn))
            await coordinator.start()
            stack.push_async_callback(coordinator.close)
            return coordinator

        yield make


class Inbox:
    """A change listener that records notices and lets a test wait for one."""

    def __init__(self) -> None:
        self.notices: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def __call__(self, payload: dict[str, Any]) -> None:
        async with self._changed:
            self.notices.append(payload)
            self._changed.notify_all()

    async def wait_for(self, kind: str, within: float = 5.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((n for n in self.notices if n.get("kind") == kind), None)

        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        notice = found()
        assert notice is not None
        return notice


def test_lock_ids_and_channels_are_stable_and_namespaced():
    assert lock_id("public", "s_1") == lock_id("public", "s_1")
    assert lock_id("public", "s_1") != lock_id("other", "s_1")
    assert -(2**63) <= lock_id("public", ("t", "s")) < 2**63
    assert channel_name("public") == "chatgateway"
    assert len(channel_name("test_" + "x" * 60)) <= 63


pytestmark = pytest.mark.postgres


async def test_a_session_lock_excludes_other_instances_until_released(make_coordinator):
    one, two = await make_coordinator(), await make_coordinator()
    order: list[str] = []
    held = one.session_lock("s_shared")
    await held.__aenter__()

    async def second() -> None:
        async with two.session_lock("s_shared"):
            order.append("two")

    waiting = asyncio.create_task(second())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiting), 0.3)
    async with two.session_lock("s_other"):  # another session is not held up
        order.append("other")
    order.append("one released")
    await held.__aexit__(None, None, None)
    await asyncio.wait_for(waiting, 5)
    assert order == ["other", "one released", "two"]


async def test_one_instance_queues_locally_in_arrival_order(make_coordinator):
    one = await make_coordinator()
    order: list[int] = []
    gate = asyncio.Event()

    async def message(i: int) -> None:
        async with one.session_lock("s_1"):
            if i == 0:
                await gate.wait()
            order.append(i)

    tasks = [asyncio.create_task(message(i)) for i in range(5)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2, 3, 4]


async def test_a_dead_instance_s_locks_are_released_with_its_connection(make_coordinator):
    one, two = await make_coordinator(), await make_coordinator()
    await one.session_lock("s_crash").__aenter__()
    await one.close()  # what the server sees when a process dies: its connections close
    async with asyncio.timeout(5), two.session_lock("s_crash"):
        pass


async def test_a_cancelled_waiter_leaves_no_lock_behind(make_coordinator):
    one, two = await make_coordinator(), await make_coordinator()
    for i in range(30):  # cancelled at different points, also while PostgreSQL grants it
        lock = one.session_lock("s_c")
        task = asyncio.create_task(lock.__aenter__())
        await asyncio.sleep(i * 0.0002)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled():
            await lock.__aexit__(None, None, None)
    async with asyncio.timeout(5), two.session_lock("s_c"):
        pass


async def test_notices_reach_every_instance_including_the_sender(make_coordinator):
    one, two = await make_coordinator(), await make_coordinator()
    inbox_one, inbox_two = Inbox(), Inbox()
    one.subscribe(inbox_one)
    two.subscribe(inbox_two)
    await one.publish({"kind": "tenant", "tenant_id": "acme"})
    assert (await inbox_two.wait_for("tenant"))["tenant_id"] == "acme"
    assert (await inbox_one.wait_for("tenant"))["tenant_id"] == "acme"


async def test_deployments_in_two_schemas_do_not_hear_each_other(make_coordinator):
    async with postgres_schema() as other_dsn:
        one, stranger = await make_coordinator(), await make_coordinator(other_dsn)
        inbox = Inbox()
        stranger.subscribe(inbox)
        await one.publish({"kind": "tenant", "tenant_id": "acme"})
        await stranger.publish({"kind": "marker"})
        await inbox.wait_for("marker")
        assert [n["kind"] for n in inbox.notices] == ["marker"]
        await stranger.close()


async def test_the_listener_reconnects_and_asks_for_a_resync(make_coordinator):
    import psycopg

    one, two = await make_coordinator(), await make_coordinator()
    inbox = Inbox()
    two.subscribe(inbox)
    assert two.listen_conn is not None
    pid = two.listen_conn.info.backend_pid
    async with await psycopg.AsyncConnection.connect(PG_SERVER, autocommit=True) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await inbox.wait_for("resync", within=10)
    await one.publish({"kind": "key", "key_id": "k1"})
    assert (await inbox.wait_for("key"))["key_id"] == "k1"


async def test_an_unreachable_database_fails_start_with_the_reason():
    import psycopg

    coordinator = PostgresCoordinator(
        SecretStr("postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2")
    )
    with pytest.raises(psycopg.OperationalError):
        await coordinator.start()
    await coordinator.close()


# The store-level claim that makes dedup hold across instances (both backends) ------------


async def test_claim_event_one_owner_until_stale_never_after_processed(
    store: SessionStore,
):
    t, slack = TenantId("acme"), Platform.SLACK
    assert await store.claim_event(t, slack, "ev1", "i1", 100.0, stale_before=0.0)
    assert not await store.claim_event(t, slack, "ev1", "i2", 101.0, stale_before=50.0)
    assert await store.claim_event(t, slack, "ev1", "i1", 102.0, stale_before=50.0)  # its own
    # i1 died mid-message: once its claim is stale, i2 takes the event over.
    assert await store.claim_event(t, slack, "ev1", "i2", 300.0, stale_before=200.0)
    assert not await store.claim_event(t, slack, "ev1", "i1", 301.0, stale_before=200.0)
    # Another tenant's event of the same id is its own.
    assert await store.claim_event(TenantId("other"), slack, "ev1", "i1", 301.0, stale_before=0.0)
    # Processed events are never claimed again, however old.
    from chatgateway.models import ConversationKind, Role, SessionKey, Turn

    key = SessionKey(t, slack, "C1", "", "U1")
    session = await store.create_session(key, kind=ConversationKind.DM, user_name=None, now=1.0)
    await store.record_exchange(t, session.id, [Turn(Role.USER, "hi", 1.0)], max_turns=10,
                                processed_event=(slack, "ev2"))
    assert not await store.claim_event(t, slack, "ev2", "i1", 400.0, stale_before=399.0)


# Two gateways (in this process) on one database: a platform event delivered to both ------


async def test_an_event_delivered_to_two_instances_at_once_is_processed_once(
    make_gateway, make_agent
):
    from chatgateway.models import Conversation, ConversationKind, NormalizedMessage, User
    from tests.conftest import tenant

    agent = await make_agent(delay=0.2)
    async with postgres_schema() as dsn:
        config = {
            "storage": {"backend": "postgres", "dsn": {"value": dsn}},
            "cluster": {"coordination": "postgres"},
            "tenants": [tenant("acme", agent.url)],
        }
        one, two = await make_gateway(config), await make_gateway(config)

        def event(event_id: str) -> NormalizedMessage:
            return NormalizedMessage(
                TenantId("acme"), Platform.SLACK, Conversation("D1", ConversationKind.DM),
                User("U1"), f"text of {event_id}", event_id, 1.0,
            )

        assert one.pipeline is not None and two.pipeline is not None
        replies = await asyncio.gather(
            one.pipeline.handle(event("Ev1"), dedup=True),
            two.pipeline.handle(event("Ev1"), dedup=True),
        )
        assert sorted(r.outcome for r in replies) == ["duplicate", "ok"]
        assert agent.texts() == ["text of Ev1"]
        # Later redeliveries, to either instance, are duplicates too.
        for daemon in (one, two):
            assert (await daemon.pipeline.handle(event("Ev1"), dedup=True)).outcome == "duplicate"
        assert agent.texts() == ["text of Ev1"]
        await one.stop()
        await two.stop()


async def test_first_messages_of_one_conversation_on_two_instances_make_one_session(
    make_gateway, make_agent
):
    from chatgateway.models import Conversation, ConversationKind, NormalizedMessage, User
    from tests.conftest import tenant

    agent = await make_agent(delay=0.05)
    async with postgres_schema() as dsn:
        config = {
            "storage": {"backend": "postgres", "dsn": {"value": dsn}},
            "cluster": {"coordination": "postgres"},
            "tenants": [tenant("acme", agent.url)],
        }
        one, two = await make_gateway(config), await make_gateway(config)
        assert one.pipeline is not None and two.pipeline is not None
        for round_ in range(5):
            def first(n: int, user: str = f"visitor-{round_}") -> NormalizedMessage:
                return NormalizedMessage(
                    TenantId("acme"), Platform.WEB, Conversation(user, ConversationKind.WEB),
                    User(user), f"hello {n}", f"{user}-{n}", 1.0,
                )

            replies = await asyncio.gather(
                one.pipeline.handle(first(1), dedup=False),
                two.pipeline.handle(first(2), dedup=False),
            )
            assert replies[0].session is not None and replies[1].session is not None
            assert replies[0].session.id == replies[1].session.id
        await one.stop()
        await two.stop()


async def test_session_locks_work_again_after_their_connection_dropped(make_coordinator):
    import psycopg

    one, two = await make_coordinator(), await make_coordinator()
    async with one.session_lock("s_before"):
        pass
    pids = [c.conn.info.backend_pid for c in one._lock_conns if c.conn is not None]
    async with await psycopg.AsyncConnection.connect(PG_SERVER, autocommit=True) as admin:
        for pid in pids:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    for key in ("s_a", "s_b", "s_c", "s_d"):  # both connections, reconnected on demand
        async with asyncio.timeout(5), one.session_lock(key):
            # ...and still exclusive across instances.
            other = asyncio.create_task(two.session_lock(key).__aenter__())
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(other), 0.1)
        await asyncio.wait_for(other, 5)
    # A notice goes out on a reconnected connection too.
    inbox = Inbox()
    two.subscribe(inbox)
    await one.publish({"kind": "after-drop"})
    await inbox.wait_for("after-drop")


async def test_after_the_listener_reconnects_the_registry_reloads_what_it_missed(make_gateway):
    """A change whose notice was lost (made while the listener was away) is picked up by the
    resync after the reconnect: here a tenant written to the store without any notice."""
    import time

    import psycopg

    from chatgateway.coordination.postgres import PostgresCoordinator
    from chatgateway.store.base import TenantRecord
    from tests.conftest import tenant

    async with postgres_schema() as dsn:
        config = {
            "storage": {"backend": "postgres", "dsn": {"value": dsn}},
            "cluster": {"coordination": "postgres"},
            "tenants": [tenant("acme")],
        }
        one, two = await make_gateway(config), await make_gateway(config)
        assert one.store is not None and isinstance(two.coordinator, PostgresCoordinator)
        now = time.time()
        await one.store.save_tenant(
            TenantRecord(TenantId("quiet-co"), {"id": "quiet-co", "agent": {"builtin": "echo"}},
                         now, now)
        )
        assert two.tenants is not None and two.tenants.get("quiet-co") is None
        added = asyncio.Event()

        async def on_change(old: Any, new: Any) -> None:
            if new is not None and new.id == "quiet-co":
                added.set()

        two.tenants.on_change(on_change)
        assert two.coordinator.listen_conn is not None
        pid = two.coordinator.listen_conn.info.backend_pid
        async with await psycopg.AsyncConnection.connect(PG_SERVER, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await asyncio.wait_for(added.wait(), 10)
        runtime = two.tenants.get("quiet-co")
        assert runtime is not None and runtime.source == "runtime"
        await one.stop()
        await two.stop()
