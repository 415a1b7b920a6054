"""Back up and restore both backends the documented way (docs/backup.md), then read the
sessions back through a store opened on the restored copy."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from chatgateway.cli import main
from chatgateway.config import StorageConfig
from chatgateway.models import ConversationKind, Role, Turn
from chatgateway.store import SessionStore, open_store
from chatgateway.store.sqlite import SqliteStore
from tests.pg_roles import RoleLayout, role_layout
from tests.test_store import PG_SERVER, A, B, key


async def write_sessions(store: SessionStore, text: str) -> dict[str, str]:
    """One session per tenant with a two-turn transcript; their ids."""
    ids = {}
    now = time.time()
    for tenant in (A, B):
        s = await store.create_session(key(tenant, user=text), kind=ConversationKind.WEB,
                                       user_name=text, now=now)
        await store.record_exchange(tenant, s.id, [Turn(Role.USER, f"{text} {tenant}", now),
                                                   Turn(Role.AGENT, "ok", now)], max_turns=50)
        ids[tenant] = s.id
    return ids


async def read_back(store: SessionStore, ids: dict[str, str], text: str) -> None:
    for tenant, sid in ids.items():
        session = await store.get_session(tenant, sid)
        assert session is not None and session.message_count == 2
        history = await store.history(tenant, sid, 10)
        assert [t.text for t in history] == [f"{text} {tenant}", "ok"]


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv), {})  # main runs its own event loop


async def test_sqlite_online_backup_restores_into_a_working_store(tmp_path: Path) -> None:
    db = tmp_path / "var" / "gw.db"
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({"storage": {"path": str(db)}}))
    backup = tmp_path / "backups" / "gw-backup.db"
    backup.parent.mkdir()
    store = await open_store(StorageConfig(path=str(db)))
    try:
        before = await write_sessions(store, "before")
        # Online: the gateway's store stays open and keeps writing around the backup.
        assert await cli("db", "backup", "--config", str(config), "--to", str(backup)) == 0
        after = await write_sessions(store, "after")
        assert await cli("db", "backup", "--config", str(config), "--to", str(backup)) == 1
    finally:
        await store.close()
    assert not list(backup.parent.glob("*.partial"))
    # Restore: the backup file becomes the database of a gateway (a fresh path here).
    restored = tmp_path / "restored" / "gw.db"
    restored.parent.mkdir()
    shutil.copyfile(backup, restored)
    store = SqliteStore(restored, migrate="check")  # the backup carries its schema version
    await store.open()
    try:
        await read_back(store, before, "before")
        for tenant, sid in after.items():
            assert await store.get_session(tenant, sid) is None
        assert [s.id for s in await store.list_sessions(A)] == [before[A]]
    finally:
        await store.close()


async def test_db_backup_is_for_sqlite_only(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump(
        {"storage": {"backend": "postgres", "dsn": {"value": "postgresql://x@127.0.0.1/x"}}}))
    assert await cli("db", "backup", "--config", str(config), "--to", str(tmp_path / "b")) == 2


@pytest.fixture
async def roles() -> AsyncIterator[RoleLayout]:
    pytest.importorskip("psycopg")
    if shutil.which("pg_dump") is None or shutil.which("pg_restore") is None:
        pytest.skip("pg_dump/pg_restore are not installed")
    async with role_layout() as layout:
        yield layout


def run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{argv[0]} failed: {proc.stderr}"


@pytest.mark.postgres
async def test_pg_dump_and_pg_restore_keep_data_roles_and_row_level_security(
    roles: RoleLayout, tmp_path: Path
) -> None:
    import psycopg

    config = StorageConfig(backend="postgres", dsn=SecretStr(roles.app_dsn),
                           owner_dsn=SecretStr(roles.owner_dsn))
    store = await open_store(config)
    try:
        ids = await write_sessions(store, "kept")
    finally:
        await store.close()
    tag = uuid.uuid4().hex[:12]
    backup_role, restored_db = f"cg_backup_{tag}", f"test_restore_{tag}"
    dump = tmp_path / "chatgateway.dump"
    async with await psycopg.AsyncConnection.connect(PG_SERVER, autocommit=True) as admin:
        # The documented backup role: BYPASSRLS (FORCEd policies hide every row from anyone
        # else, the owner included, so pg_dump would refuse) and read access, nothing more.
        await admin.execute(f"CREATE ROLE {backup_role} LOGIN BYPASSRLS")
        await admin.execute(f"GRANT USAGE ON SCHEMA {roles.schema} TO {backup_role}")
        await admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {roles.schema} TO {backup_role}")
        try:
            run("pg_dump", "--host=127.0.0.1", f"--username={backup_role}", "--dbname=test",
                f"--schema={roles.schema}", "--format=custom", f"--file={dump}")
            # Restore as the owner into a fresh database: data first, then the policies.
            await admin.execute(f"CREATE DATABASE {restored_db} OWNER {roles.owner}")
            run("pg_restore", "--host=127.0.0.1", f"--username={roles.owner}",
                f"--dbname={restored_db}", "--exit-on-error", str(dump))
            app_dsn = roles.dsn(roles.app, restored_db)
            restored = await open_store(StorageConfig(
                backend="postgres", dsn=SecretStr(app_dsn), migrate="check"))
            try:
                await read_back(restored, ids, "kept")
                assert [s.id for s in await restored.list_sessions(B)] == [ids[B]]
            finally:
                await restored.close()
            async with await psycopg.AsyncConnection.connect(app_dsn, autocommit=True) as conn:
                cur = await conn.execute("SELECT count(*) FROM sessions")  # no tenant set
                assert await cur.fetchone() == (0,)
                cur = await conn.execute(
                    "SELECT bool_and(relrowsecurity AND relforcerowsecurity) FROM pg_class "
                    "WHERE relname IN ('sessions', 'turns', 'api_keys', 'tenants', "
                    "'processed_events') AND relnamespace = current_schema()::regnamespace")
                assert await cur.fetchone() == (True,)
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {restored_db} WITH (FORCE)")
            await admin.execute(f"DROP OWNED BY {backup_role}")
            await admin.execute(f"DROP ROLE {backup_role}")
