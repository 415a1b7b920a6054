"""PostgreSQL enforces tenant isolation itself: row-level security under the production roles.

The gateway connects as a runtime role that is neither the tables' owner nor BYPASSRLS; the
owner role ran the migrations. Every test creates both roles on the local server.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr

import tests.test_store as contract
from chatgateway.config import StorageConfig
from chatgateway.models import ConversationKind, Platform, Role, Turn
from chatgateway.store.base import ApiKeyRecord, SessionStore, TenantRecord
from chatgateway.store.rows import DEDUP_RETENTION
from chatgateway.store.schema import migrate_schema
from tests.pg_roles import RoleLayout, role_layout
from tests.test_store import A, B, key

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.postgres


@pytest.fixture
async def layout() -> AsyncIterator[RoleLayout]:
    async with role_layout() as roles:
        run = await migrate_schema(
            StorageConfig(
                backend="postgres",
                dsn=SecretStr(roles.app_dsn),
                owner_dsn=SecretStr(roles.owner_dsn),
                migrate="check",
            )
        )
        assert run.warnings == [] and run.status.state == "up_to_date"
        yield roles


@pytest.fixture
async def app_store(layout: RoleLayout) -> AsyncIterator[SessionStore]:
    """The store as the gateway runs it: the runtime role, schema already migrated."""
    from chatgateway.store.postgres import PostgresStore

    store = PostgresStore(SecretStr(layout.app_dsn), migrate="check", max_size=1)
    await store.open()
    yield store
    await store.close()


async def connect(dsn: str) -> Any:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def rows(conn: Any, sql: str, *settings: tuple[str, str]) -> list[tuple[Any, ...]]:
    """Run `sql` in one transaction after setting `settings` (name, value) locally."""
    async with conn.transaction():
        for name, value in settings:
            await conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        cur = await conn.execute(sql)
        return list(await cur.fetchall())


async def fill(store: SessionStore) -> dict[str, str]:
    """Two tenants' sessions, turns, events, keys and runtime tenants; their session ids."""
    now = time.time()
    ids = {}
    for tenant in (A, B):
        s = await store.create_session(key(tenant), kind=ConversationKind.WEB, user_name="U", now=now)
        await store.record_exchange(
            tenant, s.id, [Turn(Role.USER, f"secret of {tenant}", now)], max_turns=10,
            processed_event=(Platform.SLACK, f"ev-{tenant}"),
        )
        await store.add_api_key(ApiKeyRecord(f"k-{tenant}", tenant, "hash", "", now))
        await store.save_tenant(TenantRecord(tenant, {"id": tenant}, now, now))
        ids[tenant] = s.id
    return ids


TENANT_TABLES = ("sessions", "turns", "processed_events", "api_keys", "tenants")


