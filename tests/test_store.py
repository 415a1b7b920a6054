"""The session-store contract, parametrized over every backend."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import NoReturn

import pytest
from pydantic import SecretStr

from chatgateway.errors import NotFoundError
from chatgateway.models import (
    ConversationKind,
    Platform,
    Role,
    SessionId,
    SessionKey,
    TenantId,
    Turn,
)
from chatgateway.store.base import ApiKeyRecord, SessionStore, TenantRecord
from chatgateway.store.sqlite import SqliteStore

A, B = TenantId("tenant-a"), TenantId("tenant-b")


def key(tenant: TenantId, user: str = "u1", conv: str = "c1", thread: str = "") -> SessionKey:
    return SessionKey(tenant, Platform.WEB, conv, thread, user)


PG_SERVER = "postgresql://postgres@127.0.0.1:5432/test"


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose server is missing, except in CI, where that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is not skipped)")
    pytest.skip(reason)


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A fresh schema on the test server, dropped afterwards; yields a dsn that uses it."""
    try:
        import psycopg
    except ImportError as exc:
        unavailable(f"psycopg is not installed: {exc}")
    try:
        admin = await psycopg.AsyncConnection.connect(PG_SERVER, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL is unreachable at {PG_SERVER}: {exc}")
    schema = f"test_{uuid.uuid4().hex}"
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    async with AsyncExitStack() as stack:
        s: SessionStore
        if request.param == "postgres":
            from chatgateway.store.postgres import PostgresStore

            s = PostgresStore(SecretStr(await stack.enter_async_context(postgres_schema())))
        else:
            s = SqliteStore(tmp_path / "store.db")
        await s.open()
        stack.push_async_callback(s.close)
        yield s


async def reopen(store: SessionStore) -> SessionStore:
    """Close `store` and open the same database again (the caller closes the new one)."""
    await store.close()
    fresh: SessionStore
    if isinstance(store, SqliteStore):
        fresh = SqliteStore(store.path)
    else:
        from chatgateway.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        fresh = PostgresStore(store.dsn)
    await fresh.open()
    return fresh


async def new(store: SessionStore, k: SessionKey) -> str:
    s = await store.create_session(k, kind=ConversationKind.WEB, user_name="U", now=time.time())
    return s.id


async def test_session_ids_are_opaque_and_unique(store: SessionStore) -> None:
    ids = {await new(store, key(A, f"user{i}")) for i in range(50)}
    assert len(ids) == 50
    for sid in ids:
        assert "tenant-a" not in sid and "user" not in sid and len(sid) >= 20


async def test_find_active_session_reuses_until_idle(store: SessionStore) -> None:
    sid = await new(store, key(A))
    found = await store.find_active_session(key(A), idle_since=time.time() - 60)
    assert found is not None and found.id == sid
    assert await store.find_active_session(key(A), idle_since=time.time() + 1) is None
    assert await store.find_active_session(key(A, thread="t1"), idle_since=0) is None
    assert await store.find_active_session(key(B), idle_since=0) is None


async def test_every_read_is_scoped_by_tenant(store: SessionStore) -> None:
    sid = await new(store, key(A))
    await store.record_exchange(A, sid, [Turn(Role.USER, "secret-a", time.time())], max_turns=100)
    assert await store.get_session(B, sid) is None
    assert await store.history(B, sid, 10) == []
    assert await store.list_sessions(B) == []
    assert not await store.delete_session(B, sid)
    assert await store.get_session(A, sid) is not None
    with pytest.raises(NotFoundError):
        await store.record_exchange(B, sid, [Turn(Role.USER, "x", time.time())], max_turns=100)


async def test_transcript_survives_reopen_and_is_bounded(store: SessionStore) -> None:
    sid = await new(store, key(A))
    now = time.time()
    for i in range(30):
        turns = [Turn(Role.USER, f"q{i}", now + i), Turn(Role.AGENT, f"a{i}", now + i + 0.5)]
        await store.record_exchange(A, sid, turns, max_turns=20)
    store = await reopen(store)
    try:
        history = await store.history(A, sid, 100)
        assert len(history) <= 20 + max(10, 2) + 2
        assert history[-1].text == "a29" and history[-2].text == "q29"
        assert [t.timestamp for t in history] == sorted(t.timestamp for t in history)
        last5 = await store.history(A, sid, 5)
        assert [t.text for t in last5] == ["a27", "q28", "a28", "q29", "a29"]
        session = await store.get_session(A, sid)
        assert session is not None and session.last_active == pytest.approx(now + 29.5)
    finally:
        await store.close()


async def test_concurrent_writes_group_commit(store: SessionStore) -> None:
    sids = [await new(store, key(A, f"u{i}")) for i in range(20)]
    turns = [Turn(Role.USER, "hello", time.time())]
    await asyncio.gather(*(store.record_exchange(A, s, turns, max_turns=10) for s in sids * 5))
    for sid in sids:
        assert len(await store.history(A, sid, 100)) == 5


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SQLite store, for what only this backend does (its writer thread, its locks)."""
    s = SqliteStore(tmp_path / "store.db")
    await s.open()
    yield s
    await s.close()


@contextmanager
def write_locked(path: str) -> Iterator[None]:
    """Another connection holds the database's write lock meanwhile (a backup, a shell)."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


async def test_a_queued_exchange_is_invisible_until_committed(sqlite_store: SqliteStore) -> None:
    store = sqlite_store
    sid = await new(store, key(A))
    now = time.time()
    with write_locked(store.path):  # so the exchange waits in the writer's queue
        pending = asyncio.create_task(store.record_exchange(
            A, sid, [Turn(Role.USER, "q", now), Turn(Role.AGENT, "a", now)], max_turns=100))
        await asyncio.sleep(0.05)
        assert not pending.done()
        session = await store.get_session(A, sid)
        assert session is not None and session.message_count == 0
        assert await store.history(A, sid, 10) == []
        [listed] = await store.list_sessions(A)
        assert listed.message_count == 0
    await asyncio.wait_for(pending, 10)
    session = await store.get_session(A, sid)
    assert session is not None and session.message_count == 2
    assert [t.text for t in await store.history(A, sid, 10)] == ["q", "a"]


async def test_a_locked_database_does_not_stall_the_loop_and_keeps_write_order(
    sqlite_store: SqliteStore,
) -> None:
    """Commits run on the loop, but never wait there: a locked database sends the batch to
    the writer thread, and the writes after it follow it there, in order."""
    store = sqlite_store
    sid = await new(store, key(A))
    now = time.time()
    with write_locked(store.path):
        first = asyncio.create_task(store.record_exchange(
            A, sid, [Turn(Role.USER, "q1", now), Turn(Role.AGENT, "a1", now)], max_turns=100))
        await asyncio.sleep(0)
        second = asyncio.create_task(store.record_exchange(
            A, sid, [Turn(Role.USER, "q2", now + 1)], max_turns=100))
        started = time.monotonic()
        for _ in range(20):  # the loop keeps running while the writes wait for the lock
            await asyncio.sleep(0.005)
        assert time.monotonic() - started < 2.0
        assert not first.done() and not second.done()
    # Free now, but the thread has not caught up: this write must queue behind it.
    third = asyncio.create_task(store.record_exchange(
        A, sid, [Turn(Role.AGENT, "a2", now + 2)], max_turns=100))
    await asyncio.wait_for(asyncio.gather(first, second, third), 10)
    assert [t.text for t in await store.history(A, sid, 10)] == ["q1", "a1", "q2", "a2"]
    # Caught up: the loop commits again.
    await store.record_exchange(A, sid, [Turn(Role.USER, "q3", now + 3)], max_turns=100)
    fresh = await reopen(store)
    try:
        session = await fresh.get_session(A, sid)
        assert session is not None and session.message_count == 5
        assert [t.text for t in await fresh.history(A, sid, 10)] == ["q1", "a1", "q2", "a2", "q3"]
    finally:
        await fresh.close()


def file_size(path: str) -> int:
    return os.path.getsize(path)


async def test_the_writer_thread_checkpoints_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's commits never checkpoint (a checkpoint fsyncs); the idle thread does."""
    from chatgateway.store import sqlite as sqlite_module

    # Before the store opens: the thread's first wait already uses it.
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_INTERVAL", 0.05)
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    try:
        sid = await new(store, key(A))
        await asyncio.sleep(0.3)  # the session's page reaches the file
        before = file_size(store.path)
        turns = [Turn(Role.USER, "x" * 2000, time.time())]
        await asyncio.gather(*(
            store.record_exchange(A, sid, turns, max_turns=1000) for _ in range(200)
        ))
        for _ in range(200):  # the turns are in the WAL; within seconds also in the file
            if file_size(store.path) > before + 200 * 2000 // 2:
                break
            await asyncio.sleep(0.05)
        assert file_size(store.path) > before + 200 * 2000 // 2
    finally:
        await store.close()


async def test_slow_writes_run_on_the_writer_thread_and_the_rest_on_the_loop(
    sqlite_store: SqliteStore,
) -> None:
    """A prune or a tenant's deletion may touch many rows: never on the event loop."""
    seen: list[str] = []

    def where(c: sqlite3.Connection) -> None:
        seen.append(threading.current_thread().name)

    await sqlite_store._write(where)
    await sqlite_store._write(where, slow=True)
    await sqlite_store._write(where)
    loop_thread = threading.main_thread().name
    assert seen == [loop_thread, "chatgateway-sqlite-writer", loop_thread]


async def test_list_and_delete(store: SessionStore) -> None:
    s1 = await new(store, key(A, "u1"))
    s2 = await new(store, key(A, "u2"))
    await store.record_exchange(A, s1, [Turn(Role.USER, "x", time.time() + 5)], max_turns=10)
    assert [s.id for s in await store.list_sessions(A)] == [s1, s2]
    assert [s.id for s in await store.list_sessions(A, user_id="u2")] == [s2]
    assert await store.list_sessions(A, platform=Platform.SLACK) == []
    assert await store.delete_session(A, s1)
    assert await store.get_session(A, s1) is None
    assert await store.history(A, s1, 10) == []
    assert await store.count_sessions(A) == 1


async def test_count_sessions_by_platform(store: SessionStore) -> None:
    now = time.time()
    await new(store, key(A, "u1"))
    await new(store, key(A, "u2"))
    slack = SessionKey(A, Platform.SLACK, "D1", "", "U1")
    await store.create_session(slack, kind=ConversationKind.DM, user_name=None, now=now)
    await store.create_session(SessionKey(A, Platform.DISCORD, "c", "", "old"),
                               kind=ConversationKind.CHANNEL, user_name=None, now=now - 1000)
    await new(store, key(B, "u1"))
    assert await store.count_sessions_by_platform(A, active_since=now - 60) == {
        Platform.WEB: 2, Platform.SLACK: 1}
    assert await store.count_sessions_by_platform(A) == {
        Platform.WEB: 2, Platform.SLACK: 1, Platform.DISCORD: 1}
    assert await store.count_sessions_by_platform(B) == {Platform.WEB: 1}


async def test_prune_removes_only_old_sessions_of_that_tenant(store: SessionStore) -> None:
    old_a = await store.create_session(key(A, "old"), kind=ConversationKind.WEB, user_name=None,
                                       now=time.time() - 1000)
    fresh_a = await new(store, key(A, "fresh"))
    old_b = await store.create_session(key(B, "old"), kind=ConversationKind.WEB, user_name=None,
                                       now=time.time() - 1000)
    assert await store.prune(A, idle_before=time.time() - 500) == 1
    assert await store.get_session(A, old_a.id) is None
    assert await store.get_session(A, fresh_a) is not None
    assert await store.get_session(B, old_b.id) is not None


async def test_processed_events_survive_reopen(store: SessionStore) -> None:
    sid = await new(store, key(A))
    turns = [Turn(Role.USER, "x", time.time())]
    await store.record_exchange(A, sid, turns, max_turns=10, processed_event=(Platform.SLACK, "E1"))
    store = await reopen(store)
    try:
        assert await store.is_processed(A, Platform.SLACK, "E1")
        assert not await store.is_processed(B, Platform.SLACK, "E1")
        assert not await store.is_processed(A, Platform.DISCORD, "E1")
    finally:
        await store.close()


async def test_runtime_tenants_and_keys(store: SessionStore) -> None:
    await store.save_tenant(TenantRecord(A, {"id": "tenant-a", "agent": {"builtin": "echo"}}, 1, 1))
    await store.add_api_key(ApiKeyRecord("k1", A, "hash", "ci", 1.0))
    await store.add_api_key(ApiKeyRecord("k2", B, "hash2", "", 1.0))
    store = await reopen(store)
    try:
        assert [t.tenant_id for t in await store.list_tenants()] == [A]
        assert (await store.find_api_key("k1")) == ApiKeyRecord("k1", A, "hash", "ci", 1.0)
        assert [k.key_id for k in await store.list_api_keys(A)] == ["k1"]
        assert not await store.delete_api_key(B, "k1")
        sid = await new(store, key(A))
        await store.delete_tenant(A)
        assert await store.list_tenants() == []
        assert await store.find_api_key("k1") is None
        assert await store.get_session(A, sid) is None
        assert await store.find_api_key("k2") is not None
    finally:
        await store.close()


async def test_a_failing_write_does_not_undo_its_batch_neighbours(store: SessionStore) -> None:
    sid = await new(store, key(A))
    turns = [Turn(Role.USER, "kept", time.time())]
    results = await asyncio.gather(
        store.add_api_key(ApiKeyRecord("dup", A, "h1", "", 1.0)),
        store.add_api_key(ApiKeyRecord("dup", A, "h2", "", 1.0)),
        store.record_exchange(A, sid, turns, max_turns=10),
        return_exceptions=True,
    )
    assert results[0] is None and isinstance(results[1], Exception) and results[2] is None
    assert [t.text for t in await store.history(A, sid, 10)] == ["kept"]
    found = await store.find_api_key("dup")
    assert found is not None and found.key_hash == "h1"


async def test_gateway_setting_is_created_once_and_survives(store: SessionStore) -> None:
    assert await store.gateway_setting("visitor_secret", "first") == "first"
    assert await store.gateway_setting("visitor_secret", "second") == "first"
    store = await reopen(store)
    try:
        assert await store.gateway_setting("visitor_secret", "third") == "first"
    finally:
        await store.close()


@pytest.mark.postgres
async def test_open_store_picks_the_configured_backend(tmp_path: Path) -> None:
    from chatgateway.config import StorageConfig
    from chatgateway.store import open_store
    from chatgateway.store.postgres import PostgresStore

    sqlite_store = await open_store(StorageConfig(path=str(tmp_path / "s.db")))
    assert isinstance(sqlite_store, SqliteStore)
    await sqlite_store.close()
    async with postgres_schema() as dsn:
        pg = await open_store(StorageConfig(backend="postgres", dsn=SecretStr(dsn)))
        try:
            assert isinstance(pg, PostgresStore)
            assert await pg.gateway_setting("x", "y") == "y"
        finally:
            await pg.close()


async def _exchange(store: SessionStore, tenant: TenantId, k: SessionKey, *texts: str) -> str:
    sid = await new(store, k)
    now = time.time()
    turns = [Turn(Role.USER if i % 2 == 0 else Role.AGENT, t, now) for i, t in enumerate(texts)]
    await store.record_exchange(tenant, sid, turns, max_turns=50)
    return sid


async def test_purge_tenant_deletes_every_row_of_that_tenant_only(store: SessionStore) -> None:
    await store.save_tenant(TenantRecord(A, {"id": "tenant-a"}, 1, 1))
    await store.add_api_key(ApiKeyRecord("ka", A, "h", "", 1))
    await store.add_api_key(ApiKeyRecord("kb", B, "h", "", 1))
    sid = await _exchange(store, A, key(A, "u1"), "hi", "hello")
    await _exchange(store, A, key(A, "u2"), "x")
    await store.record_exchange(A, sid, [], max_turns=50, processed_event=(Platform.SLACK, "E1"))
    assert await store.claim_event(A, Platform.SLACK, "E2", "me", time.time(), stale_before=0)
    kept = await _exchange(store, B, key(B, "u1"), "b")
    deleted = await store.purge_tenant(A)
    assert {k: v for k, v in deleted.items() if v} == {
        "sessions": 2, "turns": 3, "api_keys": 1, "tenants": 1,
        "processed_events": 1, "event_claims": 1,
    }  # fmt: skip
    assert await store.count_sessions(A) == 0
    assert await store.get_session(A, SessionId(sid)) is None
    assert await store.list_api_keys(A) == []
    assert not await store.is_processed(A, Platform.SLACK, "E1")
    assert await store.list_tenants() == []
    assert await store.purge_tenant(A) == dict.fromkeys(deleted, 0)
    assert [t.text for t in await store.history(B, SessionId(kept), 10)] == ["b"]
    assert [k.key_id for k in await store.list_api_keys(B)] == ["kb"]


async def test_export_user_gives_every_session_with_its_whole_transcript(
    store: SessionStore,
) -> None:
    first = await _exchange(store, A, key(A, "alice", "c1"), "one", "two")
    second = await _exchange(store, A, key(A, "alice", "c2"), "three")
    slack = SessionKey(A, Platform.SLACK, "C1", "", "alice")
    await store.create_session(slack, kind=ConversationKind.CHANNEL, user_name=None, now=time.time())
    await _exchange(store, A, key(A, "bob"), "not alice")
    await _exchange(store, B, key(B, "alice"), "another tenant's alice")
    export = await store.export_user(A, "alice", platform=Platform.WEB)
    assert [e.session.id for e in export] == [first, second]
    assert [[t.text for t in e.turns] for e in export] == [["one", "two"], ["three"]]
    assert [t.role for t in export[0].turns] == [Role.USER, Role.AGENT]
    everything = await store.export_user(A, "alice")
    assert {e.session.platform for e in everything} == {Platform.WEB, Platform.SLACK}
    assert await store.export_user(A, "nobody") == []
    assert [e.turns[0].text for e in await store.export_user(B, "alice")] == [
        "another tenant's alice"
    ]


async def test_erase_user_deletes_their_sessions_only(store: SessionStore) -> None:
    gone = await _exchange(store, A, key(A, "alice", "c1"), "one", "two")
    slack = SessionKey(A, Platform.SLACK, "C1", "", "alice")
    on_slack = await store.create_session(
        slack, kind=ConversationKind.CHANNEL, user_name=None, now=time.time()
    )
    bob = await _exchange(store, A, key(A, "bob"), "bob's")
    theirs = await _exchange(store, B, key(B, "alice"), "B's alice")
    assert await store.erase_user(A, "alice", platform=Platform.WEB) == {"sessions": 1, "turns": 2}
    assert await store.get_session(A, SessionId(gone)) is None
    assert await store.history(A, SessionId(gone), 10) == []
    assert await store.get_session(A, on_slack.id) is not None
    assert await store.erase_user(A, "alice") == {"sessions": 1, "turns": 0}
    assert await store.export_user(A, "alice") == []
    assert await store.get_session(A, SessionId(bob)) is not None
    assert await store.get_session(B, SessionId(theirs)) is not None
    store = await reopen(store)
    try:  # gone from the file too, not just from a cache
        assert await store.get_session(A, SessionId(gone)) is None
        assert await store.export_user(A, "alice") == []
    finally:
        await store.close()
