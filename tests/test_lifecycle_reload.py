"""SIGHUP and POST /admin/reload on the real daemon: apply only the difference, reject bad files."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from chatgateway.testing.agent import AgentCall
from tests.conftest import ADMIN_TOKEN, tenant, write_config

KEYS = {t: f"{t}-key-0123456789" for t in ("alpha", "bravo", "charlie", "delta")}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def auth(tenant_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant_id]}"}


async def chat(
    http: aiohttp.ClientSession, base: str, tenant_id: str, text: str, user: str = "u1"
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{base}/api/chat", json={"message": text, "userId": user}, headers=auth(tenant_id)
    ) as resp:
        return resp.status, await resp.json()


async def wait_event(proc, name: str, **fields: Any) -> dict[str, Any]:
    return await asyncio.to_thread(proc.wait_for_event, name, 20.0, **fields)


def count_events(proc, name: str) -> int:
    return sum(1 for e in proc.events() if e.get("event") == name)


async def test_sighup_applies_only_the_difference(make_agent, gateway_process, http, tmp_path):
    bravo_old, bravo_new = await make_agent(prefix="old: "), await make_agent(prefix="new: ")
    delta_agent = await make_agent(prefix="delta: ")
    base_config: dict[str, Any] = {
        "admin": {"token": {"value": ADMIN_TOKEN}},
        "tenants": [
            tenant("alpha", keys=[KEYS["alpha"]]),
            tenant("bravo", bravo_old.url, keys=[KEYS["bravo"]]),
            tenant("delta", delta_agent.url, keys=[KEYS["delta"]]),
        ],
    }
    path = write_config(tmp_path, base_config)
    proc = gateway_process(path)
    base = proc.url

    status, first = await chat(http, base, "delta", "remember me")
    assert status == 200 and first["response"] == "delta: remember me"
    assert (await chat(http, base, "alpha", "hi"))[0] == 200
    assert (await chat(http, base, "bravo", "hi"))[1]["response"] == "old: hi"
    assert (await chat(http, base, "charlie", "hi"))[0] == 401

    # Remove alpha, point bravo at a new agent URL, add charlie; delta is unchanged.
    new_config = {
        **base_config,
        "tenants": [
            tenant("bravo", bravo_new.url, keys=[KEYS["bravo"]]),
            tenant("charlie", keys=[KEYS["charlie"]]),
            tenant("delta", delta_agent.url, keys=[KEYS["delta"]]),
        ],
    }
    write_config(tmp_path, new_config)
    proc.signal(signal.SIGHUP)
    reloaded = await wait_event(proc, "config_reloaded")
    assert sorted(reloaded["changes"]) == ["added charlie", "changed bravo", "removed alpha"]

    status, body = await chat(http, base, "charlie", "hello")
    assert status == 200 and body["response"] == "echo: hello"
    status, body = await chat(http, base, "bravo", "again")
    assert status == 200 and body["response"] == "new: again"
    assert len(bravo_old.calls) == 1 and len(bravo_new.calls) == 1
    status, body = await chat(http, base, "alpha", "still there?")
    assert status == 401 and body["error"]["code"] == "unauthorized"

    # delta's conversation carries on: same session, and the agent sees the earlier turn.
    status, second = await chat(http, base, "delta", "do you?")
    assert status == 200 and second["sessionId"] == first["sessionId"]
    history = delta_agent.calls[-1].body["history"]
    assert [t["text"] for t in history] == ["remember me", "delta: remember me"]
    assert proc.proc.poll() is None


async def test_sighup_with_a_broken_config_keeps_the_old_one(gateway_process, http, tmp_path):
    good = {"tenants": [tenant("alpha", keys=[KEYS["alpha"]])]}
    path = write_config(tmp_path, good)
    proc = gateway_process(path)
    assert (await chat(http, proc.url, "alpha", "before"))[0] == 200

    broken = {
        "tenants": [
            {**tenant("alpha", keys=[KEYS["alpha"]]), "agent": {"url": "ftp://nope"}},
            tenant("Bad Id", keys=[KEYS["bravo"]]),
        ]
    }
    write_config(tmp_path, broken)
    proc.signal(signal.SIGHUP)
    bad_url = await wait_event(proc, "reload_rejected", path="tenants[0].agent.url")
    assert bad_url["problem"] == "must be an http:// or https:// URL"
    assert bad_url["file"] == str(path) and bad_url["level"] == "error"
    bad_id = await wait_event(proc, "reload_rejected", path="tenants[1].id")
    assert "should match pattern" in bad_id["problem"]

    status, body = await chat(http, proc.url, "alpha", "after")
    assert status == 200 and body["response"] == "echo: after"
    assert (await chat(http, proc.url, "bravo", "after"))[0] == 401
    assert count_events(proc, "config_reloaded") == 0

    # Invalid YAML is rejected the same way.
    path.write_text("tenants: [unclosed\n")
    proc.signal(signal.SIGHUP)
    event = await wait_event(proc, "reload_rejected", path="line 2, column 1")
    assert event["problem"].startswith("invalid YAML: ")
    assert (await chat(http, proc.url, "alpha", "still"))[0] == 200
    assert proc.proc.poll() is None


async def test_admin_reload_api(gateway_process, http, tmp_path):
    new_token = "new-admin-token-0123456789"
    config: dict[str, Any] = {
        "admin": {"token": {"value": ADMIN_TOKEN}},
        "logging": {"level": "info", "format": "json"},
        "tenants": [tenant("alpha", keys=[KEYS["alpha"]])],
    }
    path = write_config(tmp_path, config)
    proc = gateway_process(path)
    reload_url, status_url = f"{proc.url}/admin/reload", f"{proc.url}/admin/status"

    async with http.post(reload_url) as resp:
        assert resp.status == 401
    # Nothing changed: the reload reports no changes.
    async with http.post(reload_url, headers=ADMIN) as resp:
        assert resp.status == 200
        assert await resp.json() == {
            "ok": True,
            "at": (await resp.json())["at"],
            "changes": [],
            "restartNeeded": [],
            "errors": [],
        }

    # A broken file: 400 with the path and problem; the old config keeps serving.
    broken = {**config, "tenants": [{**tenant("alpha"), "agent": {"timeout": -1}}]}
    write_config(tmp_path, broken)
    async with http.post(reload_url, headers=ADMIN) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "invalid_config"
    assert "tenants[0].agent.timeout: Input should be greater than 0" in error["message"]
    async with http.get(status_url, headers=ADMIN) as resp:
        last = (await resp.json())["lastReload"]
    assert last["ok"] is False and "tenants[0].agent.timeout" in last["errors"][0]
    assert (await chat(http, proc.url, "alpha", "still ok"))[0] == 200

    # A new admin token, a quieter log level and a new storage path (needs a restart).
    changed = {
        **config,
        "admin": {"token": {"value": new_token}},
        "logging": {"level": "warning", "format": "json"},
        "storage": {"path": str(tmp_path / "elsewhere.db")},
        "server": {"visitor_secret": {"value": "a-new-visitor-secret-0123456789"}},
    }
    write_config(tmp_path, changed)
    async with http.post(reload_url, headers=ADMIN) as resp:
        assert resp.status == 200
        result = await resp.json()
    assert result["changes"] == ["admin token changed"]
    assert result["restartNeeded"] == ["storage", "server.visitor_secret"]
    async with http.get(status_url, headers=ADMIN) as resp:
        assert resp.status == 401, "the old admin token is refused at once"
    async with http.get(status_url, headers={"Authorization": f"Bearer {new_token}"}) as resp:
        assert resp.status == 200
    await wait_event(proc, "reload_needs_restart", keys=["storage", "server.visitor_secret"])
    handled = count_events(proc, "message_handled")
    assert (await chat(http, proc.url, "alpha", "quiet"))[0] == 200
    # The level is now warning: an info line about the message is no longer written.
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert count_events(proc, "message_handled") == handled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_changed_listen_address_moves_the_listener(gateway_process, http, tmp_path: Path):
    config = {"tenants": [tenant("alpha", keys=[KEYS["alpha"]])]}
    path = write_config(tmp_path, config)
    proc = gateway_process(path)
    old_base = proc.url
    port = free_port()
    write_config(tmp_path, {**config, "listen": {"host": "127.0.0.1", "port": port}})
    proc.signal(signal.SIGHUP)
    await wait_event(proc, "listen_changed", port=port)
    assert (await chat(http, f"http://127.0.0.1:{port}", "alpha", "moved"))[0] == 200
    try:
        async with http.get(f"{old_base}/healthz") as resp:
            old_answer = resp.status
    except aiohttp.ClientConnectionError:
        old_answer = None
    assert old_answer is None, "the old listener is closed"


async def test_reload_leaves_in_flight_calls_of_a_changed_tenant_alone(
    make_agent, gateway_process, http, tmp_path: Path
):
    """Changing a tenant's non-agent settings keeps its agent client and in-flight calls."""
    release = asyncio.Event()

    async def held(call: AgentCall) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"response": "answer to " + call.body["message"]["text"]})

    agent = await make_agent(behaviour=held)
    config = {"tenants": [tenant("alpha", agent.url, keys=[KEYS["alpha"]])]}
    path = write_config(tmp_path, config)
    proc = gateway_process(path)
    in_flight = asyncio.create_task(chat(http, proc.url, "alpha", "slow question"))
    await agent.wait_calls(1)

    changed = tenant("alpha", agent.url, keys=[KEYS["alpha"]], web={"title": "New title"})
    write_config(tmp_path, {"tenants": [changed]})
    proc.signal(signal.SIGHUP)
    reloaded = await wait_event(proc, "config_reloaded")
    assert reloaded["changes"] == ["changed alpha"]
    release.set()
    status, body = await in_flight
    assert status == 200 and body["response"] == "answer to slow question"
    assert len(agent.calls) == 1, "the call was neither broken nor retried"
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert "Unclosed" not in proc.output()
