"""What `chatgateway db` does: schema status and migration without opening a store, backups."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from chatgateway.config import StorageConfig
from chatgateway.store.migrations import Migration, SchemaStatus


@dataclass(frozen=True, slots=True)
class MigrationRun:
    """What `db migrate` did."""

    applied: list[Migration]
    status: SchemaStatus
    warnings: list[str] = field(default_factory=list)


async def schema_status(config: StorageConfig) -> SchemaStatus:
    """Where the configured database stands; changes nothing (not even an absent SQLite file)."""
    if config.backend == "postgres":
        from psycopg import AsyncConnection

        from chatgateway.store.migrations import postgres

        async with await AsyncConnection.connect(_dsn(config.dsn), autocommit=True) as conn:
            return await postgres.status(conn)
    return _sqlite_status(config.path)


def _sqlite_status(path: str) -> SchemaStatus:
    from chatgateway.store.migrations import sqlite

    if path != ":memory:" and not Path(path).exists():
        path = ":memory:"  # report an empty database (version 0) without creating the file
    conn = (
        sqlite3.connect(path)
        if path == ":memory:"
        else sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    )
    try:
        return sqlite.status(conn)
    finally:
        conn.close()


async def migrate_schema(
    config: StorageConfig, *, owner_dsn: SecretStr | None = None
) -> MigrationRun:
    """Apply pending migrations; on PostgreSQL as the owner, granting storage.dsn's role DML."""
    if config.backend == "postgres":
        return await _migrate_postgres(config, owner_dsn or config.owner_dsn)
    return _sqlite_migrate(config.path)


def _sqlite_migrate(path: str) -> MigrationRun:
    from chatgateway.store.migrations import sqlite

    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # what the store would set: readers never wait
        conn.execute("PRAGMA busy_timeout=5000")
        now = sqlite.status(conn)
        applied = sqlite.migrate(conn) if now.state == "behind" else []
        return MigrationRun(applied, sqlite.status(conn))
    finally:
        conn.close()


async def _migrate_postgres(config: StorageConfig, owner_dsn: SecretStr | None) -> MigrationRun:
    from psycopg import AsyncConnection, OperationalError

    from chatgateway.store.migrations import postgres

    warnings: list[str] = []
    runtime_role: str | None = None
    if owner_dsn is not None:
        # The runtime role is whoever storage.dsn logs in as; it gets data access, no more.
        try:
            async with await AsyncConnection.connect(_dsn(config.dsn), autocommit=True) as conn:
                cur = await conn.execute("SELECT current_user")
                row = await cur.fetchone()
                runtime_role = str(row[0]) if row else None
        except OperationalError as exc:
            warnings.append(
                f"cannot connect with storage.dsn to learn the runtime role, so no grants were "
                f"made: {str(exc).strip().splitlines()[0]}"
            )
    async with await AsyncConnection.connect(
        _dsn(owner_dsn or config.dsn), autocommit=True
    ) as conn:
        now = await postgres.status(conn)
        applied: list[Migration] = []
        if now.state == "behind":
            applied = await postgres.migrate(conn, runtime_role=runtime_role)
        elif runtime_role is not None and now.state == "up_to_date":
            # Idempotent: a runtime role changed since the last migration gets its grants.
            await postgres.grant_runtime(conn, runtime_role)
    async with await AsyncConnection.connect(_dsn(config.dsn), autocommit=True) as conn:
        status = await postgres.status(conn)
    return MigrationRun(applied, status, warnings)


def backup_sqlite(path: str, target: Path) -> int:
    """Copy the SQLite database at `path` to `target` with SQLite's online backup; pages."""
    if target.exists():
        raise FileExistsError(f"{target} exists; choose a new file")
    source = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    partial = target.with_name(target.name + ".partial")
    dest = sqlite3.connect(partial)
    try:
        # A few pages at a time: the running gateway's writers are never held up for long.
        source.backup(dest, pages=1024, sleep=0.005)
        pages = int(dest.execute("PRAGMA page_count").fetchone()[0])
        dest.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
    finally:
        dest.close()
        source.close()
    partial.rename(target)  # a half-written backup never has the final name
    return pages


def _dsn(value: SecretStr | None) -> str:
    if value is None:  # the config validator requires storage.dsn for postgres
        raise ValueError("storage.dsn is required when backend is postgres")
    return value.get_secret_value()


def describe(status: SchemaStatus) -> str:
    """A human-readable account of a SchemaStatus (what `db status` prints)."""
    lines = []
    if status.backend == "postgres":
        d = status.details
        if d["rls_applies"]:
            rls = "row-level security applies to this role"
        else:
            why = "superuser" if d["superuser"] else "BYPASSRLS"
            rls = f"this role is {why}: row-level security does NOT apply to it"
        lines.append(f"backend:  postgres, schema {d['schema']}, role {d['role']} ({rls})")
        if d.get("owner"):
            lines.append(f"owner:    {d['owner']}")
    else:
        lines.append("backend:  sqlite")
    state = {
        "up_to_date": "up to date",
        "behind": f"{len(status.pending)} migration(s) pending: run `chatgateway db migrate`",
        "ahead": "NEWER than this chatgateway: upgrade chatgateway",
    }[status.state]
    baseline = " (baseline: made before versioned migrations)" if status.baseline else ""
    lines.append(f"version:  {status.current} of {status.latest}{baseline}, {state}")
    lines.append("")
    lines.append(f"{'version':>7}  {'applied (UTC)':<19}  name")
    for m in status.applied:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.applied_at))
        lines.append(f"{m.version:>7}  {when:<19}  {m.name}")
    if status.baseline:
        lines.append(f"{1:>7}  {'(baseline)':<19}  initial schema")
    for p in status.pending:
        lines.append(f"{p.version:>7}  {'pending':<19}  {p.name}")
    return "\n".join(lines)
