"""The PostgreSQL schema's migrations, row-level security, and the runner (as the owner role)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection, sql

from chatgateway.store.migrations import (
    VERSION_TABLE,
    AppliedMigration,
    Migration,
    SchemaStatus,
    check_sequence,
    pending,
)

# Version 1: exactly the schema chatgateway created at start-up before migrations existed (the
# SQLite schema in PostgreSQL types; timestamps are float seconds in double precision).
INITIAL = """
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
"""

#: The transaction-local setting that names the tenant a transaction works for.
TENANT_SETTING = "chatgateway.tenant"
#: Set instead of a tenant by the few queries that span tenants by design (see SPANNING).
SCOPE_SETTING = "chatgateway.scope"
#: Set to the key id an authentication looks up, before its tenant is known.
KEY_ID_SETTING = "chatgateway.key_id"


def tenant_rls(table: str) -> str:
    """SQL giving `table` (with a tenant_id column) row-level security: only the tenant set in
    the transaction sees or writes its rows, whoever connects, the table's owner included."""
    current = f"current_setting('{TENANT_SETTING}', true)"
    return f"""
ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {table} FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON {table}
    USING (tenant_id = {current}) WITH CHECK (tenant_id = {current});
"""


def _scope(name: str) -> str:
    return f"current_setting('{SCOPE_SETTING}', true) = '{name}'"


# Version 2: row-level security. The three queries that span tenants get a policy each, as
# narrow as the query: see docs/database.md, "The queries that span tenants".
ROW_LEVEL_SECURITY = (
    "".join(tenant_rls(t) for t in ("sessions", "turns", "processed_events", "tenants", "api_keys"))
    + f"""
CREATE POLICY key_lookup ON api_keys FOR SELECT
    USING (key_id = current_setting('{KEY_ID_SETTING}', true));
CREATE POLICY registry ON tenants FOR SELECT USING ({_scope("registry")});
CREATE POLICY expiry_read ON processed_events FOR SELECT USING ({_scope("expiry")});
CREATE POLICY expiry_delete ON processed_events FOR DELETE USING ({_scope("expiry")});
"""
)

# Version 3: several instances (cluster.coordination: postgres) claim a platform event before
# processing it, so a redelivery to another instance is not processed twice.
EVENT_CLAIMS = (
    """
CREATE TABLE IF NOT EXISTS event_claims (
    tenant_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    event_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    claimed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant_id, platform, event_id)
);
"""
    + tenant_rls("event_claims")
    + f"""
CREATE POLICY expiry_read ON event_claims FOR SELECT USING ({_scope("expiry")});
CREATE POLICY expiry_delete ON event_claims FOR DELETE USING ({_scope("expiry")});
"""
)

# Version 4: leases (e.g. which instance connects a Discord bot). Not tenant data: a lease is
# named after the bot, and only the coordinator reads it.
LEASES = """
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL,
    data JSONB
);
"""

# Version 5: each tenant's agent usage by UTC day (calls and tokens), for billing and budgets.
AGENT_USAGE = """
CREATE TABLE IF NOT EXISTS agent_usage (
    tenant_id TEXT NOT NULL,
    day TEXT NOT NULL,
    calls BIGINT NOT NULL DEFAULT 0,
    tokens_in BIGINT NOT NULL DEFAULT 0,
    tokens_out BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day)
);
""" + tenant_rls("agent_usage")

# Version 6: what an agent protocol keeps per session between messages (A2A: the task waiting for
# the user's input).
AGENT_STATE = """
CREATE TABLE IF NOT EXISTS agent_state (
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant_id, session_id)
);
""" + tenant_rls("agent_state")

# Version 7: a processed platform event points at its answer (the session and the number of the
# agent's turn), so a replay of a message answered but perhaps never posted (the instance died in
# between) can post that answer again where posting twice shows it once (Discord's nonces). The
# table's row-level security (version 2) covers the new columns.
PROCESSED_ANSWERS = """
ALTER TABLE processed_events ADD COLUMN IF NOT EXISTS session_id TEXT;
ALTER TABLE processed_events ADD COLUMN IF NOT EXISTS answer_seq BIGINT;
"""

# Version 8: answers an agent sends later (it answered 202 Accepted): one row per promised answer,
# so a pending answer survives a restart and any instance can take it (chatgateway/callbacks.py).
AGENT_CALLBACKS = """
CREATE TABLE IF NOT EXISTS agent_callbacks (
    tenant_id TEXT NOT NULL,
    id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    address TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL,
    text TEXT,
    expired BOOLEAN NOT NULL DEFAULT FALSE,
    owner TEXT,
    claimed_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX IF NOT EXISTS agent_callbacks_by_session
    ON agent_callbacks (tenant_id, session_id, created_at);
CREATE INDEX IF NOT EXISTS agent_callbacks_by_state
    ON agent_callbacks (tenant_id, state, expires_at);
""" + tenant_rls("agent_callbacks")

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", INITIAL),
    Migration(2, "row-level security by tenant", ROW_LEVEL_SECURITY),
    Migration(3, "event claims of several instances", EVENT_CLAIMS),
    Migration(4, "leases of several instances", LEASES),
    Migration(5, "agent usage by tenant and day", AGENT_USAGE),
    Migration(6, "agent state per session", AGENT_STATE),
    Migration(7, "answers of processed events", PROCESSED_ANSWERS),
    Migration(8, "agent callbacks", AGENT_CALLBACKS),
)

