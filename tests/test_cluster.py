"""Three real `chatgateway run` processes on one PostgreSQL database (cluster.coordination:
postgres): one session across instances, one agent call at a time per session, admin changes
everywhere within 2 s, and a rolling restart under traffic that loses nothing."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from chatgateway.testing.agent import AgentCall
from tests.conftest import ADMIN_TOKEN, tenant
from tests.process import GatewayProcess
from tests.test_store import postgres_schema

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

KEY = "acme-key-000000000001"
#: How fast a change made on one instance must take effect on every other.
PROPAGATION = 2.0


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with postgres_schema() as value:
        yield value


def cluster_config(dsn: str, agent_url: str, coordination: str = "postgres") -> dict[str, Any]:
    return {
        "admin": {"token": {"value": ADMIN_TOKEN}},
        "storage": {"backend": "postgres", "dsn": {"value": dsn}},
        "cluster": {"coordination": coordination},
        "server": {"drain_seconds": 10},
        # Limits that never refuse: these tests send as fast as the instances answer.
        "tenants": [tenant("acme", agent_url, keys=[KEY], agent={"timeout": 10},
                           limits={n: {"per_minute": 1e9, "burst": 1_000_000_000}
                                   for n in ("tenant", "user")})],
    }


def start_cluster(
    gateway_process: Callable[..., GatewayProcess], config: dict[str, Any], count: int = 3
) -> list[GatewayProcess]:
    # Started one after the other: the first creates the schema, the others find it.
    return [gateway_process(config) for _ in range(count)]


async def chat(
    http: aiohttp.ClientSession, base: str, body: dict[str, Any], key: str = KEY
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        base + "/api/chat", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        return resp.status, await resp.json()


async def admin(
    http: aiohttp.ClientSession, method: str, base: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(
        method, base + path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def transcript(http: aiohttp.ClientSession, base: str, session_id: str) -> list[str]:
    async with http.get(
        f"{base}/api/sessions/{session_id}", headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        return [t["text"] for t in (await resp.json())["transcript"]]


class OverlapAgent:
    """An agent behaviour that takes its time and records calls of one session overlapping."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}

    async def __call__(self, call: AgentCall) -> web.StreamResponse:
        session = call.body["sessionId"]
        self.active[session] = self.active.get(session, 0) + 1
        self.max_active[session] = max(self.max_active.get(session, 0), self.active[session])
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active[session] -= 1
        return web.json_response({"response": "agent: " + call.body["message"]["text"]})


