"""SIGTERM/SIGINT on the real daemon process: stop intake, drain in-flight replies, exit 0."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from aiohttp import web

from chatgateway.testing.agent import AgentCall
from tests.conftest import tenant

KEY = "drain-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


async def held_agent(make_agent):
    """An agent that answers only when the test sets the returned event."""
    release = asyncio.Event()

    async def behaviour(call: AgentCall) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"response": "slow answer to " + call.body["message"]["text"]})

    return await make_agent(behaviour=behaviour), release


async def wait_event(proc, name: str, **fields):
    return await asyncio.to_thread(proc.wait_for_event, name, 20.0, **fields)


async def exit_code(proc) -> int:
    return await asyncio.to_thread(proc.proc.wait, 30.0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_stop_signal_drains_the_in_flight_reply_then_exits_0(
    sig, make_agent, gateway_process, http
):
    agent, release = await held_agent(make_agent)
    drain_seconds = 15.0
    proc = gateway_process(
        {
            "server": {"drain_seconds": drain_seconds},
            "tenants": [tenant("acme", agent.url, keys=[KEY])],
        }
    )
    chat = asyncio.create_task(
        http.post(f"{proc.url}/api/chat", json={"message": "hello", "userId": "u1"}, headers=AUTH)
    )
    await agent.wait_calls(1)

    signalled = time.monotonic()
    proc.signal(sig)
    await wait_event(proc, "gateway_stopping", in_flight=1)

    # Draining: new messages are refused with 503, readiness says so, liveness stays ok.
    async with http.post(
        f"{proc.url}/api/chat", json={"message": "too late", "userId": "u2"}, headers=AUTH
    ) as late:
        assert late.status == 503
        assert (await late.json())["error"]["code"] == "unavailable"
    async with http.get(f"{proc.url}/readyz") as ready:
        assert ready.status == 503
        assert (await ready.json())["state"] == "draining"
    async with http.get(f"{proc.url}/healthz") as health:
        assert health.status == 200

    release.set()
    async with await chat as resp:
        assert resp.status == 200
        assert (await resp.json())["response"] == "slow answer to hello"
    assert await exit_code(proc) == 0
    assert time.monotonic() - signalled < drain_seconds
    assert len(agent.calls) == 1, "the refused message never reached the agent"
    proc.wait_for_event("drain_complete")
    proc.wait_for_event("gateway_stopped", drained=True)


async def test_drain_deadline_bounds_the_stop(make_agent, gateway_process, http):
    agent, release = await held_agent(make_agent)
    proc = gateway_process(
        {"server": {"drain_seconds": 1}, "tenants": [tenant("acme", agent.url, keys=[KEY])]}
    )
    chat = asyncio.create_task(
        http.post(f"{proc.url}/api/chat", json={"message": "hello", "userId": "u1"}, headers=AUTH)
    )
    await agent.wait_calls(1)
    signalled = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await exit_code(proc) == 0
    # 1 s of drain, then adapters/web/store close; far below the unit's TimeoutStopSec.
    assert time.monotonic() - signalled < 15
    proc.wait_for_event("drain_incomplete", in_flight=1)
    proc.wait_for_event("gateway_stopped", drained=False)
    release.set()
    chat.cancel()
    await asyncio.gather(chat, return_exceptions=True)


async def test_a_second_signal_cuts_the_drain_short(make_agent, gateway_process, http):
    agent, release = await held_agent(make_agent)
    proc = gateway_process(
        {"server": {"drain_seconds": 300}, "tenants": [tenant("acme", agent.url, keys=[KEY])]}
    )
    chat = asyncio.create_task(
        http.post(f"{proc.url}/api/chat", json={"message": "hello", "userId": "u1"}, headers=AUTH)
    )
    await agent.wait_calls(1)
    proc.signal(signal.SIGTERM)
    await wait_event(proc, "gateway_stopping")
    signalled = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await exit_code(proc) == 0
    assert time.monotonic() - signalled < 15
    proc.wait_for_event("drain_cut_short")
    release.set()
    chat.cancel()
    await asyncio.gather(chat, return_exceptions=True)