_Conn = AsyncConnection[tuple[Any, ...]]

#: Taken first by every migrating or granting transaction: one migrator per schema at a time.
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('chatgateway.migrate:' || current_schema()))"

_VERSION_TABLE_SQL = (
    f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} "
    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)


async def _exists(conn: _Conn, table: str) -> bool:
    # A query on pg_tables, not to_regclass: a name lookup may use a catalog cache that has not
    # yet seen a table another migrator just committed (found by the concurrent-migrators test).
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = current_schema() "
        "AND tablename = %s)",
        (table,),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _role(conn: _Conn) -> dict[str, Any]:
    """Who this connection is, and whether row-level security binds it."""
    cur = await conn.execute(
        "SELECT current_user, rolsuper, rolbypassrls, current_schema(), "
        "(SELECT tableowner FROM pg_tables WHERE schemaname = current_schema() "
        "AND tablename = 'sessions') FROM pg_roles WHERE rolname = current_user"
    )
    row = await cur.fetchone()
    assert row is not None  # current_user is always a role
    role, superuser, bypass, schema, owner = row
    return {
        "role": role,
        "schema": schema,
        "owner": owner,
        "superuser": bool(superuser),
        "bypassrls": bool(bypass),
        # Superusers and BYPASSRLS roles skip every policy, even FORCEd ones.
        "rls_applies": not (superuser or bypass),
    }


async def status(conn: _Conn, migrations: Sequence[Migration] = MIGRATIONS) -> SchemaStatus:
    """Read where the database (the connection's search_path) stands; never writes."""
    check_sequence(migrations)
    applied: tuple[AppliedMigration, ...] = ()
    baseline = False
    if await _exists(conn, VERSION_TABLE):
        cur = await conn.execute(
            f"SELECT version, name, applied_at FROM {VERSION_TABLE} ORDER BY version"
        )
        applied = tuple(
            AppliedMigration(int(r[0]), str(r[1]), float(r[2])) for r in await cur.fetchall()
        )
    elif await _exists(conn, "sessions"):
        baseline = True
    current = max((m.version for m in applied), default=1 if baseline else 0)
    return SchemaStatus(
        backend="postgres",
        current=current,
        latest=len(migrations),
        baseline=baseline,
        applied=applied,
        pending=pending(current, migrations),
        details=await _role(conn),
    )


async def migrate(
    conn: _Conn,
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    runtime_role: str | None = None,
) -> list[Migration]:
    """Apply the pending migrations (each in its own transaction) as the connection's role,
    which becomes the tables' owner; then grant `runtime_role` only what the gateway needs.

    `conn` must be in autocommit mode. A transaction-level advisory lock per schema makes a
    second migrator (another instance starting) wait, then find the work done.
    """
    check_sequence(migrations)
    done: list[Migration] = []
    while True:
        async with conn.transaction():
            await conn.execute(_LOCK)
            now = await status(conn, migrations)
            await conn.execute(_VERSION_TABLE_SQL)
            if now.baseline:
                await conn.execute(
                    f"INSERT INTO {VERSION_TABLE} VALUES (1, %s, %s)",
                    (migrations[0].name + " (baseline)", time.time()),
                )
            todo = now.pending[:1]
            for migration in todo:
                await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {VERSION_TABLE} VALUES (%s, %s, %s)",
                    (migration.version, migration.name, time.time()),
                )
        if not todo:
            break
        done += todo
    if runtime_role is not None:
        await grant_runtime(conn, runtime_role)
    return done


async def grant_runtime(conn: _Conn, role: str) -> None:
    """Give `role` data access (no DDL) to every gateway table the connection's role owns."""
    cur = await conn.execute("SELECT current_user, current_schema()")
    row = await cur.fetchone()
    assert row is not None
    owner, schema = row
    if role == owner:
        return
    cur = await conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
        "AND tableowner = current_user ORDER BY tablename"
    )
    tables = [r[0] for r in await cur.fetchall()]
    who = sql.Identifier(role)
    async with conn.transaction():
        # Under the migrators' lock: concurrent GRANTs on one object fail ("tuple concurrently
        # updated").
        await conn.execute(_LOCK)
        await conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), who)
        )
        for table in tables:
            rights = "SELECT" if table == VERSION_TABLE else "SELECT, INSERT, UPDATE, DELETE"
            await conn.execute(
                sql.SQL("GRANT " + rights + " ON {} TO {}").format(sql.Identifier(table), who)
            )
