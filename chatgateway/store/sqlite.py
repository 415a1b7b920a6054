"""SQLite backend: WAL mode, group commit on the event loop, a writer thread for contention.

Why this shape (see docs/performance.md): a commit per request costs about 1 ms of CPU, and
aiosqlite's thread hop costs more than an indexed read. So the writes of one event-loop
iteration are committed together in one transaction (group commit) and the waiting coroutines
are woken only after the commit. The commit runs on the loop itself: in WAL mode without
fsync per commit it is a few tens of microseconds, cheaper than handing the batch to a thread
(measured: 31-39% more requests/s on the web path, as a second thread busy on the other core
slowed the loop's own work). The loop never waits for a lock, though: when another connection
holds the database (a `chatgateway keys` command, say), or a batch fails, the batch goes to
one dedicated writer thread, which waits for the lock and retries each write on its own, and
every later batch follows it there until it has caught up, so writes stay in order. Writes of
many rows (pruning, deleting a tenant, the dedup clean-up) always go to the thread, and so do
the WAL checkpoints, which fsync. Reads are plain indexed queries on a connection used only
by the event loop, and hot sessions with their recent turns are kept in memory.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chatgateway.errors import NotFoundError
from chatgateway.models import (
    ConversationKind,
    Platform,
    Session,
    SessionId,
    SessionKey,
    TenantId,
    Turn,
)
from chatgateway.rich import stored_text, stored_turn
from chatgateway.store.base import (
    ADD_USAGE,
    CALLBACK_COLUMNS,
    ApiKeyRecord,
    CallbackRecord,
    SessionTranscript,
    TenantRecord,
    UsageRecord,
    callback_from_row,
)
from chatgateway.store.migrations import MigrateMode, SchemaStatus, refusal
from chatgateway.store.migrations import sqlite as migrations
from chatgateway.store.rows import (
    ANSWER_POSTED,
    CLAIM_EVENT,
    DEDUP_RETENTION,
    PROCESSED_ANSWER,
    SESSION_COLUMNS,
    answer_from_row,
    answer_seq,
    group_turns,
    key_from_row,
    list_sessions_query,
    new_session_id,
    session_from_row,
    user_sessions_query,
)

T = TypeVar("T")

#: How many recent turns of a hot session are kept in memory.
HISTORY_CACHE = 64


@dataclass(slots=True)
class _Hot:
    session: Session
    turns: deque[Turn] = field(default_factory=lambda: deque(maxlen=HISTORY_CACHE))
    #: The last turn number handed out; ahead of session.message_count while a write is queued.
    reserved: int = -1

    def __post_init__(self) -> None:
        if self.reserved < 0:
            self.reserved = self.session.message_count


@dataclass(frozen=True, slots=True)
class _Exchange:
    """One record_exchange, written together with every other exchange of the same batch."""

    turn_rows: list[tuple[Any, ...]]
    session_row: tuple[Any, ...]
    event_row: tuple[Any, ...] | None
    trim: tuple[Any, ...] | None

    def __call__(self, c: sqlite3.Connection) -> None:
        _write_exchanges(c, [self])


_INSERT_TURNS = (
    "INSERT INTO turns (tenant_id, session_id, seq, role, text, ts) VALUES (?,?,?,?,?,?)"
)
_UPDATE_SESSION = (
    "UPDATE sessions SET last_active = ?, message_count = ? WHERE id = ? AND tenant_id = ?"
)
_TRIM_TURNS = "DELETE FROM turns WHERE session_id = ? AND tenant_id = ? AND seq <= ?"
_INSERT_EVENT = (
    "INSERT OR IGNORE INTO processed_events "
    "(tenant_id, platform, event_id, processed_at, session_id, answer_seq) VALUES (?,?,?,?,?,?)"
)


def _write_exchanges(c: sqlite3.Connection, exchanges: list[_Exchange]) -> None:
    """A few executemany calls for a whole batch: far cheaper than statements per message."""
    c.executemany(_INSERT_TURNS, [row for ex in exchanges for row in ex.turn_rows])
    c.executemany(_UPDATE_SESSION, [ex.session_row for ex in exchanges])
    events = [ex.event_row for ex in exchanges if ex.event_row is not None]
    if events:
        c.executemany(_INSERT_EVENT, events)
    for ex in exchanges:
        if ex.trim is not None:
            c.execute(_TRIM_TURNS, ex.trim)


#: How often the writer thread checkpoints the WAL into the database file while it is idle.
CHECKPOINT_INTERVAL = 1.0


class _Writer(threading.Thread):
    """Group commit: each loop iteration's writes in one transaction, on the loop if it can.

    The thread owns a second write connection. It takes the batches the loop could not commit
    at once (the database was locked, or an operation failed) and checkpoints the WAL.
    """

    def __init__(self, path: str, migrate: MigrateMode = "auto") -> None:
        super().__init__(name="chatgateway-sqlite-writer", daemon=True)
        self._path = path
        self._migrate: MigrateMode = migrate
        self.schema: SchemaStatus | None = None
        self._queue: queue.SimpleQueue[list[_Pending] | None] = queue.SimpleQueue()
        self._outbox: list[_Pending] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        #: The event loop's own write connection: never waits for a lock.
        self._inline: sqlite3.Connection | None = None
        #: Batches handed to the thread and not settled yet; while any are, later ones follow.
        self._handed = 0
        #: The outbox holds a write that may take long (many rows): the thread commits it.
        self._outbox_slow = False

    def submit(
        self, op: Callable[[sqlite3.Connection], T], *, slow: bool = False
    ) -> asyncio.Future[T]:
        """Queue `op`; it is committed with the rest of this loop iteration's writes. A `slow`
        op (a delete of many rows) sends its batch to the thread, off the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._outbox.append((op, future))
        self._outbox_slow = self._outbox_slow or slow
        if len(self._outbox) == 1:
            loop.call_soon(self.post)
        return future

    def post(self) -> None:
        """Commit the submitted operations: here, or (if that cannot be done at once) by the
        thread, in the order they were submitted either way."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        slow, self._outbox_slow = self._outbox_slow, False
        if self._handed == 0 and self._inline is not None and not slow:
            results = _try_batch(self._inline, batch)
            if results is not None:
                _settle(results)
                return
        self._handed += 1
        self._queue.put(batch)

    def _caught_up(self, batches: int, entries: list[_Result]) -> None:
        self._handed -= batches
        _settle(entries)

    def start_and_wait(self) -> None:
        self.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        if self._path != ":memory:":  # a second connection would open another database
            self._inline = _connect_inline(self._path)

    def stop(self) -> None:
        self._queue.put(None)
        self.join()
        inline, self._inline = self._inline, None
        if inline is not None:
            inline.close()

    def run(self) -> None:
        try:
            conn = _connect_writer(self._path)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        try:
            self.schema = _ensure_schema(conn, self._migrate)
        except BaseException as exc:
            conn.close()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(conn)
        finally:
            conn.close()

    def _loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=CHECKPOINT_INTERVAL)
            except queue.Empty:
                _checkpoint(conn)
                continue
            batch: list[_Pending] = []
            joined = 0
            while item is not None:
                batch += item
                joined += 1
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                stopping = True
            if batch:
                self._settle_batch(conn, batch, joined)

    def _settle_batch(self, conn: sqlite3.Connection, batch: list[_Pending], joined: int) -> None:
        results = _run_batch(conn, batch)
        loop = batch[0][1].get_loop()  # the store's one event loop
        try:
            loop.call_soon_threadsafe(self._caught_up, joined, results)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


_Pending = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
_Result = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _connect_writer(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _ensure_schema(conn: sqlite3.Connection, mode: MigrateMode) -> SchemaStatus:
    """Apply pending migrations if allowed; refuse a schema this code cannot use."""
    status = migrations.status(conn)
    error = refusal(status, mode)
    if error is not None:
        raise error
    if status.pending:
        migrations.migrate(conn)
        status = migrations.status(conn)
    return status


def _connect_inline(path: str) -> sqlite3.Connection:
    """The event loop's write connection: it never waits for a lock nor checkpoints."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=0")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # the writer thread checkpoints
    return conn