async def test_web_requests_spread_over_three_instances_continue_one_session(
    gateway_process, make_agent, http, dsn
):
    agent = await make_agent()
    procs = start_cluster(gateway_process, cluster_config(dsn, agent.url))
    status, first = await chat(http, procs[0].url, {"message": "m0", "userId": "u1"})
    assert status == 200
    texts = ["m0"]
    for i, proc in zip(range(1, 7), itertools.cycle(procs[1:] + procs[:1]), strict=False):
        body: dict[str, Any] = {"message": f"m{i}", "userId": "u1"}
        if i % 2:
            body["sessionId"] = first["sessionId"]  # by id; the others find the active session
        status, reply = await chat(http, proc.url, body)
        assert (status, reply["sessionId"]) == (200, first["sessionId"]), reply
        texts.append(f"m{i}")
    # Every instance answered with the full history behind it.
    assert [t["text"] for t in agent.calls[-1].body["history"] if t["role"] == "user"] == texts[:-1]
    for proc in procs:
        assert await transcript(http, proc.url, first["sessionId"]) == [
            text for m in texts for text in (m, f"agent: {m}")
        ]
    # The visitor-token secret is shared through the database: a token one instance minted
    # is accepted by another.
    async with http.post(procs[0].url + "/api/visitor-token", json={"userId": "visitor-1"},
                         headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200
        token = (await resp.json())["token"]
    status, reply = await chat(http, procs[2].url, {"message": "visitor", "userId": "visitor-1"},
                               key=token)
    assert status == 200, reply
    codes = [p.stop() for p in procs]
    assert codes == [0, 0, 0]
    assert all(
        any(e.get("event") == "gateway_started" and e.get("coordination") == "postgres"
            for e in p.events())
        for p in procs
    )


async def send_concurrently(
    http: aiohttp.ClientSession, procs: list[GatewayProcess], session_id: str, count: int
) -> list[tuple[int, dict[str, Any]]]:
    return await asyncio.gather(*(
        chat(http, procs[i % 2].url,
             {"message": f"c{i}", "userId": "u1", "sessionId": session_id})
        for i in range(count)
    ))


async def test_two_instances_receiving_one_session_at_once_call_the_agent_one_at_a_time(
    gateway_process, make_agent, http, dsn
):
    """(With `cluster.coordination: local` the agent sees two calls of the session at once.)"""
    behaviour = OverlapAgent(delay=0.15)
    agent = await make_agent(behaviour=behaviour)
    procs = start_cluster(gateway_process, cluster_config(dsn, agent.url), 2)
    status, first = await chat(http, procs[0].url, {"message": "start", "userId": "u1"})
    assert status == 200
    session = first["sessionId"]
    answers = await send_concurrently(http, procs, session, 8)
    assert [s for s, _ in answers] == [200] * 8
    assert behaviour.max_active[session] == 1  # never two calls of the session at once
    # In the order the agent received them, each call's history holds every earlier message.
    received = [c.body["message"]["text"] for c in agent.calls]
    for n, call in enumerate(agent.calls):
        assert [t["text"] for t in call.body["history"] if t["role"] == "user"] == received[:n]
    assert await transcript(http, procs[1].url, session) == [
        text for m in received for text in (m, f"agent: {m}")
    ]


async def test_admin_changes_on_one_instance_apply_on_the_others_within_two_seconds(
    gateway_process, make_agent, http, dsn
):
    agent = await make_agent()
    one, two, three = start_cluster(gateway_process, cluster_config(dsn, agent.url))

    async def until(check: Callable[[], Any], what: str) -> float:
        started = time.monotonic()
        while not await check():
            assert time.monotonic() - started < PROPAGATION, f"{what} not within {PROPAGATION} s"
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    status, _ = await admin(http, "POST", one.url, "/admin/tenants",
                            {"id": "runtime-co", "agent": {"builtin": "echo"}})
    assert status == 201
    status, created = await admin(http, "POST", one.url, "/admin/tenants/runtime-co/keys", {})
    assert status == 201
    key = created["key"]

    async def works_on(proc: GatewayProcess) -> bool:
        status, _ = await chat(http, proc.url, {"message": "hi", "userId": "r"}, key=key)
        return status == 200

    await until(lambda: works_on(two), "the new tenant on instance 2")
    await until(lambda: works_on(three), "the new tenant on instance 3")

    # A change of the tenant's spec reaches the others too.
    status, _ = await admin(http, "PUT", one.url, "/admin/tenants/runtime-co",
                            {"agent": {"builtin": "echo"}, "name": "Renamed"})
    assert status == 200

    async def renamed() -> bool:
        status, body = await admin(http, "GET", two.url, "/admin/tenants/runtime-co")
        return status == 200 and body.get("name") == "Renamed"

    await until(renamed, "the tenant change on instance 2")

    # Instance 2 has the key cached now; revoking it on instance 1 must still stop it there.
    status, _ = await admin(http, "DELETE", one.url,
                            f"/admin/tenants/runtime-co/keys/{created['keyId']}")
    assert status in (200, 204)

    async def refused_on_two() -> bool:
        status, _ = await chat(http, two.url, {"message": "still?", "userId": "r"}, key=key)
        return status == 401

    await until(refused_on_two, "the key revocation on instance 2")

    status, _ = await admin(http, "DELETE", one.url, "/admin/tenants/runtime-co")
    assert status in (200, 204)

    async def gone_on_three() -> bool:
        status, _ = await admin(http, "GET", three.url, "/admin/tenants/runtime-co")
        return status == 404

    await until(gone_on_three, "the tenant deletion on instance 3")
    assert [p.stop() for p in (one, two, three)] == [0, 0, 0]


async def test_a_rolling_restart_under_traffic_loses_no_message(
    gateway_process, make_agent, http, dsn
):
    agent = await make_agent(delay=0.05)
    config = cluster_config(dsn, agent.url)
    procs = start_cluster(gateway_process, config)
    urls = [p.url for p in procs]
    answered: dict[str, list[str]] = {}
    sessions: dict[str, str] = {}
    refused = {"retryable_status": 0, "connect": 0, "disconnected": 0}
    unexpected: list[str] = []
    stop = asyncio.Event()

    async def send(worker: str, text: str) -> None:
        """Send one message like a load balancer would: refused before processing -> retry."""
        while True:
            base = random.choice(urls)
            try:
                status, body = await chat(http, base, {"message": text, "userId": worker})
            except aiohttp.ClientConnectorError:
                refused["connect"] += 1  # nobody listening: nothing was processed
                await asyncio.sleep(0.02)
                continue
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # A keep-alive connection the stopping instance closed as the request went out.
                # Retried with the same text: had it been processed, the transcript check below
                # would find the message twice.
                refused["disconnected"] += 1
                await asyncio.sleep(0.02)
                continue
            except aiohttp.ClientError as exc:
                unexpected.append(f"{text}: {type(exc).__name__}: {exc}")
                return
            if status == 503:
                refused["retryable_status"] += 1
                await asyncio.sleep(0.02)
                continue
            if status != 200:
                unexpected.append(f"{text}: HTTP {status} {body}")
                return
            answered.setdefault(worker, []).append(text)
            sessions.setdefault(worker, body["sessionId"])
            if sessions[worker] != body["sessionId"]:
                unexpected.append(f"{text}: another session {body['sessionId']}")
            return

    async def worker(name: str) -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            await send(name, f"{name}-{n}")

    workers = [asyncio.create_task(worker(f"w{i}")) for i in range(6)]
    try:
        await agent.wait_calls(20)
        for index in range(len(procs)):
            old = procs[index]
            calls_before = len(agent.calls)
            old.signal(15)  # SIGTERM: drain, then exit
            assert await asyncio.to_thread(old.proc.wait, 30) == 0, old.output()
            # In a thread: the clients and the agent in this event loop keep going meanwhile.
            new = await asyncio.to_thread(gateway_process, config)
            procs[index] = new
            urls[index] = new.url
            await agent.wait_calls(calls_before + 20)  # traffic kept flowing meanwhile
        await agent.wait_calls(len(agent.calls) + 20)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 30)
    assert not unexpected, unexpected
    total = sum(len(texts) for texts in answered.values())
    assert total > 80
    assert sum(refused.values()) > 0  # the restarts were felt
    # Every answered message is in its session's transcript exactly once, in order, with its
    # answer; and nothing that was refused (or cut off) got processed.
    for name, texts in answered.items():
        assert await transcript(http, procs[0].url, sessions[name]) == [
            text for m in texts for text in (m, f"agent: {m}")
        ]
    assert sorted(agent.texts()) == sorted(t for texts in answered.values() for t in texts)
    print(f"answered {total}, refused before processing {refused}")
    assert [p.stop() for p in procs] == [0, 0, 0]
