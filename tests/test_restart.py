"""The real `chatgateway run` process: sessions, transcripts and runtime tenants survive a restart."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import ADMIN_TOKEN, tenant
from tests.test_store import postgres_schema, write_locked


async def post(http, base, path, key, body):
    async with http.post(base + path, json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


async def get(http, base, path, key):
    async with http.get(base + path, headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def storage(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[dict[str, Any]]:
    """The `storage` section of a config, for each backend (a fresh schema for PostgreSQL)."""
    if request.param == "sqlite":
        yield {"path": str(tmp_path / "state" / "gateway.db")}
        return
    async with postgres_schema() as dsn:
        yield {"backend": "postgres", "dsn": {"value": dsn}}


async def test_kill_and_restart_keeps_everything(
    gateway_process, make_agent, http, storage
):
    agent = await make_agent()
    config = {"admin": {"token": {"value": ADMIN_TOKEN}},
              "storage": storage,
              "tenants": [tenant("acme", agent.url, keys=["acme-key-000001"])]}
    proc = gateway_process(config)
    status, first = await post(http, proc.url, "/api/chat", "acme-key-000001",
                               {"message": "remember me", "userId": "u1"})
    assert status == 200
    status, _ = await post(http, proc.url, "/admin/tenants", ADMIN_TOKEN,
                           {"id": "runtime-co", "agent": {"builtin": "echo"}})
    assert status == 201
    status, key = await post(http, proc.url, "/admin/tenants/runtime-co/keys", ADMIN_TOKEN, {})
    assert status == 201
    status, rt = await post(http, proc.url, "/api/chat", key["key"],
                            {"message": "runtime hello", "userId": "r1"})
    assert (status, rt["response"]) == (200, "echo: runtime hello")

    proc.kill()  # SIGKILL: no chance to flush anything
    assert proc.proc.returncode == -signal.SIGKILL

    proc2 = gateway_process(config)
    status, again = await post(http, proc2.url, "/api/chat", "acme-key-000001",
                               {"message": "did you?", "userId": "u1"})
    assert status == 200 and again["sessionId"] == first["sessionId"]
    assert agent.calls[-1].body["history"][0]["text"] == "remember me"
    status, detail = await get(http, proc2.url, f"/api/sessions/{first['sessionId']}",
                               "acme-key-000001")
    assert [t["text"] for t in detail["transcript"]] == [
        "remember me", "agent: remember me", "did you?", "agent: did you?"]
    status, rt2 = await post(http, proc2.url, "/api/chat", key["key"],
                             {"message": "still here?", "userId": "r1"})
    assert (status, rt2["sessionId"]) == (200, rt["sessionId"])
    status, tenants = await get(http, proc2.url, "/admin/tenants", ADMIN_TOKEN)
    assert {t["id"]: t["source"] for t in tenants} == {"acme": "config", "runtime-co": "runtime"}
    assert proc2.stop() == 0


async def test_embedded_default_config_runs_and_echoes(gateway_process, tmp_path):
    """The quickstart: the shipped embedded default, no key, the echo agent (port made free)."""
    from pathlib import Path

    import yaml

    root = Path(__file__).parent.parent
    shipped = yaml.safe_load((root / "chatgateway" / "cli" / "default.yaml").read_text())
    shipped["listen"]["port"] = 0
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(shipped))
    proc = gateway_process(path)
    async with aiohttp.ClientSession() as http:
        async with http.post(proc.url + "/api/chat",
                             json={"message": "hello", "userId": "me"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["response"] == "echo: hello"
    assert (tmp_path / "chatgateway.db").exists()  # beside the config file
    assert proc.stop() == 0
    handled = [e for e in proc.events() if e.get("event") == "message_handled"]
    assert handled and {"tenant_id", "platform", "session_id", "latency_ms", "outcome"} <= set(
        handled[0])


async def test_a_held_write_lock_delays_replies_but_not_the_gateway_and_loses_nothing(
    gateway_process, make_agent, http, tmp_path
):
    """Another program holding SQLite's write lock (a backup, an `sqlite3` shell): replies wait
    for their transcript, the event loop keeps answering, and every exchange is kept."""
    import asyncio
    import time

    agent = await make_agent()
    db = tmp_path / "state" / "gateway.db"
    config = {"storage": {"path": str(db)},
              "tenants": [tenant("acme", agent.url, keys=["acme-key-000001"])]}
    proc = gateway_process(config)
    status, first = await post(http, proc.url, "/api/chat", "acme-key-000001",
                               {"message": "before", "userId": "u1"})
    assert status == 200
    with write_locked(str(db)):
        chats = [asyncio.create_task(post(http, proc.url, "/api/chat", "acme-key-000001",
                                          {"message": f"during {i}", "userId": f"v{i}"}))
                 for i in range(1, 6)]
        await asyncio.sleep(0.5)
        assert not any(c.done() for c in chats)  # each reply waits for its transcript
        started = time.monotonic()
        async with http.get(proc.url + "/healthz") as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 1.0  # the event loop is not stuck on the lock
    answers = await asyncio.wait_for(asyncio.gather(*chats), 10)
    assert [status for status, _ in answers] == [200] * 5
    proc.kill()
    proc2 = gateway_process(config)
    for i, (_, body) in enumerate(answers, start=1):
        status, detail = await get(http, proc2.url, f"/api/sessions/{body['sessionId']}",
                                   "acme-key-000001")
        assert [t["text"] for t in detail["transcript"]] == [f"during {i}", f"agent: during {i}"]
    status, detail = await get(http, proc2.url, f"/api/sessions/{first['sessionId']}",
                               "acme-key-000001")
    assert [t["text"] for t in detail["transcript"]] == ["before", "agent: before"]
    assert proc2.stop() == 0