def _try_batch(conn: sqlite3.Connection, batch: list[_Pending]) -> list[_Result] | None:
    """Run a batch in one transaction; None (and nothing written) if the database is locked
    (past the connection's busy timeout) or any operation fails."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        results = _run_ops(conn, batch)
        conn.execute("COMMIT")
        return results
    except Exception:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        return None


def _run_ops(conn: sqlite3.Connection, batch: list[_Pending]) -> list[_Result]:
    exchanges = [op for op, _ in batch if isinstance(op, _Exchange)]
    if exchanges:
        _write_exchanges(conn, exchanges)
    return [(future, None if isinstance(op, _Exchange) else op(conn), None) for op, future in batch]


def _run_batch(conn: sqlite3.Connection, batch: list[_Pending]) -> list[_Result]:
    """Run a batch in one transaction; if anything fails, run each op in its own."""
    results = _try_batch(conn, batch)
    if results is not None:
        return results
    # One bad write must not undo its neighbours: each waiter gets its own outcome.
    return [_run_alone(conn, op, future) for op, future in batch]


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database file as far as readers allow (never blocks a writer)."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.Error:
        pass  # retried at the next interval; the WAL only grows meanwhile


def _run_alone(
    conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]
) -> _Result:
    try:
        conn.execute("BEGIN IMMEDIATE")
        result = op(conn)
        conn.execute("COMMIT")
        return future, result, None
    except Exception as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return future, None, exc


def _settle(entries: list[_Result]) -> None:
    for future, result, error in entries:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class SqliteStore:
    """The embedded default store. One instance per database file, used from one event loop."""

    def __init__(
        self, path: str | Path, *, cache_size: int = 10_000, migrate: MigrateMode = "auto"
    ) -> None:
        self.path = str(path)
        self.migrate: MigrateMode = migrate
        #: Where the schema stood once open() had applied what it may.
        self.schema: SchemaStatus | None = None
        self._cache_size = cache_size
        self._hot: OrderedDict[SessionId, _Hot] = OrderedDict()
        self._by_key: dict[SessionKey, SessionId] = {}
        self._writer: _Writer | None = None
        self._reader: sqlite3.Connection | None = None

    # Lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        writer = _Writer(self.path, self.migrate)
        await asyncio.to_thread(writer.start_and_wait)
        self._writer = writer
        self.schema = writer.schema
        self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._reader.execute("PRAGMA busy_timeout=5000")
        self._reader.execute("PRAGMA query_only=1")
        await self._write(
            lambda c: (
                c.execute(
                    "DELETE FROM processed_events WHERE processed_at < ?",
                    (time.time() - DEDUP_RETENTION,),
                ),
                c.execute(
                    "DELETE FROM event_claims WHERE claimed_at < ?",
                    (time.time() - DEDUP_RETENTION,),
                ),
            ),
            slow=True,
        )

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.post()
            await asyncio.to_thread(writer.stop)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        self._hot.clear()
        self._by_key.clear()

    def _write(
        self, op: Callable[[sqlite3.Connection], T], *, slow: bool = False
    ) -> asyncio.Future[T]:
        if self._writer is None:
            raise RuntimeError("store is closed")
        return self._writer.submit(op, slow=slow)

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self._reader is None:
            raise RuntimeError("store is closed")
        return self._reader.execute(sql, params).fetchall()

    # Hot cache -----------------------------------------------------------------------------

    def _remember(self, session: Session, turns: list[Turn] | None = None) -> _Hot:
        hot = self._hot.get(session.id)
        if hot is None:
            hot = _Hot(session)
            if turns:
                hot.turns.extend(turns)
            self._hot[session.id] = hot
            self._by_key[session.key] = session.id
            while len(self._hot) > self._cache_size:
                _, old = self._hot.popitem(last=False)
                if self._by_key.get(old.session.key) == old.session.id:
                    del self._by_key[old.session.key]
        else:
            self._hot.move_to_end(session.id)
        return hot

    def _forget(self, session_id: SessionId) -> None:
        hot = self._hot.pop(session_id, None)
        if hot is not None and self._by_key.get(hot.session.key) == session_id:
            del self._by_key[hot.session.key]

    def _load(self, tenant_id: TenantId, session_id: SessionId) -> _Hot | None:
        hot = self._hot.get(session_id)
        if hot is not None:
            if hot.session.tenant_id != tenant_id:
                return None
            self._hot.move_to_end(session_id)
            return hot
        rows = self._read(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ? AND tenant_id = ?",
            (session_id, tenant_id),
        )
        if not rows:
            return None
        session = session_from_row(rows[0])
        return self._remember(session, self._read_turns(tenant_id, session_id, HISTORY_CACHE))

    def _read_turns(self, tenant_id: TenantId, session_id: SessionId, limit: int) -> list[Turn]:
        rows = self._read(
            "SELECT role, text, ts FROM turns WHERE session_id = ? AND tenant_id = ? "
            "ORDER BY seq DESC LIMIT ?",
            (session_id, tenant_id, limit),
        )
        return [stored_turn(r[0], r[1], r[2]) for r in reversed(rows)]

    # Sessions ------------------------------------------------------------------------------

    async def find_active_session(self, key: SessionKey, *, idle_since: float) -> Session | None:
        session_id = self._by_key.get(key)
        if session_id is not None:
            hot = self._load(key.tenant_id, session_id)
            if hot is not None:
                return hot.session if hot.session.last_active >= idle_since else None
        rows = self._read(
            # Pinned: without statistics the planner may walk sessions_by_activity instead to
            # avoid sorting, which scans every session of the tenant.
            f"SELECT {SESSION_COLUMNS} FROM sessions INDEXED BY sessions_by_key "
            "WHERE tenant_id = ? AND platform = ? "
            "AND conversation_id = ? AND thread_id = ? AND user_id = ? AND last_active >= ? "
            "ORDER BY last_active DESC LIMIT 1",
            (
                key.tenant_id,
                key.platform.value,
                key.conversation_id,
                key.thread_id,
                key.user_id,
                idle_since,
            ),
        )
        if not rows:
            return None
        session = session_from_row(rows[0])
        hot = self._remember(session, self._read_turns(key.tenant_id, session.id, HISTORY_CACHE))
        return hot.session

    async def get_session(self, tenant_id: TenantId, session_id: SessionId) -> Session | None:
        hot = self._load(tenant_id, session_id)
        return hot.session if hot is not None else None

    async def create_session(
        self, key: SessionKey, *, kind: ConversationKind, user_name: str | None, now: float
    ) -> Session:
        session = Session(
            id=new_session_id(),
            key=key,
            created_at=now,
            last_active=now,
            user_name=user_name,
            conversation_kind=kind,
        )
        row = (
            session.id,
            key.tenant_id,
            key.platform.value,
            key.conversation_id,
            key.thread_id,
            key.user_id,
            user_name,
            kind.value,
            now,
            now,
            0,
        )
        await self._write(
            lambda c: c.execute(
                f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row
            )
        )
        self._remember(session)
        return session

    async def record_exchange(
        self,
        tenant_id: TenantId,
        session_id: SessionId,
        turns: list[Turn],
        *,
        max_turns: int,
        processed_event: tuple[Platform, str] | None = None,
        keep_answer: bool = False,
    ) -> None:
        hot = self._load(tenant_id, session_id)
        if hot is None:
            raise NotFoundError(f"no session {session_id!r}")
        session = hot.session
        last_active = max(t.timestamp for t in turns) if turns else time.time()
        # message_count is every turn ever recorded and numbers them (seq); the table keeps
        # the last max_turns, one small primary-key range delete per exchange past that.
        first = hot.reserved + 1
        count = hot.reserved + len(turns)
        answer = answer_seq(turns, first) if keep_answer else None
        exchange = _Exchange(
            turn_rows=[
                (tenant_id, session_id, first + i, t.role.value, stored_text(t), t.timestamp)
                for i, t in enumerate(turns)
            ],
            session_row=(last_active, count, session_id, tenant_id),
            event_row=(
                (
                    tenant_id,
                    processed_event[0].value,
                    processed_event[1],
                    time.time(),
                    session_id if answer is not None else None,
                    answer,
                )
                if processed_event is not None
                else None
            ),
            trim=(session_id, tenant_id, count - max_turns) if count > max_turns else None,
        )
        # Reserve the numbers before waiting, so concurrent exchanges never share one; readers
        # see the new count only once the turns are committed.
        hot.reserved = count
        try:
            await self._write(exchange)
        except BaseException:
            self._forget(session_id)  # the next read takes the committed truth from the file
            raise
        session.message_count = max(session.message_count, count)
        session.last_active = max(session.last_active, last_active)
        hot.turns.extend(turns)

    async def history(self, tenant_id: TenantId, session_id: SessionId, limit: int) -> list[Turn]:
        if limit <= 0:
            return []
        hot = self._load(tenant_id, session_id)
        if hot is None:
            return []
        if limit <= len(hot.turns) or hot.session.message_count <= len(hot.turns):
            # The cache holds every turn asked for (or every turn there is).
            return list(hot.turns)[-limit:]
        return self._read_turns(tenant_id, session_id, limit)

    async def list_sessions(
        self,
        tenant_id: TenantId,
        *,
        user_id: str | None = None,
        platform: Platform | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Session]:
        sql, params = list_sessions_query("?", tenant_id, user_id, platform, limit, offset)
        sessions = [session_from_row(r) for r in self._read(sql, params)]
        # The hot copy is authoritative for sessions touched since they were read.
        return [hot.session if (hot := self._hot.get(s.id)) is not None else s for s in sessions]

    async def delete_session(self, tenant_id: TenantId, session_id: SessionId) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "DELETE FROM sessions WHERE id = ? AND tenant_id = ?", (session_id, tenant_id)
            )
            if cur.rowcount == 0:
                return False
            c.execute(
                "DELETE FROM turns WHERE session_id = ? AND tenant_id = ?", (session_id, tenant_id)
            )
            c.execute(  # and the late answers it was owed (their text with them)
                "DELETE FROM agent_callbacks WHERE session_id = ? AND tenant_id = ?",
                (session_id, tenant_id),
            )
            c.execute(  # and what its agent protocol kept for it (an open A2A task)
                "DELETE FROM agent_state WHERE session_id = ? AND tenant_id = ?",
                (session_id, tenant_id),
            )
            return True

        deleted = await self._write(op)
        hot = self._hot.get(session_id)
        if hot is not None and hot.session.tenant_id == tenant_id:
            self._forget(session_id)
        return deleted

    async def count_sessions(self, tenant_id: TenantId, *, active_since: float = 0.0) -> int:
        rows = self._read(
            "SELECT count(*) FROM sessions WHERE tenant_id = ? AND last_active >= ?",
            (tenant_id, active_since),
        )
        return int(rows[0][0])

    async def count_sessions_by_platform(
        self, tenant_id: TenantId, *, active_since: float = 0.0
    ) -> dict[Platform, int]:
        rows = self._read(
            "SELECT platform, count(*) FROM sessions WHERE tenant_id = ? AND last_active >= ? "
            "GROUP BY platform",
            (tenant_id, active_since),
        )
        return {Platform(r[0]): int(r[1]) for r in rows}

    async def prune(self, tenant_id: TenantId, *, idle_before: float) -> int:
        def op(c: sqlite3.Connection) -> list[str]:
            ids = [
                r[0]
                for r in c.execute(
                    "SELECT id FROM sessions WHERE tenant_id = ? AND last_active < ?",
                    (tenant_id, idle_before),
                )
            ]
            for chunk in range(0, len(ids), 500):
                part = ids[chunk : chunk + 500]
                marks = ",".join("?" * len(part))
                c.execute(
                    f"DELETE FROM turns WHERE tenant_id = ? AND session_id IN ({marks})",
                    (tenant_id, *part),
                )
                c.execute(
                    f"DELETE FROM sessions WHERE tenant_id = ? AND id IN ({marks})",
                    (tenant_id, *part),
                )
                c.execute(
                    f"DELETE FROM agent_state WHERE tenant_id = ? AND session_id IN ({marks})",
                    (tenant_id, *part),
                )
                c.execute(
                    f"DELETE FROM agent_callbacks WHERE tenant_id = ? AND session_id IN ({marks})",
                    (tenant_id, *part),
                )
            return ids

        ids = await self._write(op, slow=True)
        for session_id in ids:
            self._forget(SessionId(session_id))
        return len(ids)

    # Processed events ----------------------------------------------------------------------

    async def is_processed(self, tenant_id: TenantId, platform: Platform, event_id: str) -> bool:
        rows = self._read(
            "SELECT 1 FROM processed_events WHERE tenant_id = ? AND platform = ? AND event_id = ?",
            (tenant_id, platform.value, event_id),
        )
        return bool(rows)

    async def processed_answer(
        self, tenant_id: TenantId, platform: Platform, event_id: str
    ) -> tuple[SessionId, Turn] | None:
        rows = self._read(PROCESSED_ANSWER.format(p="?"), (tenant_id, platform.value, event_id))
        return answer_from_row(rows[0]) if rows else None

    async def answer_posted(self, tenant_id: TenantId, platform: Platform, event_id: str) -> None:
        params = (tenant_id, platform.value, event_id)
        await self._write(lambda c: c.execute(ANSWER_POSTED.format(p="?"), params))

    async def claim_event(
        self,
        tenant_id: TenantId,
        platform: Platform,
        event_id: str,
        owner: str,
        now: float,
        *,
        stale_before: float,
    ) -> bool:
        params = (tenant_id, platform.value, event_id, owner, now,
                  tenant_id, platform.value, event_id, stale_before)  # fmt: skip
        sql = CLAIM_EVENT.format(p="?")
        rows = await self._write(lambda c: c.execute(sql, params).fetchall())
        return bool(rows)

    # Runtime tenants -----------------------------------------------------------------------

    async def list_tenants(self) -> list[TenantRecord]:
        rows = self._read(
            "SELECT tenant_id, spec, created_at, updated_at FROM tenants ORDER BY tenant_id", ()
        )
        return [TenantRecord(TenantId(r[0]), json.loads(r[1]), r[2], r[3]) for r in rows]

    async def save_tenant(self, record: TenantRecord) -> None:
        row = (record.tenant_id, json.dumps(record.spec), record.created_at, record.updated_at)
        await self._write(
            lambda c: c.execute(
                "INSERT INTO tenants VALUES (?,?,?,?) ON CONFLICT (tenant_id) DO UPDATE SET "
                "spec = excluded.spec, updated_at = excluded.updated_at",
                row,
            )
        )

    async def delete_tenant(self, tenant_id: TenantId) -> None:
        def op(c: sqlite3.Connection) -> None:
            for table in (
                "tenants", "api_keys", "sessions", "turns", "processed_events", "event_claims",
                "agent_state", "agent_callbacks",
            ):
                c.execute(f"DELETE FROM {table} WHERE tenant_id = ?", (tenant_id,))

        await self._write(op, slow=True)
        for session_id in [s for s, h in self._hot.items() if h.session.tenant_id == tenant_id]:
            self._forget(session_id)

    # API keys ------------------------------------------------------------------------------

    async def add_api_key(self, record: ApiKeyRecord) -> None:
        row = (record.key_id, record.tenant_id, record.key_hash, record.label, record.created_at)
        await self._write(lambda c: c.execute("INSERT INTO api_keys VALUES (?,?,?,?,?)", row))

    async def find_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = self._read(
            "SELECT key_id, tenant_id, key_hash, label, created_at FROM api_keys WHERE key_id = ?",
            (key_id,),
        )
        return key_from_row(rows[0]) if rows else None

    async def list_api_keys(self, tenant_id: TenantId) -> list[ApiKeyRecord]:
        rows = self._read(
            "SELECT key_id, tenant_id, key_hash, label, created_at FROM api_keys "
            "WHERE tenant_id = ? ORDER BY created_at",
            (tenant_id,),
        )
        return [key_from_row(r) for r in rows]

    async def delete_api_key(self, tenant_id: TenantId, key_id: str) -> bool:
        cur = await self._write(
            lambda c: (
                c.execute(
                    "DELETE FROM api_keys WHERE key_id = ? AND tenant_id = ?", (key_id, tenant_id)
                ).rowcount
            )
        )
        return bool(cur)

    # Gateway-wide settings -----------------------------------------------------------------

    async def gateway_setting(self, name: str, default: str) -> str:
        def op(c: sqlite3.Connection) -> str:
            c.execute("INSERT OR IGNORE INTO gateway_settings VALUES (?, ?)", (name, default))
            row = c.execute("SELECT value FROM gateway_settings WHERE name = ?", (name,)).fetchone()
            return str(row[0])

        return await self._write(op)


    # Customers' data -----------------------------------------------------------------------

    async def purge_tenant(self, tenant_id: TenantId) -> dict[str, int]:
        def op(c: sqlite3.Connection) -> dict[str, int]:
            return {
                table: c.execute(f"DELETE FROM {table} WHERE tenant_id = ?", (tenant_id,)).rowcount
                for table in _tenant_tables(c)
            }

        deleted = await self._write(op, slow=True)
        for session_id in [s for s, h in self._hot.items() if h.session.tenant_id == tenant_id]:
            self._forget(session_id)
        return deleted

    async def export_user(
        self, tenant_id: TenantId, user_id: str, *, platform: Platform | None = None
    ) -> list[SessionTranscript]:
        sql, params = user_sessions_query("?", tenant_id, user_id, platform)
        sessions = [
            hot.session if (hot := self._hot.get(s.id)) is not None else s
            for s in map(session_from_row, self._read(sql, params))
        ]
        rows = self._read(
            f"SELECT t.session_id, t.role, t.text, t.ts FROM turns t JOIN ({sql}) s "
            "ON t.session_id = s.id WHERE t.tenant_id = ? ORDER BY t.session_id, t.seq",
            (*params, tenant_id),
        )
        return group_turns(sessions, rows)

    async def erase_user(
        self, tenant_id: TenantId, user_id: str, *, platform: Platform | None = None
    ) -> dict[str, int]:
        sql, params = user_sessions_query("?", tenant_id, user_id, platform)

        def op(c: sqlite3.Connection) -> tuple[list[str], int]:
            ids = [r[0] for r in c.execute(sql, params)]
            turns = 0
            for chunk in range(0, len(ids), 500):
                part = ids[chunk : chunk + 500]
                marks = ",".join("?" * len(part))
                turns += c.execute(
                    f"DELETE FROM turns WHERE tenant_id = ? AND session_id IN ({marks})",
                    (tenant_id, *part),
                ).rowcount
                c.execute(
                    f"DELETE FROM sessions WHERE tenant_id = ? AND id IN ({marks})",
                    (tenant_id, *part),
                )
                c.execute(
                    f"DELETE FROM agent_callbacks WHERE tenant_id = ? AND session_id IN ({marks})",
                    (tenant_id, *part),
                )
                c.execute(
                    f"DELETE FROM agent_state WHERE tenant_id = ? AND session_id IN ({marks})",
                    (tenant_id, *part),
                )
            return ids, turns

        ids, turns = await self._write(op, slow=True)
        for session_id in ids:
            self._forget(SessionId(session_id))
        return {"sessions": len(ids), "turns": turns}

    # Agent usage ---------------------------------------------------------------------------

    async def add_usage(
        self, tenant_id: TenantId, day: str, *, calls: int, tokens_in: int, tokens_out: int
    ) -> None:
        row = (tenant_id, day, calls, tokens_in, tokens_out)
        await self._write(lambda c: c.execute(ADD_USAGE.format(p="?"), row))

    async def usage(self, tenant_id: TenantId, first: str, last: str) -> list[UsageRecord]:
        rows = self._read(
            "SELECT day, calls, tokens_in, tokens_out FROM agent_usage "
            "WHERE tenant_id = ? AND day >= ? AND day <= ? ORDER BY day",
            (tenant_id, first, last),
        )
        return [UsageRecord(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]

    async def agent_state(self, tenant_id: TenantId, session_id: SessionId) -> str | None:
        rows = self._read(
            "SELECT value FROM agent_state WHERE tenant_id = ? AND session_id = ?",
            (tenant_id, session_id),
        )
        return str(rows[0][0]) if rows else None

    async def set_agent_state(
        self, tenant_id: TenantId, session_id: SessionId, value: str | None, *, now: float
    ) -> None:
        if value is None:
            params: tuple[Any, ...] = (tenant_id, session_id)
            await self._write(
                lambda c: c.execute(
                    "DELETE FROM agent_state WHERE tenant_id = ? AND session_id = ?", params
                )
            )
            return
        row = (tenant_id, session_id, value, now)
        await self._write(
            lambda c: c.execute(
                "INSERT INTO agent_state VALUES (?, ?, ?, ?) ON CONFLICT (tenant_id, session_id) "
                "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                row,
            )
        )

    # Agent callbacks -----------------------------------------------------------------------

    async def add_callback(
        self,
        tenant_id: TenantId,
        callback_id: str,
        session_id: SessionId,
        address: dict[str, Any] | None,
        *,
        expires_at: float,
        now: float,
    ) -> CallbackRecord:
        row = (tenant_id, callback_id, session_id, json.dumps(address) if address else None,
               now, expires_at, "pending", now)  # fmt: skip

        def op(c: sqlite3.Connection) -> tuple[Any, ...]:
            # An early row (the final arrived first) gets its session and address here.
            c.execute(
                "INSERT INTO agent_callbacks (tenant_id, id, session_id, address, created_at, "
                "expires_at, state, updated_at) VALUES (?,?,?,?,?,?,?,?) "
                "ON CONFLICT (tenant_id, id) DO UPDATE SET session_id = excluded.session_id, "
                "address = excluded.address, created_at = excluded.created_at, "
                "updated_at = excluded.updated_at",
                row,
            )
            found = c.execute(
                f"SELECT {CALLBACK_COLUMNS} FROM agent_callbacks WHERE tenant_id = ? AND id = ?",
                (tenant_id, callback_id),
            ).fetchone()
            return tuple(found)

        return callback_from_row(await self._write(op))

    async def receive_callback(
        self,
        tenant_id: TenantId,
        callback_id: str,
        text: str,
        *,
        now: float,
        final: bool = True,
        expired: bool = False,
        early_expires_at: float | None = None,
    ) -> str:
        key = (tenant_id, callback_id)

        def op(c: sqlite3.Connection) -> str:
            if not final:
                sql = (
                    "UPDATE agent_callbacks SET text = coalesce(text, '') || ?, updated_at = ? "
                    "WHERE tenant_id = ? AND id = ? AND state = 'pending'"
                )
                params: tuple[Any, ...] = (text, now, *key)
            else:
                sql = (
                    "UPDATE agent_callbacks SET state = 'received', text = ?, expired = ?, "
                    "updated_at = ? WHERE tenant_id = ? AND id = ? AND state = 'pending'"
                    + (" AND expires_at <= ?" if expired else "")
                )
                params = (text, int(expired), now, *key, *((now,) if expired else ()))
            if c.execute(sql, params).rowcount:
                return "accepted"
            found = c.execute(
                "SELECT expired FROM agent_callbacks WHERE tenant_id = ? AND id = ?", key
            ).fetchone()
            if found is not None:
                return "expired" if found[0] else "already"
            if final and not expired and early_expires_at is not None:
                c.execute(
                    "INSERT INTO agent_callbacks (tenant_id, id, session_id, created_at, "
                    "expires_at, state, text, updated_at) VALUES (?,?,'',?,?,'received',?,?)",
                    (*key, now, early_expires_at, text, now),
                )
                return "accepted"
            return "unknown"

        return await self._write(op)

    async def claim_callback(
        self, tenant_id: TenantId, callback_id: str, owner: str, *, now: float, stale_before: float
    ) -> CallbackRecord | None:
        def op(c: sqlite3.Connection) -> tuple[Any, ...] | None:
            claimed = c.execute(
                "UPDATE agent_callbacks SET state = 'delivering', owner = ?, claimed_at = ?, "
                "updated_at = ? WHERE tenant_id = ? AND id = ? AND session_id != '' AND "
                "(state = 'received' OR (state = 'delivering' AND claimed_at < ?))",
                (owner, now, now, tenant_id, callback_id, stale_before),
            ).rowcount
            if not claimed:
                return None
            found = c.execute(
                f"SELECT {CALLBACK_COLUMNS} FROM agent_callbacks WHERE tenant_id = ? AND id = ?",
                (tenant_id, callback_id),
            ).fetchone()
            return tuple(found)

        row = await self._write(op)
        return callback_from_row(row) if row is not None else None

    async def settle_callback(
        self, tenant_id: TenantId, callback_id: str, owner: str, *, delivered: bool, now: float
    ) -> None:
        params = ("delivered" if delivered else "received", now, tenant_id, callback_id, owner)
        await self._write(
            lambda c: c.execute(
                "UPDATE agent_callbacks SET state = ?, owner = NULL, updated_at = ? "
                "WHERE tenant_id = ? AND id = ? AND state = 'delivering' AND owner = ?",
                params,
            )
        )

    async def get_callback(self, tenant_id: TenantId, callback_id: str) -> CallbackRecord | None:
        rows = self._read(
            f"SELECT {CALLBACK_COLUMNS} FROM agent_callbacks WHERE tenant_id = ? AND id = ?",
            (tenant_id, callback_id),
        )
        return callback_from_row(rows[0]) if rows else None

    async def latest_callback(
        self, tenant_id: TenantId, session_id: SessionId
    ) -> CallbackRecord | None:
        rows = self._read(
            f"SELECT {CALLBACK_COLUMNS} FROM agent_callbacks WHERE tenant_id = ? "
            "AND session_id = ? ORDER BY created_at DESC LIMIT 1",
            (tenant_id, session_id),
        )
        return callback_from_row(rows[0]) if rows else None

    async def open_callbacks(self, tenant_id: TenantId) -> list[CallbackRecord]:
        rows = self._read(
            f"SELECT {CALLBACK_COLUMNS} FROM agent_callbacks WHERE tenant_id = ? "
            "AND state IN ('pending', 'received', 'delivering') AND session_id != ''",
            (tenant_id,),
        )
        return [callback_from_row(r) for r in rows]

    async def due_callbacks(
        self, tenant_id: TenantId, *, now: float, stale_before: float, limit: int = 100
    ) -> list[CallbackRecord]:
        rows = self._read(
            f"SELECT {CALLBACK_COLUMNS} FROM agent_callbacks WHERE tenant_id = ? "
            "AND session_id != '' AND ((state = 'pending' AND expires_at <= ?) "
            "OR state = 'received' OR (state = 'delivering' AND claimed_at < ?)) "
            "ORDER BY created_at LIMIT ?",
            (tenant_id, now, stale_before, limit),
        )
        return [callback_from_row(r) for r in rows]

    async def prune_callbacks(self, tenant_id: TenantId, *, before: float) -> int:
        params = (tenant_id, before, before)
        return int(
            await self._write(
                lambda c: c.execute(
                    "DELETE FROM agent_callbacks WHERE tenant_id = ? AND "
                    "((state = 'delivered' AND updated_at < ?) "
                    "OR (session_id = '' AND expires_at < ?))",
                    params,
                ).rowcount
            )
        )


def _tenant_tables(c: sqlite3.Connection) -> list[str]:
    """Every table with a tenant_id column: one added later is purged without a change here."""
    return [
        r[0]
        for r in c.execute(
            "SELECT m.name FROM sqlite_master m, pragma_table_info(m.name) p "
            "WHERE m.type = 'table' AND p.name = 'tenant_id' ORDER BY m.name"
        )
    ]
