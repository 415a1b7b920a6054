"""Versioned schema migrations on both backends, `chatgateway db status|migrate`, and the
upgrade of a database made before migrations existed (its schema is frozen in tests/data/)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from chatgateway.cli import main
from chatgateway.config import StorageConfig
from chatgateway.errors import ConfigError
from chatgateway.models import ConversationKind, Platform, Role
from chatgateway.store import open_store
from chatgateway.store.migrations import Migration, SchemaError
from chatgateway.store.migrations import sqlite as sqlite_migrations
from chatgateway.store.schema import migrate_schema, schema_status
from chatgateway.store.sqlite import SqliteStore
from tests.pg_roles import RoleLayout, role_layout
from tests.process import GatewayProcess
from tests.test_store import A, B, key

DATA = Path(__file__).parent / "data"
OLD_SQLITE = (DATA / "schema-before-migrations.sqlite.sql").read_text()
OLD_POSTGRES = (DATA / "schema-before-migrations.postgres.sql").read_text()
LATEST_SQLITE = len(sqlite_migrations.MIGRATIONS)

NOW = time.time()
# Rows as the code before migrations wrote them: two tenants, a transcript, a key, an event.
OLD_ROWS = [
    ("INSERT INTO sessions VALUES ({})", [
        ("s_a", "tenant-a", "web", "c1", "", "u1", "Ann", "web", NOW, NOW, 2),
        ("s_b", "tenant-b", "web", "c1", "", "u1", "Bob", "web", NOW, NOW, 1),
    ]),
    ("INSERT INTO turns VALUES ({})", [
        ("s_a", 1, "tenant-a", "user", "hello from a", NOW),
        ("s_a", 2, "tenant-a", "agent", "hi a", NOW),
        ("s_b", 1, "tenant-b", "user", "hello from b", NOW),
    ]),
    ("INSERT INTO processed_events VALUES ({})", [("tenant-a", "slack", "ev1", NOW)]),
    ("INSERT INTO api_keys VALUES ({})", [("k1", "tenant-a", "hash", "ci", NOW)]),
    ("INSERT INTO tenants VALUES ({})", [("tenant-b", '{"id": "tenant-b"}', NOW, NOW)]),
    ("INSERT INTO gateway_settings VALUES ({})", [("visitor_secret", "s3cret")]),
]


def old_sqlite_database(path: Path) -> Path:
    """A database exactly as the code before migrations left it: its tables, rows, no version."""
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SQLITE)
    with conn:
        for sql, rows in OLD_ROWS:
            conn.executemany(sql.format(",".join("?" * len(rows[0]))), rows)
    conn.close()
    return path


async def check_old_rows(store: Any) -> None:
    """What old_*_database wrote reads back through the store, tenant by tenant."""
    session = await store.get_session(A, "s_a")
    assert session is not None and session.user_name == "Ann" and session.message_count == 2
    assert [(t.role, t.text) for t in await store.history(A, "s_a", 10)] == [
        (Role.USER, "hello from a"), (Role.AGENT, "hi a")]
    assert await store.get_session(B, "s_a") is None
    assert [s.id for s in await store.list_sessions(B)] == ["s_b"]
    assert await store.is_processed(A, Platform.SLACK, "ev1")
    key = await store.find_api_key("k1")
    assert key is not None and key.tenant_id == A
    assert [t.tenant_id for t in await store.list_tenants()] == [B]
    assert await store.gateway_setting("visitor_secret", "new") == "s3cret"


def versions(path: Path) -> list[tuple[int, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
    finally:
        conn.close()


# SQLite --------------------------------------------------------------------------------------


async def test_a_new_sqlite_database_gets_every_migration(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "new.db")
    await store.open()
    await store.close()
    assert store.schema is not None and store.schema.state == "up_to_date"
    assert [v for v, _ in versions(tmp_path / "new.db")] == list(range(1, LATEST_SQLITE + 1))


async def test_a_sqlite_database_from_before_migrations_is_a_baseline_and_upgrades(
    tmp_path: Path,
) -> None:
    path = old_sqlite_database(tmp_path / "old.db")
    before = await schema_status(StorageConfig(path=str(path)))
    assert before.baseline and before.current == 1 and before.state == "behind"
    store = await open_store(StorageConfig(path=str(path)))  # migrate: auto, the default
    try:
        await check_old_rows(store)
    finally:
        await store.close()
    recorded = versions(path)
    assert recorded[0] == (1, "initial schema (baseline)")
    assert [v for v, _ in recorded] == list(range(1, LATEST_SQLITE + 1))


def test_a_later_migration_runs_once_and_keeps_the_data(tmp_path: Path) -> None:
    path = old_sqlite_database(tmp_path / "old.db")
    later = (*sqlite_migrations.MIGRATIONS,
             Migration(LATEST_SQLITE + 1, "sessions get a locale",
                       "ALTER TABLE sessions ADD COLUMN locale TEXT NOT NULL DEFAULT 'en';\n"
                       "UPDATE sessions SET locale = 'de' WHERE id = 's_b';"))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        applied = sqlite_migrations.migrate(conn, later)
        assert [m.version for m in applied] == list(range(2, LATEST_SQLITE + 2))
        assert sqlite_migrations.migrate(conn, later) == []  # nothing twice
        assert conn.execute("SELECT id, locale FROM sessions ORDER BY id").fetchall() == [
            ("s_a", "en"), ("s_b", "de")]
        assert sqlite_migrations.status(conn, later).state == "up_to_date"
        # The code without that migration now finds the database ahead of it.
        assert sqlite_migrations.status(conn).state == "ahead"
    finally:
        conn.close()


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    path = old_sqlite_database(tmp_path / "old.db")
    conn = sqlite3.connect(path, isolation_level=None)
    sqlite_migrations.migrate(conn)
    broken = (*sqlite_migrations.MIGRATIONS,
              Migration(LATEST_SQLITE + 1, "half a change",
                        "ALTER TABLE sessions ADD COLUMN locale TEXT;\nSELECT * FROM no_such_table;"))
    try:
        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            sqlite_migrations.migrate(conn, broken)
        columns = [r[1] for r in conn.execute("PRAGMA table_info(sessions)")]
        assert "locale" not in columns
        assert sqlite_migrations.status(conn, broken).current == LATEST_SQLITE
    finally:
        conn.close()


async def test_check_mode_refuses_a_schema_behind_and_names_the_command(tmp_path: Path) -> None:
    path = old_sqlite_database(tmp_path / "old.db")
    config = StorageConfig(path=str(path), migrate="check")
    with pytest.raises(ConfigError) as caught:
        await open_store(config, source="gw.yaml")
    [problem] = caught.value.problems
    assert (problem.file, problem.path) == ("gw.yaml", "storage.migrate")
    assert "version 1" in problem.message and "chatgateway db migrate" in problem.message
    conn = sqlite3.connect(path)
    try:  # untouched: still the baseline, no version table
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'schema_migrations'"
                            ).fetchall() == []
    finally:
        conn.close()
    await migrate_schema(config)
    store = await open_store(config)
    try:
        await check_old_rows(store)
    finally:
        await store.close()


async def test_a_schema_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    await migrate_schema(StorageConfig(path=str(path)))
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    conn.close()
    for mode in ("auto", "check"):
        with pytest.raises(ConfigError, match="newer than this chatgateway"):
            await open_store(StorageConfig(path=str(path), migrate=mode), source="gw.yaml")
    with pytest.raises(SchemaError):
        await SqliteStore(path).open()


def write_config(tmp_path: Path, storage: dict[str, Any]) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0},
        "storage": storage,
        "logging": {"format": "json"},
        "tenants": [{"id": "tenant-a", "agent": {"builtin": "echo"}}],
    }))
    return path


def test_db_status_and_migrate_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = old_sqlite_database(tmp_path / "old.db")
    config = str(write_config(tmp_path, {"path": str(path)}))
    assert main(["db", "status", "--config", config], {}) == 3
    out = capsys.readouterr().out
    assert "version:  1 of" in out and "baseline" in out and "pending" in out
    assert main(["db", "migrate", "--config", config, "--json"], {}) == 0
    done = json.loads(capsys.readouterr().out)
    assert [m["version"] for m in done["applied"]] == list(range(2, LATEST_SQLITE + 1))
    assert done["status"]["state"] == "up_to_date"
    assert main(["db", "migrate", "--config", config], {}) == 0
    assert "applied" not in capsys.readouterr().out.split("backend")[0]
    assert main(["db", "status", "--config", config, "--json"], {}) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["current"] == status["latest"] == LATEST_SQLITE and status["pending"] == []
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    conn.close()
    assert main(["db", "status", "--config", config], {}) == 4
    assert main(["db", "migrate", "--config", config], {}) == 4


def test_storage_config_names_its_problems() -> None:
    from chatgateway.config import parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config({"storage": {"owner_dsn": {"value": "postgresql://o@db/x"},
                                  "migrate": "sometimes"}}, file="gw.yaml", environ={})
    assert {(p.path, p.message.split(" (")[0]) for p in caught.value.problems} == {
        ("storage.owner_dsn", "only for backend postgres"),
        ("storage.migrate", "Input should be 'auto' or 'check'"),
    }


def test_db_status_leaves_a_missing_database_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(write_config(tmp_path, {"path": str(tmp_path / "none" / "gw.db")}))
    assert main(["db", "status", "--config", config, "--json"], {}) == 3
    assert json.loads(capsys.readouterr().out)["current"] == 0
    assert not (tmp_path / "none").exists()


def test_the_daemon_in_check_mode_exits_78_naming_db_migrate(tmp_path: Path) -> None:
    path = old_sqlite_database(tmp_path / "old.db")
    config = write_config(tmp_path, {"path": str(path), "migrate": "check"})
    proc = GatewayProcess(config)
    assert proc.proc.wait(timeout=60) == 78
    proc._reader.join(10)
    output = "\n".join(proc.lines)
    assert "storage.migrate" in output and "chatgateway db migrate" in output
    assert "Traceback" not in output


# PostgreSQL ----------------------------------------------------------------------------------

@pytest.fixture
async def roles() -> AsyncIterator[RoleLayout]:
    pytest.importorskip("psycopg")
    async with role_layout() as layout:
        yield layout


async def old_postgres_database(layout: RoleLayout) -> None:
    """The schema and rows the code before migrations made, as the owner."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(layout.owner_dsn, autocommit=True) as conn:
        await conn.execute(OLD_POSTGRES)
        for sql, rows in OLD_ROWS:
            async with conn.cursor() as cur:
                await cur.executemany(sql.format(",".join(["%s"] * len(rows[0]))), rows)


