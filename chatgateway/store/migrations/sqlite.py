"""The SQLite schema's migrations and the runner that applies them on a sqlite3 connection."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from chatgateway.store.migrations import (
    VERSION_TABLE,
    AppliedMigration,
    Migration,
    SchemaStatus,
    check_sequence,
    pending,
    split_statements,
)

# Version 1: exactly the schema chatgateway created at start-up before migrations existed.
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
    created_at REAL NOT NULL,
    last_active REAL NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_key
    ON sessions (tenant_id, platform, conversation_id, thread_id, user_id);
CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions (tenant_id, last_active);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tenant_id TEXT NOT NULL,
    role TEXT NOT NULL,
    text TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS processed_events (
    tenant_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at REAL NOT NULL,
    PRIMARY KEY (tenant_id, platform, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant_id);
CREATE TABLE IF NOT EXISTS gateway_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Version 2: the claim an instance takes on a platform event before processing it (used with
# cluster.coordination: postgres; the table exists in both backends so the stores stay alike).
EVENT_CLAIMS = """
CREATE TABLE IF NOT EXISTS event_claims (
    tenant_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    event_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    claimed_at REAL NOT NULL,
    PRIMARY KEY (tenant_id, platform, event_id)
) WITHOUT ROWID;
"""

# Version 3: each tenant's agent usage by UTC day (calls and tokens), for billing and budgets.
AGENT_USAGE = """
CREATE TABLE IF NOT EXISTS agent_usage (
    tenant_id TEXT NOT NULL,
    day TEXT NOT NULL,
    calls INTEGER NOT NULL DEFAULT 0,
    tokens_in INTEGER NOT NULL DEFAULT 0,
    tokens_out INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day)
) WITHOUT ROWID;
"""

# Version 4: what an agent protocol keeps per session between messages (A2A: the task waiting for
# the user's input).
AGENT_STATE = """
CREATE TABLE IF NOT EXISTS agent_state (
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tenant_id, session_id)
) WITHOUT ROWID;
"""

# Version 5: a processed platform event points at its answer (the session and the number of the
# agent's turn), so a replay of a message answered but perhaps never posted (the instance died in
# between) can post that answer again where posting twice shows it once (Discord's nonces).
PROCESSED_ANSWERS = """
ALTER TABLE processed_events ADD COLUMN session_id TEXT;
ALTER TABLE processed_events ADD COLUMN answer_seq INTEGER;
"""

# Version 6: answers an agent sends later (it answered 202 Accepted): one row per promised answer,
# so a pending answer survives a restart and any instance can take it (chatgateway/callbacks.py).
AGENT_CALLBACKS = """
CREATE TABLE IF NOT EXISTS agent_callbacks (
    tenant_id TEXT NOT NULL,
    id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    address TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL,
    text TEXT,
    expired INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    claimed_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tenant_id, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS agent_callbacks_by_session
    ON agent_callbacks (tenant_id, session_id, created_at);
CREATE INDEX IF NOT EXISTS agent_callbacks_by_state
    ON agent_callbacks (tenant_id, state, expires_at);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", INITIAL),
    Migration(2, "event claims of several instances", EVENT_CLAIMS),
    Migration(3, "agent usage by tenant and day", AGENT_USAGE),
    Migration(4, "agent state per session", AGENT_STATE),
    Migration(5, "answers of processed events", PROCESSED_ANSWERS),
    Migration(6, "agent callbacks", AGENT_CALLBACKS),
)

_VERSION_TABLE_SQL = (
    f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} "
    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def status(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> SchemaStatus:
    """Read where the database stands (never writes)."""
    check_sequence(migrations)
    applied: tuple[AppliedMigration, ...] = ()
    baseline = False
    if _has_table(conn, VERSION_TABLE):
        rows = conn.execute(
            f"SELECT version, name, applied_at FROM {VERSION_TABLE} ORDER BY version"
        ).fetchall()
        applied = tuple(AppliedMigration(int(r[0]), str(r[1]), float(r[2])) for r in rows)
    elif _has_table(conn, "sessions"):
        baseline = True
    current = max((m.version for m in applied), default=1 if baseline else 0)
    return SchemaStatus(
        backend="sqlite",
        current=current,
        latest=len(migrations),
        baseline=baseline,
        applied=applied,
        pending=pending(current, migrations),
    )


def migrate(
    conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS
) -> list[Migration]:
    """Apply every pending migration, each in its own transaction; return those applied.

    `conn` must be in autocommit mode (isolation_level=None). The write lock taken first
    (BEGIN IMMEDIATE) makes a second migrator wait and then find the work done.
    """
    check_sequence(migrations)
    done: list[Migration] = []
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = status(conn, migrations)
            conn.execute(_VERSION_TABLE_SQL)
            if now.baseline:
                # Made by the code before migrations: version 1 is there, say so.
                conn.execute(
                    f"INSERT INTO {VERSION_TABLE} VALUES (1, ?, ?)",
                    (migrations[0].name + " (baseline)", time.time()),
                )
            todo = now.pending[:1]
            for migration in todo:
                for statement in split_statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    f"INSERT INTO {VERSION_TABLE} VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if not todo:
            return done
        done += todo
