"""Versioned schema migrations: a numbered list per backend, recorded in `schema_migrations`.

Each backend has its own list (`sqlite.MIGRATIONS`, `postgres.MIGRATIONS`), numbered 1, 2, 3...
without gaps. Version 1 is the schema chatgateway created before migrations existed, so a
database made by that code (its tables, no `schema_migrations`) is recognised as version 1, the
"baseline", and only the later versions are applied to it. To change the schema, append a
Migration to the list of each backend; never edit one that has shipped. A migration must keep
the previous release working (add tables, columns with defaults, indexes; no renames or drops):
during a rolling upgrade of several instances the old ones run on the new schema. On PostgreSQL
a new table holding tenant data needs row-level security too: end its SQL with
`postgres.tenant_rls("the_table")` (tests/test_postgres_rls.py checks every table with a
`tenant_id` column). The stores and the coordinator create no tables themselves: with
separate roles the gateway's runtime role has no right to (even `CREATE TABLE IF NOT EXISTS` on an
existing table needs CREATE on the schema), so every table belongs in these lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from chatgateway.errors import GatewayError

#: `auto`: apply pending migrations when the store opens; `check`: refuse to open instead.
MigrateMode = Literal["auto", "check"]

#: The table every backend records applied versions in.
VERSION_TABLE = "schema_migrations"


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema change: a version number, a short name and the SQL that makes it."""

    version: int
    name: str
    sql: str


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    version: int
    name: str
    applied_at: float


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database stands against the migrations this code knows."""

    backend: str
    #: The database's version: 0 for an empty database, 1 for a baseline.
    current: int
    latest: int
    #: The database has the version-1 tables but no version table (made before migrations).
    baseline: bool
    applied: tuple[AppliedMigration, ...]
    pending: tuple[Migration, ...]
    #: Facts about the connection worth showing an operator (e.g. the role and whether RLS binds).
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> Literal["up_to_date", "behind", "ahead"]:
        if self.current > self.latest:
            return "ahead"
        return "behind" if self.pending else "up_to_date"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form `chatgateway db status --json` prints."""
        return {
            "backend": self.backend,
            "state": self.state,
            "current": self.current,
            "latest": self.latest,
            "baseline": self.baseline,
            "applied": [
                {"version": m.version, "name": m.name, "applied_at": m.applied_at}
                for m in self.applied
            ],
            "pending": [{"version": m.version, "name": m.name} for m in self.pending],
            **self.details,
        }


class SchemaError(GatewayError):
    """The database's schema does not match this code (behind in `check` mode, or ahead)."""


def check_sequence(migrations: Sequence[Migration]) -> None:
    """Raise ValueError unless the versions are exactly 1, 2, ..., n."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1..n without gaps, got {versions}")


def pending(current: int, migrations: Sequence[Migration]) -> tuple[Migration, ...]:
    """The migrations a database at version `current` still needs, in order."""
    return tuple(m for m in migrations if m.version > current)


def refusal(status: SchemaStatus, mode: MigrateMode) -> SchemaError | None:
    """The error that keeps a store from opening on this schema, or None if it may open."""
    if status.state == "ahead":
        return SchemaError(
            f"the database schema is at version {status.current}, newer than this chatgateway "
            f"knows (version {status.latest}): upgrade chatgateway, or restore a backup made "
            "before the upgrade"
        )
    if status.state == "behind" and mode == "check":
        return SchemaError(
            f"the database schema is at version {status.current}, this chatgateway needs "
            f"version {status.latest} ({len(status.pending)} migration(s) pending) and "
            "storage.migrate is 'check': run `chatgateway db migrate --config <file>`"
        )
    return None


def split_statements(sql: str) -> list[str]:
    """Split a script into complete statements (SQLite runs one statement per execute)."""
    import sqlite3

    statements: list[str] = []
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