def pg_config(layout: RoleLayout, **extra: Any) -> StorageConfig:
    return StorageConfig(**{"backend": "postgres", "dsn": SecretStr(layout.app_dsn), **extra})


@pytest.mark.postgres
async def test_a_postgres_database_from_before_migrations_upgrades_to_row_level_security(
    roles: RoleLayout,
) -> None:
    await old_postgres_database(roles)
    config = pg_config(roles, owner_dsn=SecretStr(roles.owner_dsn), migrate="check")
    before = await schema_status(pg_config(roles, dsn=SecretStr(roles.owner_dsn)))
    assert before.baseline and before.current == 1 and before.state == "behind"
    with pytest.raises(ConfigError, match="chatgateway db migrate"):
        await open_store(config)
    run = await migrate_schema(config)
    assert run.applied[0].version == 2 and run.status.state == "up_to_date"
    assert run.status.details["role"] == roles.app and run.status.details["rls_applies"]
    store = await open_store(config)
    try:
        await check_old_rows(store)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_auto_mode_migrates_as_the_owner_and_grants_the_runtime_role(
    roles: RoleLayout,
) -> None:
    # Without the owner the runtime role can do nothing on an empty schema, and says why.
    with pytest.raises(ConfigError, match=r"may not apply migrations.*storage\.owner_dsn"):
        await open_store(pg_config(roles), source="gw.yaml")
    store = await open_store(pg_config(roles, owner_dsn=SecretStr(roles.owner_dsn)))
    try:
        session = await store.create_session(
            key(A), kind=ConversationKind.WEB, user_name=None, now=time.time())
        sid = session.id
        assert await store.get_session(A, sid) is not None
    finally:
        await store.close()
    status = await schema_status(pg_config(roles))
    assert status.state == "up_to_date" and status.details["owner"] == roles.owner


