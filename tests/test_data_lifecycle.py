"""Customers' data: purging a tenant, a user's export and erasure, retention that runs on its own."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import yaml
from pydantic import SecretStr

from chatgateway.config import TenantConfig
from chatgateway.daemon import Daemon
from chatgateway.models import ConversationKind, Platform, SessionKey, TenantId
from chatgateway.retention import DAY, prune_expired
from chatgateway.store.base import SessionStore
from chatgateway.store.sqlite import SqliteStore
from chatgateway.tenants import TenantRegistry
from tests.conftest import ADMIN_TOKEN, MakeGateway, tenant, url
from tests.process import GatewayProcess
from tests.test_store import postgres_schema

ACME_KEY = "acme-key-0123456789abcdef"
BETA_KEY = "beta-key-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ACME = {"Authorization": f"Bearer {ACME_KEY}"}
BETA = {"Authorization": f"Bearer {BETA_KEY}"}


def config(*tenants: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"admin": {"token": {"value": ADMIN_TOKEN}}, "tenants": list(tenants), **extra}


ACME_T = tenant("acme", keys=[ACME_KEY])
BETA_T = tenant("beta", keys=[BETA_KEY])


async def chat(
    http: aiohttp.ClientSession,
    daemon: Daemon,
    headers: dict[str, str],
    user: str,
    message: str = "hello",
    **body: Any,
) -> str:
    async with http.post(
        url(daemon, "/api/chat"), headers=headers, json={"userId": user, "message": message, **body}
    ) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["sessionId"])


def rows_of(path: str, tenant_id: str) -> dict[str, int]:
    """Rows of `tenant_id` in every table of the SQLite file that has a tenant_id column."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT m.name FROM sqlite_master m, pragma_table_info(m.name) p "
                "WHERE m.type = 'table' AND p.name = 'tenant_id'"
            )
        ]
        return {
            t: conn.execute(
                f"SELECT count(*) FROM {t} WHERE tenant_id = ?", (tenant_id,)
            ).fetchone()[0]
            for t in tables
        }
    finally:
        conn.close()


def db_path(daemon: Daemon) -> str:
    assert isinstance(daemon.store, SqliteStore)
    return daemon.store.path


# Purge -----------------------------------------------------------------------------------------


