"""PostgreSQL backend: for an operator who already runs PostgreSQL and wants the state there.

Plain queries over a small psycopg connection pool in autocommit mode; every multi-statement
write runs in one explicit transaction, so a write is durable when the call returns. No in-memory
cache: the database is the only copy.

Row-level security (migration 2) shows a transaction only the rows of the tenant it names with
`set_config('chatgateway.tenant', ..., true)`. A query and its set_config go in one simple-query
message (client-side binding; PostgreSQL runs the statements of one message as one transaction),
so scoping costs no extra round trip. The three queries that span tenants by design set a narrow
scope instead: see `find_api_key`, `list_tenants` and the expiry in `open`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
import psycopg.sql
import structlog
from psycopg import AsyncClientCursor, AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

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
from chatgateway.store.migrations import MigrateMode, SchemaError, SchemaStatus, refusal
from chatgateway.store.migrations import postgres as migrations
from chatgateway.store.migrations.postgres import KEY_ID_SETTING, SCOPE_SETTING, TENANT_SETTING
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

log = structlog.get_logger("chatgateway.store")

#: Prefixed to a query: the first statement of its transaction names whom it is for.
_SET = "SELECT set_config(%s, %s, true); "
_SET_ALONE = "SELECT set_config(%s, %s, true)"

_Pool = AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]]


class PostgresStore:
    """A SessionStore on a PostgreSQL database. One instance per database, one event loop."""

    def __init__(
        self,
        dsn: SecretStr,
        *,
        owner_dsn: SecretStr | None = None,
        migrate: MigrateMode = "auto",
        min_size: int = 1,
        max_size: int = 8,
    ) -> None:
        self.dsn = dsn
        self.owner_dsn = owner_dsn
        self.migrate: MigrateMode = migrate
        #: Where the schema stood once open() had applied what it may.
        self.schema: SchemaStatus | None = None
        self._min_size = min_size
        self._max_size = max_size
        self._pool: _Pool | None = None

    # Lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        conninfo = self.dsn.get_secret_value()
        # A direct connection first: an unreachable server fails here with libpq's reason,
        # not with the pool's "initialization incomplete" after its timeout.
        async with await AsyncConnection.connect(conninfo, autocommit=True) as conn:
            self.schema = await self._ensure_schema(conn)
            # Forgetting old event ids spans tenants: the "expiry" scope lets this one
            # transaction see and delete them, and nothing else.
            async with conn.transaction():
                await conn.execute("SELECT set_config(%s, 'expiry', true)", (SCOPE_SETTING,))
                await conn.execute(
                    "DELETE FROM processed_events WHERE processed_at < %s",
                    (time.time() - DEDUP_RETENTION,),
                )
                await conn.execute(
                    "DELETE FROM event_claims WHERE claimed_at < %s",
                    (time.time() - DEDUP_RETENTION,),
                )
        pool: _Pool = AsyncConnectionPool(
            conninfo,
            min_size=self._min_size,
            max_size=self._max_size,
            # Client-side binding lets a query travel with its set_config in one message.
            kwargs={"autocommit": True, "cursor_factory": AsyncClientCursor},
            open=False,
            name="chatgateway-store",
        )
        await pool.open(wait=True)
        self._pool = pool

    async def _ensure_schema(self, conn: AsyncConnection[tuple[Any, ...]]) -> SchemaStatus:
        """Apply pending migrations (as the owner) if allowed; refuse a schema we cannot use."""
        status = await migrations.status(conn)
        error = refusal(status, self.migrate)
        if error is not None:
            raise error
        if status.pending:
            runtime_role = str(status.details["role"])
            try:
                if self.owner_dsn is None:
                    await migrations.migrate(conn, runtime_role=runtime_role)
                else:
                    owner = self.owner_dsn.get_secret_value()
                    async with await AsyncConnection.connect(owner, autocommit=True) as as_owner:
                        await migrations.migrate(as_owner, runtime_role=runtime_role)
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.InvalidSchemaName) as exc:
                who = "storage.owner_dsn's role" if self.owner_dsn else f"role {runtime_role}"
                raise SchemaError(
                    f"the database schema is at version {status.current}, this chatgateway needs "
                    f"version {status.latest}, and {who} may not apply migrations "
                    f"({str(exc).splitlines()[0]}): set storage.owner_dsn to the tables' owner, "
                    "or run `chatgateway db migrate --config <file>` as the owner"
                ) from exc
            status = await migrations.status(conn)
            log.info("storage_migrated", backend="postgres", version=status.current)
        if not status.details["rls_applies"]:
            # Not fatal (a single superuser role works), but isolation then rests on the
            # queries alone: say so once.
            log.warning(
                "storage_rls_bypassed",
                role=status.details["role"],
                superuser=status.details["superuser"],
                bypassrls=status.details["bypassrls"],
            )
        return status

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _connection(self) -> AbstractAsyncContextManager[AsyncConnection[tuple[Any, ...]]]:
        if self._pool is None:
            raise RuntimeError("store is closed")
        return self._pool.connection()

    async def _read(
        self, tenant_id: str, sql: str, params: tuple[Any, ...], *, setting: str = TENANT_SETTING
    ) -> list[tuple[Any, ...]]:
        """Run `sql` in a transaction for `tenant_id` (or another `setting`); its rows."""
        async with self._connection() as conn:
            cur = await conn.execute(_SET + sql, (setting, tenant_id, *params))
            cur.nextset()
            rows: list[tuple[Any, ...]] = await cur.fetchall()
            return rows

    async def _write(self, tenant_id: str, sql: str, params: tuple[Any, ...]) -> int:
        """Run one statement in a transaction for `tenant_id`; the number of rows it touched."""
        async with self._connection() as conn:
            cur = await conn.execute(_SET + sql, (TENANT_SETTING, tenant_id, *params))
            cur.nextset()
            return int(cur.rowcount)

    @asynccontextmanager
    async def _transaction(self, tenant_id: str) -> AsyncIterator[AsyncConnection[Any]]:
        """A transaction that sees and writes only `tenant_id`'s rows."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_SET_ALONE, (TENANT_SETTING, tenant_id))
            yield conn

    # Sessions ------------------------------------------------------------------------------

    async def find_active_session(self, key: SessionKey, *, idle_since: float) -> Session | None:
        rows = await self._read(
            key.tenant_id,
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
            tenant_id,
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
            key.tenant_id,
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
        keep_answer: bool = False,
    ) -> None:
        last_active = max(t.timestamp for t in turns) if turns else time.time()
        async with self._connection() as conn, conn.transaction():
            # The update locks the session row, so concurrent exchanges of one session take
            # their turn numbers one after the other. It travels with the tenant's set_config.
            cur = await conn.execute(
                _SET + "UPDATE sessions SET message_count = message_count + %s, "
                "last_active = GREATEST(last_active, %s) "
                "WHERE id = %s AND tenant_id = %s RETURNING message_count",
                (TENANT_SETTING, tenant_id, len(turns), last_active, session_id, tenant_id),
            )
            cur.nextset()
            row = await cur.fetchone()
            if row is None:
                raise NotFoundError(f"no session {session_id!r}")
            count = int(row[0])
            first = count - len(turns) + 1
            # The rest in one message: the turns, the event, the trim.
            statements: list[str] = []
            params: list[Any] = []
            if turns:
                statements.append(
                    "INSERT INTO turns (tenant_id, session_id, seq, role, text, ts) VALUES "
                    + ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(turns))
                )
                for i, t in enumerate(turns):
                    row = (tenant_id, session_id, first + i, t.role.value, stored_text(t))
                    params += (*row, t.timestamp)
            if processed_event is not None:
                statements.append(
                    "INSERT INTO processed_events (tenant_id, platform, event_id, processed_at, "
                    "session_id, answer_seq) VALUES (%s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING"
                )
                answer = answer_seq(turns, first) if keep_answer else None
                params += (tenant_id, processed_event[0].value, processed_event[1], time.time(),
                           session_id if answer is not None else None, answer)  # fmt: skip
            if count > max_turns:
                statements.append(
                    "DELETE FROM turns WHERE session_id = %s AND tenant_id = %s AND seq <= %s"
                )
                params += (session_id, tenant_id, count - max_turns)
            if statements:
                await conn.execute("; ".join(statements), params)

    async def history(self, tenant_id: TenantId, session_id: SessionId, limit: int) -> list[Turn]:
        if limit <= 0:
            return []
        rows = await self._read(
            tenant_id,
            "SELECT role, text, ts FROM turns WHERE session_id = %s AND tenant_id = %s "
            "ORDER BY seq DESC LIMIT %s",
            (session_id, tenant_id, limit),
        )
        return [stored_turn(r[0], r[1], r[2]) for r in reversed(rows)]

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
        return [session_from_row(r) for r in await self._read(tenant_id, sql, params)]

    async def delete_session(self, tenant_id: TenantId, session_id: SessionId) -> bool:
        async with self._transaction(tenant_id) as conn:
            cur = await conn.execute(
                "DELETE FROM sessions WHERE id = %s AND tenant_id = %s", (session_id, tenant_id)
            )
            if cur.rowcount == 0:
                return False
            await conn.execute(
                "DELETE FROM turns WHERE session_id = %s AND tenant_id = %s",
                (session_id, tenant_id),
            )
            await conn.execute(  # and the late answers it was owed (their text with them)
                "DELETE FROM agent_callbacks WHERE session_id = %s AND tenant_id = %s",
                (session_id, tenant_id),
            )
            await conn.execute(  # and what its agent protocol kept for it (an open A2A task)
                "DELETE FROM agent_state WHERE session_id = %s AND tenant_id = %s",
                (session_id, tenant_id),
            )
            return True

    async def count_sessions(self, tenant_id: TenantId, *, active_since: float = 0.0) -> int:
        rows = await self._read(
            tenant_id,
            "SELECT count(*) FROM sessions WHERE tenant_id = %s AND last_active >= %s",
            (tenant_id, active_since),
        )
        return int(rows[0][0])

    async def count_sessions_by_platform(
        self, tenant_id: TenantId, *, active_since: float = 0.0
    ) -> dict[Platform, int]:
        rows = await self._read(
            tenant_id,
            "SELECT platform, count(*) FROM sessions WHERE tenant_id = %s AND last_active >= %s "
            "GROUP BY platform",
            (tenant_id, active_since),
        )
        return {Platform(r[0]): int(r[1]) for r in rows}

    async def prune(self, tenant_id: TenantId, *, idle_before: float) -> int:
        async with self._transaction(tenant_id) as conn:
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
                for table in ("agent_state", "agent_callbacks"):
                    await conn.execute(
                        f"DELETE FROM {table} WHERE tenant_id = %s AND session_id = ANY(%s)",
                        (tenant_id, ids),
                    )
            return len(ids)

    # Processed events ----------------------------------------------------------------------

    async def is_processed(self, tenant_id: TenantId, platform: Platform, event_id: str) -> bool:
        rows = await self._read(
            tenant_id,
            "SELECT 1 FROM processed_events "
            "WHERE tenant_id = %s AND platform = %s AND event_id = %s",
            (tenant_id, platform.value, event_id),
        )
        return bool(rows)

    async def processed_answer(
        self, tenant_id: TenantId, platform: Platform, event_id: str
    ) -> tuple[SessionId, Turn] | None:
        rows = await self._read(
            tenant_id, PROCESSED_ANSWER.format(p="%s"), (tenant_id, platform.value, event_id)
        )
        return answer_from_row(rows[0]) if rows else None

    async def answer_posted(self, tenant_id: TenantId, platform: Platform, event_id: str) -> None:
        await self._write(
            tenant_id, ANSWER_POSTED.format(p="%s"), (tenant_id, platform.value, event_id)
        )

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
        return bool(await self._read(tenant_id, CLAIM_EVENT.format(p="%s"), params))

    # Runtime tenants -----------------------------------------------------------------------

    async def list_tenants(self) -> list[TenantRecord]:
        # Spans tenants by design (the admin API's list, the registry's start-up): the
        # "registry" scope shows this query every runtime tenant's row, and nothing else.
        rows = await self._read(
            "registry",
            "SELECT tenant_id, spec, created_at, updated_at FROM tenants ORDER BY tenant_id",
            (),
            setting=SCOPE_SETTING,
        )
        return [TenantRecord(TenantId(r[0]), json.loads(r[1]), r[2], r[3]) for r in rows]

    async def save_tenant(self, record: TenantRecord) -> None:
        await self._write(
            record.tenant_id,
            "INSERT INTO tenants VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id) DO UPDATE SET "
            "spec = excluded.spec, updated_at = excluded.updated_at",
            (record.tenant_id, json.dumps(record.spec), record.created_at, record.updated_at),
        )

    async def delete_tenant(self, tenant_id: TenantId) -> None:
        async with self._transaction(tenant_id) as conn:
            for table in (
                "tenants", "api_keys", "sessions", "turns", "processed_events", "event_claims",
                "agent_state", "agent_callbacks",
            ):
                await conn.execute(f"DELETE FROM {table} WHERE tenant_id = %s", (tenant_id,))

    # API keys ------------------------------------------------------------------------------

    async def add_api_key(self, record: ApiKeyRecord) -> None:
        await self._write(
            record.tenant_id,
            "INSERT INTO api_keys VALUES (%s, %s, %s, %s, %s)",
            (record.key_id, record.tenant_id, record.key_hash, record.label, record.created_at),
        )

    async def find_api_key(self, key_id: str) -> ApiKeyRecord | None:
        # Authentication looks the key up before its tenant is known: the key_lookup policy
        # shows this transaction the one row whose id it names.
        rows = await self._read(
            key_id,
            "SELECT key_id, tenant_id, key_hash, label, created_at FROM api_keys "
            "WHERE key_id = %s",
            (key_id,),
            setting=KEY_ID_SETTING,
        )
        return key_from_row(rows[0]) if rows else None

    async def list_api_keys(self, tenant_id: TenantId) -> list[ApiKeyRecord]:
        rows = await self._read(
            tenant_id,
            "SELECT key_id, tenant_id, key_hash, label, created_at FROM api_keys "
            "WHERE tenant_id = %s ORDER BY created_at",
            (tenant_id,),
        )
        return [key_from_row(r) for r in rows]

    async def delete_api_key(self, tenant_id: TenantId, key_id: str) -> bool:
        deleted = await self._write(
            tenant_id,
            "DELETE FROM api_keys WHERE key_id = %s AND tenant_id = %s",
            (key_id, tenant_id),
        )
        return deleted > 0

    # Gateway-wide settings -----------------------------------------------------------------

    async def gateway_setting(self, name: str, default: str) -> str:
        # Not tenant data: gateway_settings has no row-level security.
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO gateway_settings VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (name, default),
            )
            cur = await conn.execute("SELECT value FROM gateway_settings WHERE name = %s", (name,))
            row = await cur.fetchone()
            assert row is not None  # inserted above, and settings are never deleted
            return str(row[0])

    # Customers' data -----------------------------------------------------------------------

    async def purge_tenant(self, tenant_id: TenantId) -> dict[str, int]:
        async with self._transaction(tenant_id) as conn:
            # Every table with a tenant_id: one added later is purged without a change here.
            cur = await conn.execute(
                "SELECT c.table_name FROM information_schema.columns c "
                "JOIN information_schema.tables t USING (table_schema, table_name) "
                "WHERE c.table_schema = current_schema() AND c.column_name = 'tenant_id' "
                "AND t.table_type = 'BASE TABLE' ORDER BY c.table_name"
            )
            deleted: dict[str, int] = {}
            for (table,) in await cur.fetchall():
                done = await conn.execute(
                    psycopg.sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(
                        psycopg.sql.Identifier(table)
                    ),
                    (tenant_id,),
                )
                deleted[table] = done.rowcount
            return deleted

    async def export_user(
        self, tenant_id: TenantId, user_id: str, *, platform: Platform | None = None
    ) -> list[SessionTranscript]:
        sql, params = user_sessions_query("%s", tenant_id, user_id, platform)
        async with self._transaction(tenant_id) as conn:
            cur = await conn.execute(sql, params)
            sessions = [session_from_row(r) for r in await cur.fetchall()]
            cur = await conn.execute(
                f"SELECT t.session_id, t.role, t.text, t.ts FROM turns t JOIN ({sql}) s "
                "ON t.session_id = s.id WHERE t.tenant_id = %s ORDER BY t.session_id, t.seq",
                (*params, tenant_id),
            )
            return group_turns(sessions, await cur.fetchall())

    async def erase_user(
        self, tenant_id: TenantId, user_id: str, *, platform: Platform | None = None
    ) -> dict[str, int]:
        sql, params = user_sessions_query("%s", tenant_id, user_id, platform)
        async with self._transaction(tenant_id) as conn:
            cur = await conn.execute(
                f"DELETE FROM sessions WHERE tenant_id = %s AND id IN (SELECT id FROM ({sql}) s) "
                "RETURNING id",
                (tenant_id, *params),
            )
            ids = [r[0] for r in await cur.fetchall()]
            turns = 0
            if ids:
                done = await conn.execute(
                    "DELETE FROM turns WHERE tenant_id = %s AND session_id = ANY(%s)",
                    (tenant_id, ids),
                )
                turns = done.rowcount
                await conn.execute(
                    "DELETE FROM agent_callbacks WHERE tenant_id = %s AND session_id = ANY(%s)",
                    (tenant_id, ids),
                )
                await conn.execute(
                    "DELETE FROM agent_state WHERE tenant_id = %s AND session_id = ANY(%s)",
                    (tenant_id, ids),
                )
            return {"sessions": len(ids), "turns": turns}

    # Agent usage ---------------------------------------------------------------------------

    async def add_usage(
        self, tenant_id: TenantId, day: str, *, calls: int, tokens_in: int, tokens_out: int
    ) -> None:
        await self._write(
            tenant_id, ADD_USAGE.format(p="%s"), (tenant_id, day, calls, tokens_in, tokens_out)
        )

    async def usage(self, tenant_id: TenantId, first: str, last: str) -> list[UsageRecord]:
        rows = await self._read(
            tenant_id,
            "SELECT day, calls, tokens_in, tokens_out FROM agent_usage "
            "WHERE tenant_id = %s AND day >= %s AND day <= %s ORDER BY day",
            (tenant_id, first, last),
        )
        return [UsageRecord(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]

    async def agent_state(self, tenant_id: TenantId, session_id: SessionId) -> str | None:
        rows = await self._read(
            tenant_id,
            "SELECT value FROM agent_state WHERE tenant_id = %s AND session_id = %s",
            (tenant_id, session_id),
        )
        return str(rows[0][0]) if rows else None

    async def set_agent_state(
        self, tenant_id: TenantId, session_id: SessionId, value: str | None, *, now: float
    ) -> None:
        if value is None:
            await self._write(
                tenant_id,
                "DELETE FROM agent_state WHERE tenant_id = %s AND session_id = %s",
                (tenant_id, session_id),
            )
            return
        await self._write(
            tenant_id,
            "INSERT INTO agent_state VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id, session_id) "
            "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (tenant_id, session_id, value, now),
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
        # An early row (the final arrived first) gets its session and address here.
        encoded = json.dumps(address) if address else None
        rows = await self._read(
            tenant_id,
            "INSERT INTO agent_callbacks (tenant_id, id, session_id, address, created_at, "
            "expires_at, state, updated_at) VALUES (%s, %s, %s, %s, %s, %s, 'pending', %s) "
            "ON CONFLICT (tenant_id, id) DO UPDATE SET session_id = excluded.session_id, "
            "address = excluded.address, created_at = excluded.created_at, "
            f"updated_at = excluded.updated_at RETURNING {CALLBACK_COLUMNS}",
            (tenant_id, callback_id, session_id, encoded, now, expires_at, now),
        )
        return callback_from_row(rows[0])

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
        if not final:
            sql = (
                "UPDATE agent_callbacks SET text = coalesce(text, '') || %s, updated_at = %s "
                "WHERE tenant_id = %s AND id = %s AND state = 'pending'"
            )
            params: tuple[Any, ...] = (text, now, *key)
        else:
            sql = (
                "UPDATE agent_callbacks SET state = 'received', text = %s, expired = %s, "
                "updated_at = %s WHERE tenant_id = %s AND id = %s AND state = 'pending'"
                + (" AND expires_at <= %s" if expired else "")
            )
            params = (text, expired, now, *key, *((now,) if expired else ()))
        async with self._transaction(tenant_id) as conn:
            cur = await conn.execute(sql, params)
            if cur.rowcount:
                return "accepted"
            cur = await conn.execute(
                "SELECT expired FROM agent_callbacks WHERE tenant_id = %s AND id = %s", key
            )
            found = await cur.fetchone()
            if found is not None:
                return "expired" if found[0] else "already"
            if final and not expired and early_expires_at is not None:
                cur = await conn.execute(
                    "INSERT INTO agent_callbacks (tenant_id, id, session_id, created_at, "
                    "expires_at, state, text, updated_at) "
                    "VALUES (%s, %s, '', %s, %s, 'received', %s, %s) ON CONFLICT DO NOTHING",
                    (*key, now, early_expires_at, text, now),
                )
                # A concurrent final that inserted first won.
                return "accepted" if cur.rowcount else "already"
            return "unknown"

    async def claim_callback(
        self, tenant_id: TenantId, callback_id: str, owner: str, *, now: float, stale_before: float
    ) -> CallbackRecord | None:
        rows = await self._read(
            tenant_id,
            "UPDATE agent_callbacks SET state = 'delivering', owner = %s, claimed_at = %s, "
            "updated_at = %s WHERE tenant_id = %s AND id = %s AND session_id != '' AND "
            "(state = 'received' OR (state = 'delivering' AND claimed_at < %s)) "
            f"RETURNING {CALLBACK_COLUMNS}",
            (owner, now, now, tenant_id, callback_id, stale_before),
        )
        return callback_from_row(rows[0]) if rows else None

    async def settle_callback(
        self, tenant_id: TenantId, callback_id: str, owner: str, *, delivered: bool, now: float
    ) -> None:
        await self._write(
            tenant_id,
            "UPDATE agent_callbacks SET state = %s, owner = NULL, updated_at = %s "
            "WHERE tenant_id = %s AND id = %s AND state = 'delivering' AND owner = %s",
            ("delivered" if delivered else "received", now, tenant_id, callback_id, owner),
        )

    async def get_callback(self, tenant_id: TenantId, callback_id: str) -> CallbackRecord | None:
        rows = await self._read(
            tenant_id,
            f"SELECT {CALLBACK_COLUMNS} FROM agent_callbacks WHERE tenant_id = %s AND id = %s",
            (tenant_id, callback_id),
        )
        return callback_from_row(rows[0]) if rows else None

    async def latest_callback(
        self, tenant_id: TenantId, session_id: SessionId
    ) -> CallbackRecord | None:
        rows = await self._read(
            tenant_id,
            f"SELECT {CALLBACK_COLUMNS} FROM agent_callbacks WHERE tenant_id = %s "
            "AND session_id = %s ORDER BY created_at DESC LIMIT 1",
            (tenant_id, session_id),
        )
        return callback_from_row(rows[0]) if rows else None

    async def open_callbacks(self, tenant_id: TenantId) -> list[CallbackRecord]:
        rows = await self._read(
            tenant_id,
            f"SELECT {CALLBACK_COLUMNS} FROM agent_callbacks WHERE tenant_id = %s "
            "AND state IN ('pending', 'received', 'delivering') AND session_id != ''",
            (tenant_id,),
        )
        return [callback_from_row(r) for r in rows]

    async def due_callbacks(
        self, tenant_id: TenantId, *, now: float, stale_before: float, limit: int = 100
    ) -> list[CallbackRecord]:
        rows = await self._read(
            tenant_id,
            f"SELECT {CALLBACK_COLUMNS} FROM agent_callbacks WHERE tenant_id = %s "
            "AND session_id != '' AND ((state = 'pending' AND expires_at <= %s) "
            "OR state = 'received' OR (state = 'delivering' AND claimed_at < %s)) "
            "ORDER BY created_at LIMIT %s",
            (tenant_id, now, stale_before, limit),
        )
        return [callback_from_row(r) for r in rows]

    async def prune_callbacks(self, tenant_id: TenantId, *, before: float) -> int:
        return await self._write(
            tenant_id,
            "DELETE FROM agent_callbacks WHERE tenant_id = %s AND "
            "((state = 'delivered' AND updated_at < %s) OR (session_id = '' AND expires_at < %s))",
            (tenant_id, before, before),
        )