@pytest.mark.postgres
async def test_two_instances_migrating_at_once_apply_each_version_once(
    roles: RoleLayout,
) -> None:
    config = pg_config(roles, owner_dsn=SecretStr(roles.owner_dsn))
    runs = await asyncio.gather(migrate_schema(config), migrate_schema(config))
    applied = sorted(m.version for run in runs for m in run.applied)
    assert applied == list(range(1, runs[0].status.latest + 1))
    assert all(run.status.state == "up_to_date" for run in runs)


@pytest.mark.postgres
async def test_db_commands_on_postgres_with_the_owner_dsn_from_the_environment(
    roles: RoleLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await old_postgres_database(roles)

    async def cli(argv: list[str], environ: dict[str, str]) -> int:
        return await asyncio.to_thread(main, argv, environ)  # main runs its own event loop
    config = str(write_config(tmp_path, {"backend": "postgres", "dsn": {"env": "DSN"},
                                         "migrate": "check"}))
    env = {"DSN": roles.app_dsn, "OWNER_DSN": roles.owner_dsn}
    assert await cli(["db", "status", "--config", config], env) == 3
    assert f"role {roles.app}" in capsys.readouterr().out
    assert await cli(["db", "migrate", "--config", config, "--owner-dsn-env", "NOPE"], env) == 2
    assert await cli(["db", "migrate", "--config", config, "--owner-dsn-env", "OWNER_DSN",
                 "--json"], env) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"]["state"] == "up_to_date" and out["status"]["rls_applies"]
    assert await cli(["db", "status", "--config", config], env) == 0
    assert "row-level security applies" in capsys.readouterr().out
