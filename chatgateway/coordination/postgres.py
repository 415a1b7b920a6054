"""Coordination of several gateway instances on one PostgreSQL database.

Session locks are PostgreSQL session-level advisory locks, taken with `pg_try_advisory_lock`
on a few dedicated connections: one connection holds any number of locks, so an agent call
holds no pooled connection, and a lock held by a crashed instance vanishes with its
connection. A `KeyedLocks` in front queues one instance's messages of a session locally (FIFO),
so each instance holds at most one PostgreSQL lock per session and only contends with other
instances; the takes and releases of concurrent messages share statements. Change notices go
through LISTEN/NOTIFY on one more dedicated connection, which reconnects with backoff when it
drops and then delivers `{"kind": "resync"}` (anything may have changed while it was away).
Instances share locks and notices when they use the same database and schema
(`current_schema()`), so two deployments in two schemas stay apart. Leases (e.g. one Discord
bot's connection) are in `try_lease`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
import psycopg
import structlog
from psycopg import AsyncConnection, sql
from pydantic import SecretStr

from chatgateway.coordination.base import ChangeListener, Lease
from chatgateway.coordination.local import new_instance_id
from chatgateway.coordination.pg_lease import PgLeases
from chatgateway.pipeline import KeyedLocks

log = structlog.get_logger("chatgateway.coordination")

_Conn = AsyncConnection[tuple[Any, ...]]

#: Dedicated connections that hold session locks (a lock always lives on the same one).
LOCK_CONNECTIONS = 2
#: Polling interval bounds while another instance holds a session's lock (seconds).
LOCK_POLL_MIN = 0.002
LOCK_POLL_MAX = 0.05
#: Reconnect backoff bounds of the notice listener and the lock connections (seconds).
RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0
#: The notice that tells listeners to reload everything (after the listener reconnected).
RESYNC: dict[str, Any] = {"kind": "resync"}


def lock_id(namespace: str, key: Hashable) -> int:
    """The signed 64-bit advisory-lock id of `key` (stable across processes)."""
    digest = hashlib.blake2b(f"{namespace}\x00{key!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def channel_name(schema: str) -> str:
    """The NOTIFY channel of the deployment in `schema` (identifiers are at most 63 bytes)."""
    if schema == "public":
        return "chatgateway"
    return "chatgateway_" + hashlib.blake2b(schema.encode(), digest_size=8).hexdigest()


@dataclass(slots=True)
class _LockOp:
    """A take (`conn` None) or a release (on `conn`) of advisory lock `lid`."""

    lid: int
    conn: _Conn | None
    #: None for a release nobody waits for (a take whose waiter was cancelled).
    done: asyncio.Future[_Conn | None] | None


class _LockConnection:
    """One dedicated autocommit connection holding advisory locks; reconnects on demand.

    The takes and releases queued while a statement is in flight go out together as the next
    one (`SELECT pg_advisory_unlock(..), pg_try_advisory_lock(..), ...`): under load a message
    costs a fraction of a round trip instead of two.
    """

    def __init__(self, conninfo: str, index: int) -> None:
        self._conninfo = conninfo
        self.index = index
        self.conn: _Conn | None = None
        self._connecting = asyncio.Lock()
        self._pending: list[_LockOp] = []
        self._flusher: asyncio.Task[None] | None = None

    def take(self, lid: int) -> asyncio.Future[_Conn | None]:
        """Try to take `lid`: the connection now holding it, or None if another session has it."""
        return self._submit(lid, None)

    def release(self, lid: int, conn: _Conn) -> asyncio.Future[_Conn | None]:
        """Release `lid`, taken on `conn` (nothing to do if that connection is gone)."""
        return self._submit(lid, conn)

    def release_later(self, lid: int, conn: _Conn) -> None:
        """Queue a release nobody waits for."""
        self._pending.append(_LockOp(lid, conn, None))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="coordination:locks")

    def _submit(self, lid: int, conn: _Conn | None) -> asyncio.Future[_Conn | None]:
        done: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
        self._pending.append(_LockOp(lid, conn, done))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="coordination:locks")
        return done

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._run(batch)
        finally:
            self._flusher = None

    async def _run(self, batch: list[_LockOp]) -> None:
        try:
            conn = await self.get()
        except Exception as exc:
            _fail(batch, exc)
            return
        # A release for a connection that has since dropped: the server released it with it.
        releases = [op for op in batch if op.conn is not None and op.conn is conn]
        for op in batch:
            if op.conn is not None and op.conn is not conn:
                _resolve(op, None)
        takes = [op for op in batch if op.conn is None]
        ops = releases + takes  # releases first: a waiting instance gets its turn sooner
        if not ops:
            return
        calls = ["pg_advisory_unlock(%s)"] * len(releases) + ["pg_try_advisory_lock(%s)"] * len(
            takes
        )
        try:
            cur = await conn.execute(f"SELECT {', '.join(calls)}", [op.lid for op in ops])
            row = await cur.fetchone()
        except Exception as exc:
            _fail(ops, exc)
            return
        assert row is not None
        for op in releases:
            _resolve(op, None)
        for op, taken in zip(takes, row[len(releases) :], strict=True):
            if op.done is not None and op.done.cancelled():
                if taken:  # its waiter gave up: a lock nobody would release
                    self.release_later(op.lid, conn)
            else:
                _resolve(op, conn if taken else None)

    async def get(self) -> _Conn:
        conn = self.conn
        if conn is not None and not conn.closed:
            return conn
        async with self._connecting:
            if self.conn is not None and not self.conn.closed:
                return self.conn
            if self.conn is not None:
                # Its locks went with it: another instance may now hold those sessions.
                log.warning("session_lock_connection_lost", index=self.index)
            self.conn = await AsyncConnection.connect(self._conninfo, autocommit=True)
            return self.conn

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        _fail(self._pending, psycopg.OperationalError("coordinator closed"))
        self._pending = []
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


def _resolve(op: _LockOp, result: _Conn | None) -> None:
    if op.done is not None and not op.done.done():
        op.done.set_result(result)


def _fail(ops: list[_LockOp], exc: BaseException) -> None:
    for op in ops:
        if op.done is not None and not op.done.done():
            op.done.set_exception(exc)


class _PgSessionLock:
    """The async context manager `PostgresCoordinator.session_lock` returns."""

    __slots__ = ("_conn", "_coordinator", "_id", "_key")

    def __init__(self, coordinator: PostgresCoordinator, key: Hashable) -> None:
        self._coordinator = coordinator
        self._key = key
        self._id = 0
        self._conn: _Conn | None = None

    async def __aenter__(self) -> None:
        coordinator = self._coordinator
        await coordinator._local.acquire(self._key)
        try:
            self._id = lock_id(coordinator._namespace, self._key)
            self._conn = await coordinator._pg_lock(self._id)
        except BaseException:
            coordinator._local.release(self._key)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._conn is not None:
                await self._coordinator._pg_unlock(self._conn, self._id)
        finally:
            self._coordinator._local.release(self._key)


class PostgresCoordinator:
    """Coordination across every instance that shares one PostgreSQL database (and schema)."""

    def __init__(
        self,
        dsn: SecretStr,
        *,
        instance_id: str | None = None,
        lock_connections: int = LOCK_CONNECTIONS,
    ) -> None:
        self.instance_id = instance_id or new_instance_id()
        self.dsn = dsn
        self._conninfo = dsn.get_secret_value()
        self._lock_conns = [_LockConnection(self._conninfo, i) for i in range(lock_connections)]
        self._local = KeyedLocks()
        self._listeners: list[ChangeListener] = []
        self._namespace = ""
        self._channel = ""
        self._listen_task: asyncio.Task[None] | None = None
        #: Set while the notice listener is connected and listening.
        self.listening = asyncio.Event()
        #: The listener's current connection (tests close it to check the reconnect).
        self.listen_conn: _Conn | None = None
        self._closed = False
        self._leases = PgLeases(self._conninfo, self.instance_id)

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, and return once change notices are being received."""
        conn = await self._lock_conns[0].get()
        cur = await conn.execute("SELECT current_schema()")
        row = await cur.fetchone()
        self._namespace = str(row[0]) if row else "public"
        self._channel = channel_name(self._namespace)
        self._listen_task = asyncio.create_task(self._listen_loop(), name="coordination:listen")
        waiter = asyncio.create_task(self.listening.wait())
        done, _ = await asyncio.wait({waiter, self._listen_task}, return_when="FIRST_COMPLETED")
        waiter.cancel()
        if self._listen_task in done:
            self._listen_task.result()  # raises the listener's error
        await self._leases.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listen_task is not None:
            self._listen_task.cancel()
            await asyncio.gather(self._listen_task, return_exceptions=True)
        try:
            await self._leases.close()  # released, so other instances take over at once
        except Exception as exc:
            log.warning("coordination_close_failed", error=f"{type(exc).__name__}: {exc}")
        # Closing the connections releases every advisory lock this instance still holds.
        for lock_conn in self._lock_conns:
            try:
                await lock_conn.close()
            except Exception as exc:
                log.warning("coordination_close_failed", error=f"{type(exc).__name__}: {exc}")

    # Session locks --------------------------------------------------------------------------

    def session_lock(self, key: Hashable) -> _PgSessionLock:
        return _PgSessionLock(self, key)

    async def _pg_lock(self, lid: int) -> _Conn:
        """Take the advisory lock `lid`, polling while another instance holds it."""
        holder = self._lock_conns[lid % len(self._lock_conns)]
        delay = LOCK_POLL_MIN
        while True:
            taking = holder.take(lid)
            try:
                conn = await taking
            except asyncio.CancelledError:
                # Granted just before the cancellation arrived: give it back. (A take cancelled
                # while queued or in flight is given back by the holder.)
                if taking.done() and not taking.cancelled() and taking.exception() is None:
                    granted = taking.result()
                    if granted is not None:
                        holder.release_later(lid, granted)
                raise
            except psycopg.OperationalError as exc:
                log.warning("session_lock_failed", error=str(exc), retry_in=RECONNECT_MIN)
                await asyncio.sleep(RECONNECT_MIN)
                continue
            if conn is not None:
                return conn
            await asyncio.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX)

    async def _pg_unlock(self, conn: _Conn, lid: int) -> None:
        holder = self._lock_conns[lid % len(self._lock_conns)]
        try:
            # Sent even if this waiter is cancelled meanwhile: the release is already queued.
            await holder.release(lid, conn)
        except psycopg.OperationalError as exc:
            log.warning("session_unlock_failed", error=str(exc))

    # Leases ---------------------------------------------------------------------------------

    async def try_lease(self, name: str, *, ttl: float) -> Lease | None:
        """A row in `leases` with an expiry (coordination.pg_lease explains why not a lock)."""
        return await self._leases.try_lease(name, ttl=ttl)

    def lease_holder(self, name: str) -> str | None:
        """Which instance held `name` when this one last failed to take it."""
        return self._leases.holder(name)

    # Change notices -------------------------------------------------------------------------

    async def publish(self, payload: dict[str, Any]) -> None:
        """NOTIFY every instance (this one too); retried once on a fresh connection."""
        text = orjson.dumps(payload).decode()
        for attempt in range(2):
            try:
                conn = await self._lock_conns[0].get()
                await conn.execute("SELECT pg_notify(%s, %s)", (self._channel, text))
                return
            except psycopg.OperationalError:
                if attempt:
                    raise

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    async def _deliver(self, payload: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                await listener(payload)
            except Exception:
                log.exception("change_listener_failed", kind=payload.get("kind"))

    async def _listen_loop(self) -> None:
        delay = RECONNECT_MIN
        connected_before = False
        while True:
            try:
                async with await AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as conn:
                    self.listen_conn = conn
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    self.listening.set()
                    delay = RECONNECT_MIN
                    if connected_before:
                        log.info("change_listener_reconnected")
                        # Notices sent while we were away are gone: reload everything.
                        await self._deliver(dict(RESYNC))
                    connected_before = True
                    async for notice in conn.notifies():
                        try:
                            payload = orjson.loads(notice.payload)
                        except orjson.JSONDecodeError:
                            log.warning("change_notice_invalid")
                            continue
                        if isinstance(payload, dict):
                            await self._deliver(payload)
            except psycopg.Error as exc:
                if not connected_before:
                    raise  # at start: the caller reports why it cannot connect
                self.listening.clear()
                self.listen_conn = None
                wait = delay * random.uniform(0.5, 1.0)
                log.warning(
                    "change_listener_disconnected", error=str(exc), retry_in=round(wait, 2)
                )
                await asyncio.sleep(wait)
                delay = min(delay * 2, RECONNECT_MAX)
            else:
                # notifies() ended without an error: the connection was closed under us.
                self.listening.clear()
                self.listen_conn = None
                await asyncio.sleep(delay)