async def test_purge_of_a_runtime_tenant_removes_it_and_reports_what_it_deleted(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    daemon = await make_gateway(config(ACME_T))
    spec = tenant("gamma")
    async with http.post(url(daemon, "/admin/tenants"), headers=ADMIN, json=spec) as r:
        assert r.status == 201
    async with http.post(url(daemon, "/admin/tenants/gamma/keys"), headers=ADMIN) as r:
        key = (await r.json())["key"]
    gamma = {"Authorization": f"Bearer {key}"}
    await chat(http, daemon, gamma, "u1")
    await chat(http, daemon, gamma, "u2")
    await chat(http, daemon, ACME, "u1")
    async with http.post(url(daemon, "/admin/tenants/gamma/purge"), headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        report = await r.json()
    assert report["tenantId"] == "gamma" and report["tenantRemoved"] is True
    deleted = report["deleted"]
    assert (deleted["sessions"], deleted["turns"], deleted["apiKeys"], deleted["tenants"]) == (
        2,
        4,
        1,
        1,
    )
    assert not any(rows_of(db_path(daemon), "gamma").values())
    async with http.get(url(daemon, "/admin/tenants/gamma"), headers=ADMIN) as r:
        assert r.status == 404
    async with http.get(url(daemon, "/api/sessions"), headers=gamma) as r:
        assert r.status == 401
    assert rows_of(db_path(daemon), "acme")["sessions"] == 1  # nobody else's data went


async def test_purge_of_a_former_config_tenant_after_it_was_removed_from_the_file(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    daemon = await make_gateway(config(ACME_T, BETA_T))
    await chat(http, daemon, BETA, "u1")
    await chat(http, daemon, BETA, "u1", newSession=True)
    await chat(http, daemon, ACME, "u1")
    # Still configured: refused, nothing deleted.
    async with http.post(url(daemon, "/admin/tenants/beta/purge"), headers=ADMIN) as r:
        assert r.status == 409
        assert "config file" in (await r.json())["error"]["message"]
    assert rows_of(db_path(daemon), "beta")["sessions"] == 2
    daemon.config_path.write_text(
        yaml.safe_dump({**yaml.safe_load(daemon.config_path.read_text()), "tenants": [ACME_T]})
    )
    async with http.post(url(daemon, "/admin/reload"), headers=ADMIN) as r:
        assert (await r.json())["changes"] == ["removed beta"]
    async with http.delete(url(daemon, "/admin/tenants/beta"), headers=ADMIN) as r:
        assert r.status == 404  # the runtime-tenant delete does not know it
    async with http.post(url(daemon, "/admin/tenants/beta/purge"), headers=ADMIN) as r:
        assert r.status == 200
        report = await r.json()
    assert report["tenantRemoved"] is False
    assert report["deleted"]["sessions"] == 2 and report["deleted"]["turns"] == 4
    assert not any(rows_of(db_path(daemon), "beta").values())
    assert rows_of(db_path(daemon), "acme")["sessions"] == 1
    async with http.post(url(daemon, "/admin/tenants/beta/purge"), headers=ADMIN) as r:
        assert r.status == 200  # again: nothing left, zero counts
        assert not any((await r.json())["deleted"].values())


async def test_purge_needs_the_admin_token(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    daemon = await make_gateway(config(ACME_T, BETA_T))
    await chat(http, daemon, BETA, "u1")
    for headers, status in (({}, 401), (ACME, 401), (BETA, 401)):
        async with http.post(url(daemon, "/admin/tenants/beta/purge"), headers=headers) as r:
            assert r.status == status
            assert "error" in await r.json()
    assert rows_of(db_path(daemon), "beta")["sessions"] == 1


# A user's export and erasure ---------------------------------------------------------------


async def test_a_tenant_key_exports_its_own_user_and_never_another_tenants(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    daemon = await make_gateway(config(ACME_T, BETA_T))
    first = await chat(http, daemon, ACME, "alice", "first question")
    second = await chat(http, daemon, ACME, "alice", "second question", newSession=True)
    await chat(http, daemon, ACME, "bob", "bob's question")
    await chat(http, daemon, BETA, "carol", "carol is beta's")
    async with http.get(url(daemon, "/api/users/alice/export"), headers=ACME) as r:
        assert r.status == 200
        export = await r.json()
    assert export["tenantId"] == "acme" and export["userId"] == "alice"
    assert [s["sessionId"] for s in export["sessions"]] == [first, second]
    assert [t["text"] for t in export["sessions"][0]["transcript"]] == [
        "first question",
        "echo: first question",
    ]
    assert all(s["userId"] == "alice" for s in export["sessions"])
    # Another tenant's user: 404, as if it did not exist; naming the other tenant: 403.
    async with http.get(url(daemon, "/api/users/carol/export"), headers=ACME) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"
    async with http.get(url(daemon, "/api/users/alice/export"), headers=BETA) as r:
        assert r.status == 404
    async with http.get(url(daemon, "/api/users/carol/export?tenantId=beta"), headers=ACME) as r:
        assert r.status == 403
    async with http.get(url(daemon, "/admin/tenants/beta/users/carol/export"), headers=ACME) as r:
        assert r.status == 401
    async with http.get(
        url(daemon, "/api/users/alice/export?platform=telegram"), headers=ACME
    ) as r:
        assert r.status == 400


async def test_the_platform_filter_and_the_admin_routes(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    daemon = await make_gateway(config(ACME_T, BETA_T))
    web = await chat(http, daemon, ACME, "U42", "from the web")
    assert daemon.store is not None
    slack = await daemon.store.create_session(
        SessionKey(TenantId("acme"), Platform.SLACK, "C1", "", "U42"),
        kind=ConversationKind.CHANNEL,
        user_name="Slack U42",
        now=time.time(),
    )
    path = "/admin/tenants/acme/users/U42"
    async with http.get(url(daemon, f"{path}/export?platform=slack"), headers=ADMIN) as r:
        assert [s["sessionId"] for s in (await r.json())["sessions"]] == [slack.id]
    async with http.get(url(daemon, f"{path}/export"), headers=ADMIN) as r:
        assert {s["platform"] for s in (await r.json())["sessions"]} == {"web", "slack"}
    async with http.delete(url(daemon, f"{path}?platform=slack"), headers=ADMIN) as r:
        assert r.status == 200
        assert (await r.json())["deleted"] == {"sessions": 1, "turns": 0}
    async with http.get(url(daemon, "/api/users/U42/export"), headers=ACME) as r:
        assert [s["sessionId"] for s in (await r.json())["sessions"]] == [web]
    async with http.get(url(daemon, "/admin/tenants/beta/users/U42/export"), headers=ADMIN) as r:
        assert r.status == 404


async def test_erasure_deletes_the_users_sessions_and_nobody_elses(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    daemon = await make_gateway(config(ACME_T, BETA_T))
    gone = await chat(http, daemon, ACME, "alice", "one")
    await chat(http, daemon, ACME, "alice", "two", newSession=True)
    bob = await chat(http, daemon, ACME, "bob")
    beta_alice = await chat(http, daemon, BETA, "alice")
    # Another tenant's key cannot erase acme's alice: it reaches beta's alice only.
    async with http.delete(url(daemon, "/api/users/bob"), headers=BETA) as r:
        assert r.status == 404
    async with http.delete(url(daemon, "/api/users/alice"), headers=ACME) as r:
        assert r.status == 200
        assert (await r.json())["deleted"] == {"sessions": 2, "turns": 4}
    async with http.get(url(daemon, f"/api/sessions/{gone}"), headers=ACME) as r:
        assert r.status == 404
    async with http.get(url(daemon, "/api/users/alice/export"), headers=ACME) as r:
        assert r.status == 404
    async with http.delete(url(daemon, "/api/users/alice"), headers=ACME) as r:
        assert r.status == 404
    conn = sqlite3.connect(f"file:{db_path(daemon)}?mode=ro", uri=True)
    try:
        left = conn.execute(
            "SELECT count(*) FROM sessions WHERE tenant_id = 'acme' AND user_id = 'alice'"
        ).fetchone()[0]
        orphans = conn.execute(
            "SELECT count(*) FROM turns WHERE session_id NOT IN (SELECT id FROM sessions)"
        ).fetchone()[0]
    finally:
        conn.close()
    assert (left, orphans) == (0, 0)
    async with http.get(url(daemon, f"/api/sessions/{bob}"), headers=ACME) as r:
        assert r.status == 200
    async with http.get(url(daemon, f"/api/sessions/{beta_alice}"), headers=BETA) as r:
        assert r.status == 200
    # Alice may come back: a new, empty history.
    back = await chat(http, daemon, ACME, "alice", "hello again")
    assert back != gone


async def test_a_visitor_token_reaches_its_own_web_sessions_only(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    daemon = await make_gateway(config(ACME_T))
    async with http.post(
        url(daemon, "/api/visitor-token"), headers=ACME, json={"userId": "visitor-1"}
    ) as r:
        assert r.status == 200, await r.text()
        token = (await r.json())["token"]
    visitor = {"Authorization": f"Bearer {token}"}
    await chat(http, daemon, ACME, "visitor-1")
    await chat(http, daemon, ACME, "visitor-2")
    async with http.get(url(daemon, "/api/users/visitor-2/export"), headers=visitor) as r:
        assert r.status == 404
    async with http.delete(url(daemon, "/api/users/visitor-2"), headers=visitor) as r:
        assert r.status == 404
    async with http.get(url(daemon, "/api/users/visitor-1/export"), headers=visitor) as r:
        assert r.status == 200
        assert (await r.json())["platform"] == "web"
    async with http.get(url(daemon, "/api/users/visitor-2/export"), headers=ACME) as r:
        assert r.status == 200


# Retention -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    async with AsyncExitStack() as stack:
        s: SessionStore
        if request.param == "postgres":
            from chatgateway.store.postgres import PostgresStore

            s = PostgresStore(SecretStr(await stack.enter_async_context(postgres_schema())))
        else:
            s = SqliteStore(tmp_path / "store.db")
        await s.open()
        stack.push_async_callback(s.close)
        yield s


async def test_retention_with_a_moved_clock(store: SessionStore) -> None:
    registry = TenantRegistry(store, {})
    await registry.load(
        [
            TenantConfig.model_validate(
                {"id": "short", "agent": {"builtin": "echo"}, "sessions": {"retention_days": 1}}
            ),
            TenantConfig.model_validate({"id": "long", "agent": {"builtin": "echo"}}),  # 30 days
        ]
    )
    start = time.time()

    async def session(tenant_id: str, at: float) -> None:
        key = SessionKey(TenantId(tenant_id), Platform.WEB, f"c{at}", "", "u")
        await store.create_session(key, kind=ConversationKind.WEB, user_name=None, now=at)

    await session("short", start)
    await session("short", start + 2 * DAY)
    await session("long", start)
    assert await prune_expired(store, registry.all(), start + DAY - 1) == {"short": 0, "long": 0}
    assert await prune_expired(store, registry.all(), start + DAY + 1) == {"short": 1, "long": 0}
    assert await prune_expired(store, registry.all(), start + 30 * DAY + 1) == {
        "short": 1,
        "long": 1,
    }
    assert await store.count_sessions(TenantId("short")) == 0
    await registry.close()


async def wait_until(check: Callable[[], Any], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_the_daemon_prunes_on_its_own_clock(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    storage = {"path": str(tmp_path / "gw.db"), "prune_interval": 0.1}
    daemon = await make_gateway(config(ACME_T, storage=storage))
    kept_until = time.time()
    await chat(http, daemon, ACME, "u1")
    assert daemon.store is not None
    store = daemon.store

    async def pruned() -> bool:
        return await store.count_sessions(TenantId("acme")) == 0

    runs: list[float] = []

    def real_clock() -> float:
        runs.append(time.time())
        return runs[-1]

    async def ran_twice() -> bool:
        return len(runs) >= 2

    daemon.clock = real_clock
    await wait_until(ran_twice)  # two runs on the real clock: nothing is old enough
    assert not await pruned()
    daemon.clock = lambda: kept_until + 30 * DAY + 60
    await wait_until(pruned)


def test_the_real_daemon_prunes_sessions_past_retention_without_being_asked(
    gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    # Two seconds of retention, checked five times a second.
    short = tenant("acme", keys=[ACME_KEY], sessions={"retention_days": 2 / 86400})
    proc = gateway_process(
        config(short, storage={"path": str(tmp_path / "gw.db"), "prune_interval": 0.2})
    )
    r = requests.post(
        f"{proc.url}/api/chat", headers=ACME, json={"userId": "u1", "message": "hi"}, timeout=10
    )
    assert r.status_code == 200
    session_id = r.json()["sessionId"]
    assert (
        requests.get(f"{proc.url}/api/sessions/{session_id}", headers=ACME, timeout=10).status_code
        == 200
    )
    event = proc.wait_for_event("sessions_pruned", tenant_id="acme")
    assert event["count"] == 1
    assert (
        requests.get(f"{proc.url}/api/sessions/{session_id}", headers=ACME, timeout=10).status_code
        == 404
    )
    assert proc.stop() == 0
