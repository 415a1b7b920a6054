"""PostgreSQL backend: for an operator who already runs PostgreSQL and wants the state there.

One gateway process per database. Plain queries over a small psycopg connection pool in
autocommit mode; every multi-statement write runs in one explicit transaction, so a write is
durable when the call returns. No in-memory cache: the database is the only copy.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractAsyncContextManager
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

from chatgateway.errors import NotFoundError
from chatgateway.models import (
    ConversationKind,
    Platform,
    Role,
    Session,
    SessionId,
    SessionKey,
    TenantId,
    Turn,
)
from chatgateway.store.base import ApiKeyRecord, TenantRecord
from chatgateway.store.rows import (
    CLAIM_EVENT,
    DEDUP_RETENTION,
    SESSION_COLUMNS,
    key_from_row,
    list_sessions_query,
    new_session_id,
    session_from_row,
)

# The SQLite schema in PostgreSQL types; timestamps stay float seconds (double precision).
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    user_name TEXT,
    kind TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    last_active DOUBLE PRECISION NOT NULL,
    message_count BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_key
    ON sessions (tenant_id, platform, conversation_id, thread_id, user_id);
CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions (tenant_id, last_active);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    role TEXT NOT NULL,
    text TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS processed_events (
    tenant_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant_id, platform, event_id)
);
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant_id);
CREATE TABLE IF NOT EXISTS gateway_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Cluster dedup (coordination: postgres): which instance processes an event right now.
CREATE TABLE IF NOT EXISTS event_claims (
    tenant_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    event_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    claimed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant_id, platform, event_id)
);
"""

_Pool = AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]]


