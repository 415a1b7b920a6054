"""A PostgreSQL schema with the production role layout: an owner role and a runtime role."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from tests.test_store import PG_SERVER, unavailable

BASE = "postgresql://{user}@127.0.0.1:5432/{db}?options=-csearch_path%3D{schema}"


@dataclass(frozen=True)
class RoleLayout:
    """One test's schema, owned by `owner`; `app` is the gateway's runtime role (no rights yet)."""

    schema: str
    owner: str
    app: str
    database: str = "test"

    def dsn(self, user: str, database: str | None = None) -> str:
        return BASE.format(user=user, db=database or self.database, schema=self.schema)

    @property
    def owner_dsn(self) -> str:
        return self.dsn(self.owner)

    @property
    def app_dsn(self) -> str:
        return self.dsn(self.app)


@asynccontextmanager
async def role_layout() -> AsyncIterator[RoleLayout]:
    """Create the roles (LOGIN, no superuser, no BYPASSRLS) and the schema; drop them after.

    Roles are cluster-wide, so their names are unique per test like the schema's.
    """
    try:
        import psycopg
    except ImportError as exc:
        unavailable(f"psycopg is not installed: {exc}")
    try:
        admin = await psycopg.AsyncConnection.connect(PG_SERVER, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL is unreachable at {PG_SERVER}: {exc}")
    tag = uuid.uuid4().hex[:16]
    layout = RoleLayout(schema=f"test_{tag}", owner=f"cg_owner_{tag}", app=f"cg_app_{tag}")
    try:
        await admin.execute(f"CREATE ROLE {layout.owner} LOGIN NOSUPERUSER NOBYPASSRLS")
        await admin.execute(f"CREATE ROLE {layout.app} LOGIN NOSUPERUSER NOBYPASSRLS")
        await admin.execute(f"CREATE SCHEMA {layout.schema} AUTHORIZATION {layout.owner}")
        yield layout
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {layout.schema} CASCADE")
        for role in (layout.app, layout.owner):
            # DROP OWNED takes the grants too (on this database; a test that made another
            # database drops it first).
            cur = await admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            if await cur.fetchone():
                await admin.execute(f"DROP OWNED BY {role} CASCADE")
                await admin.execute(f"DROP ROLE {role}")
        await admin.close()