async def test_the_runtime_role_is_neither_owner_nor_bypassrls(layout: RoleLayout) -> None:
    async with await connect(layout.app_dsn) as conn:
        [(superuser, bypass)] = await rows(
            conn, "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        assert not superuser and not bypass
        owners = await rows(conn, "SELECT DISTINCT tableowner FROM pg_tables "
                                  "WHERE schemaname = current_schema()")
        assert owners == [(layout.owner,)]
        # Data access only: no DDL, and the version table is read-only.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("CREATE TABLE sneaky (x int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("ALTER TABLE sessions DISABLE ROW LEVEL SECURITY")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("DELETE FROM schema_migrations")


async def test_every_table_with_tenant_data_has_forced_row_level_security(
    layout: RoleLayout,
) -> None:
    """Also guards tables added by later migrations: a tenant_id column means a policy."""
    async with await connect(layout.owner_dsn) as conn:
        tables = await rows(
            conn,
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() "
            "AND c.relkind = 'r' AND EXISTS (SELECT 1 FROM pg_attribute a WHERE "
            "a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped)",
        )
        assert {t[0] for t in tables} >= set(TENANT_TABLES)
        assert all(enabled and forced for _, enabled, forced in tables), tables


async def test_a_query_with_no_tenant_set_returns_no_rows(
    layout: RoleLayout, app_store: SessionStore
) -> None:
    await fill(app_store)
    async with await connect(layout.app_dsn) as conn:
        for table in TENANT_TABLES:
            assert await rows(conn, f"SELECT * FROM {table}") == [], table
        # Writes without a tenant touch nothing either.
        cur = await conn.execute("DELETE FROM sessions")
        assert cur.rowcount == 0
        # A tenant sees its own rows only, even with no WHERE clause at all.
        seen = await rows(conn, "SELECT DISTINCT tenant_id FROM turns",
                          ("chatgateway.tenant", A))
        assert seen == [(A,)]


async def test_a_tenant_cannot_write_rows_of_another(
    layout: RoleLayout, app_store: SessionStore
) -> None:
    ids = await fill(app_store)
    async with await connect(layout.app_dsn) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # WITH CHECK
            await rows(conn, "INSERT INTO turns VALUES ('x', 1, 'tenant-b', 'user', 'x', 0) "
                             "RETURNING 1", ("chatgateway.tenant", A))
        changed = await rows(conn, f"UPDATE sessions SET user_name = 'x' WHERE id = '{ids[B]}' "
                                   "RETURNING id", ("chatgateway.tenant", A))
        assert changed == []


async def test_a_pooled_connection_reused_by_another_tenant_sees_nothing_of_the_first(
    app_store: SessionStore,
) -> None:
    from chatgateway.store.postgres import PostgresStore

    assert isinstance(app_store, PostgresStore)
    ids = await fill(app_store)  # max_size=1: every call ran on the one pooled connection
    assert await app_store.get_session(A, ids[A]) is not None
    async with app_store._connection() as conn:
        # The connection A's transactions used: the tenant setting ended with them.
        cur = await conn.execute("SELECT current_setting('chatgateway.tenant', true)")
        assert (await cur.fetchone())[0] in ("", None)
        assert await rows(conn, "SELECT id FROM sessions") == []
        assert await rows(conn, "SELECT id FROM sessions", ("chatgateway.tenant", B)) == [
            (ids[B],)
        ]
    # And through the store: B's queries never return A's session, whatever they ask.
    assert await app_store.get_session(B, ids[A]) is None
    assert [s.id for s in await app_store.list_sessions(B)] == [ids[B]]


async def test_the_owner_is_filtered_too(layout: RoleLayout, app_store: SessionStore) -> None:
    ids = await fill(app_store)
    async with await connect(layout.owner_dsn) as conn:
        for table in TENANT_TABLES:
            assert await rows(conn, f"SELECT * FROM {table}") == [], table
        assert await rows(conn, "SELECT id FROM sessions", ("chatgateway.tenant", B)) == [
            (ids[B],)
        ]


async def test_the_cross_tenant_policies_show_only_what_their_query_needs(
    layout: RoleLayout, app_store: SessionStore
) -> None:
    await fill(app_store)
    async with await connect(layout.app_dsn) as conn:
        # Authentication: the one key named, nothing else of any table.
        lookup = ("chatgateway.key_id", "k-tenant-b")
        assert await rows(conn, "SELECT key_id FROM api_keys", lookup) == [("k-tenant-b",)]
        assert await rows(conn, "SELECT id FROM sessions", lookup) == []
        assert await rows(conn, "DELETE FROM api_keys RETURNING 1", lookup) == []
        # The admin API's tenant list: the registry is readable, not writable, nothing else.
        registry = ("chatgateway.scope", "registry")
        assert len(await rows(conn, "SELECT tenant_id FROM tenants", registry)) == 2
        assert await rows(conn, "DELETE FROM tenants RETURNING 1", registry) == []
        assert await rows(conn, "SELECT key_id FROM api_keys", registry) == []
        # The expiry at start: processed events (and claims), nothing else.
        expiry = ("chatgateway.scope", "expiry")
        assert len(await rows(conn, "SELECT event_id FROM processed_events", expiry)) == 2
        assert await rows(conn, "SELECT id FROM sessions", expiry) == []
        assert await rows(conn, "SELECT tenant_id FROM tenants", expiry) == []


async def test_the_spanning_queries_work_through_the_store(
    layout: RoleLayout, app_store: SessionStore
) -> None:
    from chatgateway.store.postgres import PostgresStore

    await fill(app_store)
    found = await app_store.find_api_key("k-tenant-b")
    assert found is not None and found.tenant_id == B
    assert [t.tenant_id for t in await app_store.list_tenants()] == [A, B]
    assert await app_store.gateway_setting("secret", "s1") == "s1"  # not tenant data
    assert await app_store.claim_event(A, Platform.SLACK, "new", "i1", time.time(),
                                       stale_before=0)
    # Old processed events of every tenant go at the next start.
    old = time.time() - 2 * DEDUP_RETENTION
    async with await connect(layout.owner_dsn) as conn:
        # The owner, too, changes nothing without a tenant...
        assert await rows(conn, f"UPDATE processed_events SET processed_at = {old} "
                                "RETURNING 1") == []
        for tenant in (A, B):  # ...so age each tenant's event in its own transaction.
            assert await rows(conn, f"UPDATE processed_events SET processed_at = {old} "
                                    "RETURNING 1", ("chatgateway.tenant", tenant)) == [(1,)]
    reopened = PostgresStore(SecretStr(layout.app_dsn), migrate="check")
    await reopened.open()
    try:
        for tenant in (A, B):
            assert not await reopened.is_processed(tenant, Platform.SLACK, f"ev-{tenant}")
        await reopened.delete_tenant(A)
        assert [t.tenant_id for t in await reopened.list_tenants()] == [B]
        assert await reopened.find_api_key("k-tenant-a") is None
        assert await reopened.list_sessions(B) != []
    finally:
        await reopened.close()


# The whole store contract (tests/test_store.py) again, as the runtime role under RLS.
@pytest.fixture
async def store(layout: RoleLayout) -> AsyncIterator[SessionStore]:
    from chatgateway.store.postgres import PostgresStore

    s = PostgresStore(SecretStr(layout.app_dsn), migrate="check")
    await s.open()
    yield s
    await s.close()


for _name, _test in list(vars(contract).items()):
    if _name.startswith("test_") and list(inspect.signature(_test).parameters) == ["store"]:
        globals()[f"{_name}_under_rls"] = _test


async def test_the_gateway_serves_tenants_as_the_runtime_role(
    make_gateway: Any, http: Any
) -> None:
    """The whole daemon under row-level security: it migrates as the owner at start, then
    authenticates generated keys, serves chats, lists sessions and manages runtime tenants
    through the admin API as the runtime role."""
    from tests.conftest import ADMIN_TOKEN, tenant, url

    async with role_layout() as roles:  # empty: the daemon migrates (auto, as the owner)
        daemon = await make_gateway({
            "storage": {"backend": "postgres", "dsn": {"value": roles.app_dsn},
                        "owner_dsn": {"value": roles.owner_dsn}},
            "admin": {"token": {"value": ADMIN_TOKEN}},
            "tenants": [tenant("tenant-a"), tenant("tenant-b")],
        })
        assert daemon.store.schema.details["rls_applies"]
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        keys = {}
        for t in ("tenant-a", "tenant-b"):
            async with http.post(url(daemon, f"/admin/tenants/{t}/keys"), json={},
                                 headers=admin) as resp:
                assert resp.status == 201, await resp.text()
                keys[t] = {"Authorization": f"Bearer {(await resp.json())['key']}"}
        sessions = {}
        for t in ("tenant-a", "tenant-b"):
            async with http.post(url(daemon, "/api/chat"), headers=keys[t],
                                 json={"message": f"hello {t}", "userId": "u1"}) as resp:
                assert resp.status == 200, await resp.text()
                sessions[t] = (await resp.json())["sessionId"]
        async with http.get(url(daemon, "/api/sessions"), headers=keys["tenant-b"]) as resp:
            listed = await resp.json()
        assert [s["sessionId"] for s in listed] == [sessions["tenant-b"]]
        async with http.get(url(daemon, f"/api/sessions/{sessions['tenant-a']}"),
                            headers=keys["tenant-b"]) as resp:
            assert resp.status == 404
        async with http.post(url(daemon, "/admin/tenants"), headers=admin,
                             json={"id": "tenant-c", "agent": {"builtin": "echo"}}) as resp:
            assert resp.status == 201, await resp.text()
        async with http.get(url(daemon, "/admin/tenants"), headers=admin) as resp:
            assert "tenant-c" in {t["id"] for t in await resp.json()}
        async with http.delete(url(daemon, "/admin/tenants/tenant-c"), headers=admin) as resp:
            assert resp.status == 204
        await daemon.stop()