class PostgresStore:
    """A SessionStore on a PostgreSQL database. One instance per database, one event loop."""

    def __init__(self, dsn: SecretStr, *, min_size: int = 1, max_size: int = 8) -> None:
        self.dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._pool: _Pool | None = None

    # Lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        conninfo = self.dsn.get_secret_value()
        # A direct connection first: an unreachable server fails here with libpq's reason,
        # not with the pool's "initialization incomplete" after its timeout.
        async with await AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute(SCHEMA)
            await conn.execute(
                "DELETE FROM processed_events WHERE processed_at < %s",
                (time.time() - DEDUP_RETENTION,),
            )
        pool: _Pool = AsyncConnectionPool(
            conninfo,
            min_size=self._min_size,
            max_size=self._max_size,
            kwargs={"autocommit": True},
            open=False,
            name="chatgateway-store",
        )
        await pool.open(wait=True)
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _connection(self) -> AbstractAsyncContextManager[AsyncConnection[tuple[Any, ...]]]:
        if self._pool is None:
            raise RuntimeError("store is closed")
        return self._pool.connection()

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            cur = await conn.execute(sql, params)
            rows: list[tuple[Any, ...]] = await cur.fetchall()
            return rows

    async def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run one statement (its own transaction); return the number of rows it touched."""
        async with self._connection() as conn:
            cur = await conn.execute(sql, params)
            return int(cur.rowcount)

    # Sessions ------------------------------------------------------------------------------

    async def find_active_session(self, key: SessionKey, *, idle_since: float) -> Session | None:
        rows = await self._read(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant_id = %s AND platform = %s "
            "AND conversation_id = %s AND thread_id = %s AND user_id = %s AND last_active >= %s "
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
        return session_from_row(rows[0]) if rows else None

    async def get_session(self, tenant_id: TenantId, session_id: SessionId) -> Session | None:
        rows = await self._read(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = %s AND tenant_id = %s",
            (session_id, tenant_id),
        )
        return session_from_row(rows[0]) if rows else None

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
        await self._write(
            f"INSERT INTO sessions ({SESSION_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
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
            ),
        )
        return session

    async def record_exchange(
        self,
        tenant_id: TenantId,
        session_id: SessionId,
        turns: list[Turn],
        *,
        max_turns: int,
        processed_event: tuple[Platform, str] | None = None,
    ) -> None:
        last_active = max(t.timestamp for t in turns) if turns else time.time()
        async with self._connection() as conn, conn.transaction():
            # The update locks the session row, so concurrent exchanges of one session take
            # their turn numbers one after the other.
            cur = await conn.execute(
                "UPDATE sessions SET message_count = message_count + %s, "
                "last_active = GREATEST(last_active, %s) "
                "WHERE id = %s AND tenant_id = %s RETURNING message_count",
                (len(turns), last_active, session_id, tenant_id),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFoundError(f"no session {session_id!r}")
            count = int(row[0])
            first = count - len(turns) + 1
            if turns:
                async with conn.cursor() as c:
                    await c.executemany(
                        "INSERT INTO turns (tenant_id, session_id, seq, role, text, ts) "
                        "VALUES (%s, %s, %s, %s, %s, %s)",
                        [
                            (tenant_id, session_id, first + i, t.role.value, t.text, t.timestamp)
                            for i, t in enumerate(turns)
                        ],
                    )
            if processed_event is not None:
                await conn.execute(
                    "INSERT INTO processed_events VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (tenant_id, processed_event[0].value, processed_event[1], time.time()),
                )
            if count > max_turns:
                await conn.execute(
                    "DELETE FROM turns WHERE session_id = %s AND tenant_id = %s AND seq <= %s",
                    (session_id, tenant_id, count - max_turns),
                )

    async def history(self, tenant_id: TenantId, session_id: SessionId, limit: int) -> list[Turn]:
        if limit <= 0:
            return []
        rows = await self._read(
            "SELECT role, text, ts FROM turns WHERE session_id = %s AND tenant_id = %s "
            "ORDER BY seq DESC LIMIT %s",
            (session_id, tenant_id, limit),
        )
        return [Turn(Role(r[0]), r[1], r[2]) for r in reversed(rows)]

    async def list_sessions(
        self,
        tenant_id: TenantId,
        *,
        user_id: str | None = None,
        platform: Platform | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Session]:
        sql, params = list_sessions_query("%s", tenant_id, user_id, platform, limit, offset)
        return [session_from_row(r) for r in await self._read(sql, params)]

    async def delete_session(self, tenant_id: TenantId, session_id: SessionId) -> bool:
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(
                "DELETE FROM sessions WHERE id = %s AND tenant_id = %s", (session_id, tenant_id)
            )
            if cur.rowcount == 0:
                return False
            await conn.execute(
                "DELETE FROM turns WHERE session_id = %s AND tenant_id = %s",
                (session_id, tenant_id),
            )
            return True

    async def count_sessions(self, tenant_id: TenantId, *, active_since: float = 0.0) -> int:
        rows = await self._read(
            "SELECT count(*) FROM sessions WHERE tenant_id = %s AND last_active >= %s",
            (tenant_id, active_since),
        )
        return int(rows[0][0])

    async def count_sessions_by_platform(
        self, tenant_id: TenantId, *, active_since: float = 0.0
    ) -> dict[Platform, int]:
        rows = await self._read(
            "SELECT platform, count(*) FROM sessions WHERE tenant_id = %s AND last_active >= %s "
            "GROUP BY platform",
            (tenant_id, active_since),
        )
        return {Platform(r[0]): int(r[1]) for r in rows}

    async def prune(self, tenant_id: TenantId, *, idle_before: float) -> int:
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(
                "DELETE FROM sessions WHERE tenant_id = %s AND last_active < %s RETURNING id",
                (tenant_id, idle_before),
            )
            ids = [r[0] for r in await cur.fetchall()]
            if ids:
                await conn.execute(
                    "DELETE FROM turns WHERE tenant_id = %s AND session_id = ANY(%s)",
                    (tenant_id, ids),
                )
            return len(ids)

    # Processed events ----------------------------------------------------------------------

    async def is_processed(self, tenant_id: TenantId, platform: Platform, event_id: str) -> bool:
        rows = await self._read(
            "SELECT 1 FROM processed_events "
            "WHERE tenant_id = %s AND platform = %s AND event_id = %s",
            (tenant_id, platform.value, event_id),
        )
        return bool(rows)

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
        async with self._connection() as conn:
            cur = await conn.execute(CLAIM_EVENT.format(p="%s"), params)
            return bool(await cur.fetchall())

    # Runtime tenants -----------------------------------------------------------------------

    async def list_tenants(self) -> list[TenantRecord]:
        rows = await self._read(
            "SELECT tenant_id, spec, created_at, updated_at FROM tenants ORDER BY tenant_id", ()
        )
        return [TenantRecord(TenantId(r[0]), json.loads(r[1]), r[2], r[3]) for r in rows]

    async def save_tenant(self, record: TenantRecord) -> None:
        await self._write(
            "INSERT INTO tenants VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id) DO UPDATE SET "
            "spec = excluded.spec, updated_at = excluded.updated_at",
            (record.tenant_id, json.dumps(record.spec), record.created_at, record.updated_at),
        )

    async def delete_tenant(self, tenant_id: TenantId) -> None:
        async with self._connection() as conn, conn.transaction():
            for table in (
                "tenants", "api_keys", "sessions", "turns", "processed_events", "event_claims"
            ):
                await conn.execute(f"DELETE FROM {table} WHERE tenant_id = %s", (tenant_id,))

    # API keys ------------------------------------------------------------------------------

    async def add_api_key(self, record: ApiKeyRecord) -> None:
        await self._write(
            "INSERT INTO api_keys VALUES (%s, %s, %s, %s, %s)",
            (record.key_id, record.tenant_id, record.key_hash, record.label, record.created_at),
        )

    async def find_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = await self._read(
            "SELECT key_id, tenant_id, key_hash, label, created_at FROM api_keys "
            "WHERE key_id = %s",
            (key_id,),
        )
        return key_from_row(rows[0]) if rows else None

    async def list_api_keys(self, tenant_id: TenantId) -> list[ApiKeyRecord]:
        rows = await self._read(
            "SELECT key_id, tenant_id, key_hash, label, created_at FROM api_keys "
            "WHERE tenant_id = %s ORDER BY created_at",
            (tenant_id,),
        )
        return [key_from_row(r) for r in rows]

    async def delete_api_key(self, tenant_id: TenantId, key_id: str) -> bool:
        deleted = await self._write(
            "DELETE FROM api_keys WHERE key_id = %s AND tenant_id = %s", (key_id, tenant_id)
        )
        return deleted > 0

    # Gateway-wide settings -----------------------------------------------------------------

    async def gateway_setting(self, name: str, default: str) -> str:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO gateway_settings VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (name, default),
            )
            cur = await conn.execute("SELECT value FROM gateway_settings WHERE name = %s", (name,))
            row = await cur.fetchone()
            assert row is not None  # inserted above, and settings are never deleted
            return str(row[0])
