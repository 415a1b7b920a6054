"""GET /healthz, /readyz, /metrics and /admin/status on an in-process gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatgateway import supervisor as supervisor_module
from chatgateway.daemon import Daemon
from chatgateway.models import (
    Conversation,
    ConversationKind,
    NormalizedMessage,
    Platform,
    TenantId,
    User,
)
from tests.conftest import ADMIN_TOKEN, tenant, url, write_config
from tests.process import GatewayProcess
from tests.test_lifecycle_supervisor import ScriptedAdapter, wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEY = "acme-key-0123456789"


@pytest.fixture
def scripted_discord(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Discord bots in these configs are ScriptedAdapters (their token picks the behaviour)."""
    ScriptedAdapter.instances = []
    ScriptedAdapter.released = asyncio.Event()
    monkeypatch.setitem(
        supervisor_module.ADAPTERS,
        Platform.DISCORD,
        "tests.test_lifecycle_supervisor:ScriptedAdapter",
    )
    yield
    ScriptedAdapter.released.set()


def bots(*tokens: str) -> dict[str, Any]:
    return {"bots": [{"name": f"bot{i}", "token": {"value": t}} for i, t in enumerate(tokens)]}


async def scrape(
    http, daemon: Daemon | GatewayProcess, **kwargs: Any
) -> dict[tuple[str, tuple], float]:
    """GET /metrics as {(sample name, sorted labels): value}."""
    async with http.get(url(daemon, "/metrics"), **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/plain"
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def labels(**kw: str) -> tuple:
    return tuple(sorted(kw.items()))


async def test_healthz_and_readyz(make_gateway, http):
    gw = await make_gateway({"tenants": [tenant("acme")]})
    async with http.get(url(gw, "/healthz")) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    async with http.get(url(gw, "/readyz")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ready", "state": "ready"}


async def test_readyz_is_503_until_adapters_have_started(scripted_discord, tmp_path: Path, http):
    config = {"tenants": [tenant("acme", discord=bots("hang:token-0123456789"))]}
    daemon = Daemon(write_config(tmp_path, config), {})
    starting = asyncio.create_task(daemon.start())
    try:
        await wait_until(lambda: daemon.port is not None and bool(ScriptedAdapter.instances))
        async with http.get(url(daemon, "/readyz")) as resp:
            assert resp.status == 503
            assert await resp.json() == {"status": "unavailable", "state": "starting"}
        async with http.get(url(daemon, "/healthz")) as resp:
            assert resp.status == 200, "alive while starting"
        assert ScriptedAdapter.released is not None
        ScriptedAdapter.released.set()
        await starting
        async with http.get(url(daemon, "/readyz")) as resp:
            assert resp.status == 200
    finally:
        assert ScriptedAdapter.released is not None
        ScriptedAdapter.released.set()
        await asyncio.gather(starting, return_exceptions=True)
        await daemon.stop()


async def test_metrics_count_messages_latency_failures_sessions(make_agent, make_gateway, http):
    failing = await make_agent(status=500)
    gw = await make_gateway(
        {
            "tenants": [
                tenant("acme", keys=[KEY]),
                tenant(
                    "globex",
                    failing.url,
                    keys=["globex-key-0123456789"],
                    agent={"retry": {"attempts": 1}},
                ),
            ]
        }
    )
    before = await scrape(http, gw)
    assert ("chatgateway_messages_in_total", labels(platform="web", tenant="acme")) not in before

    for key in (KEY, "globex-key-0123456789"):
        async with http.post(
            url(gw, "/api/chat"),
            json={"message": "count me", "userId": "u1"},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            assert resp.status == 200

    m = await scrape(http, gw)
    web_acme = labels(platform="web", tenant="acme")
    assert m[("chatgateway_messages_in_total", web_acme)] == 1
    assert m[("chatgateway_messages_out_total", web_acme)] == 1
    assert m[("chatgateway_agent_call_seconds_count", web_acme)] == 1
    assert m[("chatgateway_agent_call_seconds_sum", web_acme)] >= 0
    web_globex = labels(platform="web", tenant="globex")
    assert m[("chatgateway_messages_in_total", web_globex)] == 1
    assert (
        m[
            (
                "chatgateway_agent_failures_total",
                labels(cause="http_5xx", platform="web", tenant="globex"),
            )
        ]
        == 1
    )
    assert m[("chatgateway_active_sessions", web_acme)] == 1
    assert m[("chatgateway_active_sessions", web_globex)] == 1
    assert m[("chatgateway_ready", ())] == 1
    assert m[("chatgateway_tenants", ())] == 2
    assert m[("chatgateway_messages_in_flight", ())] == 0


async def test_metrics_count_deduplicated_platform_events(make_gateway, http):
    gw = await make_gateway({"tenants": [tenant("acme")]})
    assert gw.pipeline is not None
    message = NormalizedMessage(
        tenant_id=TenantId("acme"),
        platform=Platform.SLACK,
        conversation=Conversation(id="C1", kind=ConversationKind.CHANNEL),
        user=User(id="U1"),
        text="once",
        message_id="Ev-1",
        timestamp=time.time(),
    )
    assert (await gw.pipeline.handle(message)).outcome == "ok"
    assert (await gw.pipeline.handle(message)).outcome == "duplicate"
    m = await scrape(http, gw)
    slack = labels(platform="slack", tenant="acme")
    assert m[("chatgateway_deduplicated_events_total", slack)] == 1
    assert m[("chatgateway_messages_out_total", slack)] == 1


async def test_metrics_show_live_adapter_states(scripted_discord, make_gateway, http):
    """Adapters set CONNECTED themselves; /metrics reads the live state at scrape time."""
    gw = await make_gateway(
        {
            "tenants": [
                tenant("acme", discord=bots("ok:token-0123456789", "auth:token-9876543210")),
                tenant("globex", discord=bots("flaky-2:token-5555555555")),
            ]
        }
    )
    acme0 = labels(adapter="bot0", platform="discord", tenant="acme")
    acme1 = labels(adapter="bot1", platform="discord", tenant="acme")
    globex0 = labels(adapter="bot0", platform="discord", tenant="globex")
    m = await scrape(http, gw)
    assert m[("chatgateway_adapter_up", acme0)] == 1
    assert m[("chatgateway_adapter_parked", acme0)] == 0
    assert m[("chatgateway_adapter_up", acme1)] == 0
    assert m[("chatgateway_adapter_parked", acme1)] == 1
    assert m[("chatgateway_adapter_reconnects_total", acme0)] == 0

    # globex's bot fails twice (backoff 1 s, jittered), then connects by itself.
    flaky = next(a for a in ScriptedAdapter.instances if a.status.tenant_id == "globex")
    await wait_until(lambda: flaky.status.state.value == "connected", within=15)
    m = await scrape(http, gw)
    assert m[("chatgateway_adapter_up", globex0)] == 1
    assert m[("chatgateway_adapter_reconnects_total", globex0)] == 2


async def test_metrics_access(make_gateway, http):
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}}, "tenants": []})
    await scrape(http, gw)  # a loopback scraper needs no token
    await scrape(http, gw, headers=ADMIN)
    async with http.get(url(gw, "/metrics"), headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401


async def test_admin_status(scripted_discord, make_gateway, http):
    leaky_token = "leaky:token-that-must-not-show-0123"
    gw = await make_gateway(
        {
            "admin": {"token": {"value": ADMIN_TOKEN}},
            "tenants": [
                tenant("acme", keys=[KEY], discord=bots("ok:token-0123456789", leaky_token)),
                tenant("globex", web={"enabled": False}),
            ],
        }
    )
    async with http.get(url(gw, "/admin/status")) as resp:
        assert resp.status == 401
    async with http.get(url(gw, "/admin/status"), headers={"Authorization": "Bearer no"}) as resp:
        assert resp.status == 401
    async with http.post(
        url(gw, "/api/chat"),
        json={"message": "hi", "userId": "u1"},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        assert resp.status == 200
    ok_bot = ScriptedAdapter.instances[0]
    ok_bot.status.event_seen()

    async with http.get(url(gw, "/admin/status"), headers=ADMIN) as resp:
        assert resp.status == 200
        text = await resp.text()
        status = await resp.json()
    assert leaky_token not in text
    assert status["state"] == "ready" and status["ready"] is True
    assert status["inFlight"] == 0 and status["lastReload"] is None
    assert status["listen"]["port"] == gw.port
    acme, globex = status["tenants"]
    assert acme["id"] == "acme" and acme["source"] == "config"
    assert acme["sessions"] == {"active": 1, "total": 1}
    assert globex["web"] == {"enabled": False} and globex["adapters"] == []
    bot0, bot1 = acme["adapters"]
    assert bot0["platform"] == "discord" and bot0["name"] == "bot0"
    assert bot0["state"] == "connected" and bot0["lastError"] is None
    assert bot0["lastEventAt"] == pytest.approx(time.time(), abs=30)
    assert bot1["state"] in ("backoff", "connecting")
    assert bot1["lastError"] == "ConnectionError: handshake failed for token [redacted]"
    assert bot1["reconnects"] >= 1


async def test_admin_status_is_off_without_an_admin_token(make_gateway, http):
    gw = await make_gateway({"tenants": [tenant("acme")]})
    async with http.get(url(gw, "/admin/status"), headers=ADMIN) as resp:
        assert resp.status == 403
    async with http.post(url(gw, "/admin/reload"), headers=ADMIN) as resp:
        assert resp.status == 403


async def test_metrics_count_a_message_on_the_real_daemon(gateway_process, make_agent, http):
    """The `chatgateway run` process serves the counters its pipeline updates."""
    agent = await make_agent()
    proc = gateway_process({"tenants": [tenant("acme", agent.url, keys=[KEY])]})
    web_acme = labels(platform="web", tenant="acme")
    before = await scrape(http, proc)
    assert ("chatgateway_messages_in_total", web_acme) not in before
    async with http.post(
        f"{proc.url}/api/chat",
        json={"message": "count me", "userId": "u1"},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        assert (resp.status, (await resp.json())["response"]) == (200, "agent: count me")
    m = await scrape(http, proc)
    assert m[("chatgateway_messages_in_total", web_acme)] == 1
    assert m[("chatgateway_messages_out_total", web_acme)] == 1
    assert m[("chatgateway_agent_call_seconds_count", web_acme)] == 1
    assert m[("chatgateway_active_sessions", web_acme)] == 1
    assert m[("chatgateway_messages_in_flight", ())] == 0
    assert await asyncio.to_thread(proc.stop) == 0
