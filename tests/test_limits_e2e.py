"""End to end: limits, quotas and the circuit breaker through the real web app, slack-bolt and
discord.py against the loopback fakes, with a real failing agent."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from chatgateway.daemon import Daemon
from chatgateway.testing.agent import AgentCall
from tests.conftest import ADMIN_TOKEN, tenant, url
from tests.fakes.discord import FakeDiscord, user_object
from tests.test_discord_adapter import discord_tenant, until
from tests.test_discord_adapter import fake as fake
from tests.test_slack_e2e import fake_slack as fake_slack
from tests.test_slack_e2e import slack_tenant, start

KEY = "acme-key-0123456789abcdef"
ADMIN = {"token": {"value": ADMIN_TOKEN}}
#: Refusals answered at once, except where a test is about holding them.
OFF = {"tenant": None, "user": None, "address": None, "visitor_tokens": None, "refusal_delay": 0}


async def post_chat(http: aiohttp.ClientSession, gw: Daemon, body: Any, *, key: str | None = KEY,
                    path: str = "/api/chat", headers: dict[str, str] | None = None,
                    ) -> tuple[aiohttp.ClientResponse, Any]:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if isinstance(body, bytes):
        sent["Content-Type"] = "application/json"
        async with http.post(url(gw, path), data=body, headers=sent) as resp:
            return resp, await resp.json(content_type=None)
    async with http.post(url(gw, path), json=body, headers=sent) as resp:
        text = await resp.text()
        return resp, (await resp.json(content_type=None)) if text.startswith("{") else text


async def scrape(http: aiohttp.ClientSession, gw: Daemon) -> dict[tuple[str, frozenset[Any]], float]:
    async with http.get(url(gw, "/metrics")) as resp:
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def rejected(metrics: dict[tuple[str, frozenset[Any]], float], tenant_id: str, platform: str,
             reason: str) -> float:
    labels = frozenset({"tenant": tenant_id, "platform": platform, "reason": reason}.items())
    return metrics.get(("chatgateway_messages_rejected_total", labels), 0.0)


# The web API -------------------------------------------------------------------------------


async def test_tenant_flood_gets_429_with_retry_after_before_the_body_is_read(
    make_agent, make_gateway, http
):
    agent = await make_agent()
    limits = {**OFF, "tenant": {"per_minute": 60, "burst": 2, "max_wait": 0}}
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, [KEY], limits=limits)]})
    for i in range(2):
        resp, body = await post_chat(http, gw, {"message": f"m{i}", "userId": "u1"})
        assert resp.status == 200, body
    resp, body = await post_chat(http, gw, {"message": "m2", "userId": "u2"})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    assert body["error"]["code"] == "rate_limited"
    assert "faster than its limit" in body["error"]["message"]
    # Refused before the body is read: a malformed body still gets the 429, not a 400.
    resp, body = await post_chat(http, gw, b"{not json")
    assert resp.status == 429 and body["error"]["code"] == "rate_limited"
    resp, _ = await post_chat(http, gw, {"message": "m3", "userId": "u3"},
                              path="/api/chat/stream")
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    assert agent.texts() == ["m0", "m1"]
    assert rejected(await scrape(http, gw), "acme", "web", "tenant_rate") == 3


async def test_a_flood_within_max_wait_is_paced_at_the_rate_and_beyond_it_held_429s(
    make_agent, make_gateway, http
):
    loop = asyncio.get_running_loop()
    arrived: list[float] = []

    async def answer(call: AgentCall) -> web.StreamResponse:
        arrived.append(loop.time())
        return web.json_response({"response": "ok"})

    agent = await make_agent(behaviour=answer)
    # 10/s, burst 2, up to 1 s of waiting: 2 at once plus 10 paced, 0.1 s apart.
    limits = {**OFF, "tenant": {"per_minute": 600, "burst": 2, "max_wait": 1},
              "refusal_delay": 0.5}
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, [KEY], limits=limits)]})

    async def one(i: int) -> tuple[int, float, str | None]:
        started = loop.time()
        resp, _ = await post_chat(http, gw, {"message": f"m{i}", "userId": f"u{i}"})
        return resp.status, loop.time() - started, resp.headers.get("Retry-After")

    results = await asyncio.gather(*(one(i) for i in range(14)))
    assert sorted(status for status, _, _ in results) == [200] * 12 + [429] * 2
    # The paced ones reach the agent on a schedule of one every 1/rate (a late wake-up on a
    # busy machine can bring two closer, never ahead of the schedule): no burst after a wait.
    arrived.sort()
    behind = [arrived[i] - arrived[0] - (i - 1) / 10 for i in range(2, len(arrived))]
    assert len(arrived) == 12 and min(behind) >= -0.02, behind
    # Beyond the bound: a 429, held min(Retry-After, refusal_delay) before it is answered.
    refused = [(elapsed, retry) for status, elapsed, retry in results if status == 429]
    assert all(elapsed >= 0.5 and retry == "1" for elapsed, retry in refused), refused
    metrics = await scrape(http, gw)
    assert rejected(metrics, "acme", "web", "tenant_rate") == 2


async def test_user_rate_refuses_one_user_only_and_the_daily_quota_says_so(
    make_agent, make_gateway, http
):
    agent = await make_agent()
    limits = {**OFF, "user": {"per_minute": 1, "burst": 1}, "daily_quota": 3}
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, [KEY], limits=limits)]})
    resp, _ = await post_chat(http, gw, {"message": "a1", "userId": "alice"})
    assert resp.status == 200
    resp, body = await post_chat(http, gw, {"message": "a2", "userId": "alice"},
                                 path="/api/chat/stream")
    assert resp.status == 429 and body["error"]["code"] == "rate_limited"
    assert resp.headers["Retry-After"] == "60"
    assert "this user" in body["error"]["message"]
    resp, _ = await post_chat(http, gw, {"message": "b1", "userId": "bob"})
    assert resp.status == 200
    # The quota counted every message admitted by the tenant-level check (3 so far).
    resp, body = await post_chat(http, gw, {"message": "c1", "userId": "carol"})
    assert resp.status == 429 and body["error"]["code"] == "quota_exceeded"
    assert 0 < int(resp.headers["Retry-After"]) <= 86400
    assert agent.texts() == ["a1", "b1"]
    metrics = await scrape(http, gw)
    assert rejected(metrics, "acme", "web", "user_rate") == 1
    assert rejected(metrics, "acme", "web", "daily_quota") == 1


async def test_visitor_tokens_and_public_calls_are_limited_per_client_address(
    make_agent, make_gateway, http
):
    agent = await make_agent()
    limits = {**OFF, "visitor_tokens": {"per_minute": 60, "burst": 2},
              "address": {"per_minute": 60, "burst": 1}}
    gw = await make_gateway({
        "server": {"trusted_proxies": ["127.0.0.1/32"]},
        "tenants": [tenant("acme", agent.url, [KEY], limits=limits, web={"public": True})],
    })

    async def mint(client: str | None) -> tuple[int, dict[str, Any], str | None]:
        headers = {"X-Forwarded-For": client} if client else {}
        async with http.post(url(gw, "/api/visitor-token"), json={"tenantId": "acme"},
                             headers=headers) as resp:
            return resp.status, await resp.json(), resp.headers.get("Retry-After")

    first = await mint("198.51.100.7")
    assert first[0] == 200
    assert (await mint("198.51.100.7"))[0] == 200
    status, body, retry = await mint("198.51.100.7")
    assert (status, body["error"]["code"], retry) == (429, "rate_limited", "1")
    # Another client behind the trusted proxy has its own allowance.
    assert (await mint("203.0.113.5"))[0] == 200
    # Minting with the tenant's API key (the tenant's own backend) is not limited per address.
    for _ in range(3):
        async with http.post(url(gw, "/api/visitor-token"), json={},
                             headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 200

    # A public visitor's chat calls count against their address.
    token, user = first[1]["token"], first[1]["userId"]
    headers = {"X-Forwarded-For": "198.51.100.7"}
    resp, _ = await post_chat(http, gw, {"message": "hi", "userId": user}, key=token,
                              headers=headers)
    assert resp.status == 200
    resp, body = await post_chat(http, gw, {"message": "again", "userId": user}, key=token,
                                 headers=headers)
    assert resp.status == 429 and "this address" in body["error"]["message"]
    # API-key callers are not limited per address (their tenant rate applies).
    resp, _ = await post_chat(http, gw, {"message": "server", "userId": "u1"}, headers=headers)
    assert resp.status == 200
    metrics = await scrape(http, gw)
    assert rejected(metrics, "acme", "web", "visitor_token_rate") == 1
    assert rejected(metrics, "acme", "web", "address_rate") == 1


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_agent, make_gateway, http):
    agent = await make_agent()
    limits = {**OFF, "visitor_tokens": {"per_minute": 60, "burst": 1}}
    gw = await make_gateway(
        {"tenants": [tenant("acme", agent.url, [KEY], limits=limits, web={"public": True})]})
    statuses = []
    for client in ("198.51.100.1", "198.51.100.2"):
        async with http.post(url(gw, "/api/visitor-token"), json={"tenantId": "acme"},
                             headers={"X-Forwarded-For": client}) as resp:
            statuses.append(resp.status)
    assert statuses == [200, 429]  # both are the TCP peer 127.0.0.1


# The circuit breaker -----------------------------------------------------------------------


async def breaker_of(http: aiohttp.ClientSession, gw: Daemon, tenant_id: str) -> dict[str, Any]:
    async with http.get(url(gw, "/admin/status"),
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        report = await resp.json()
    [item] = [t for t in report["tenants"] if t["id"] == tenant_id]
    return item["breaker"]


def breaker_gauge(metrics: dict[tuple[str, frozenset[Any]], float], tenant_id: str,
                  state: str) -> float:
    labels = frozenset({"tenant": tenant_id, "state": state}.items())
    return metrics[("chatgateway_breaker_state", labels)]


async def test_breaker_opens_answers_the_fallback_at_once_and_one_probe_closes_it(
    make_agent, make_gateway, http
):
    agent = await make_agent(status=500)
    other = await make_agent()
    gw = await make_gateway({"admin": ADMIN, "tenants": [
        tenant("acme", agent.url, [KEY], limits=OFF,
               agent={"retry": {"attempts": 1}, "fallback_text": "Later, please."},
               breaker={"failures": 2, "window": 60, "cooldown": 0.5}),
        tenant("other", other.url, ["other-key-0123456789abcdef"], limits=OFF),
    ]})
    for i in range(2):
        resp, body = await post_chat(http, gw, {"message": f"m{i}", "userId": "u1"})
        assert body["response"] == "Later, please."
    assert (await breaker_of(http, gw, "acme"))["state"] == "open"
    metrics = await scrape(http, gw)
    assert breaker_gauge(metrics, "acme", "open") == 1
    assert breaker_gauge(metrics, "acme", "closed") == 0
    assert breaker_gauge(metrics, "other", "closed") == 1  # one tenant's agent only

    # Open: the fallback at once, the agent is not called, the turn is still recorded.
    resp, body = await post_chat(http, gw, {"message": "m2", "userId": "u1"})
    assert resp.status == 200 and body["response"] == "Later, please."
    assert len(agent.calls) == 2
    assert rejected(await scrape(http, gw), "acme", "web", "breaker_open") == 1
    resp, _ = await post_chat(http, gw, {"message": "x", "userId": "u9"},
                              key="other-key-0123456789abcdef")
    assert resp.status == 200 and len(other.calls) == 1

    # The agent recovers; after the cool-down exactly one probe goes through.
    release = asyncio.Event()

    async def slow_ok(call: Any) -> Any:
        from aiohttp import web

        await release.wait()
        return web.json_response({"response": "recovered"})

    agent.behaviour = slow_ok
    assert gw.pipeline is not None
    admission = gw.pipeline.admission
    config = gw.pipeline.tenants.get("acme").config.breaker  # type: ignore[union-attr]
    await until(lambda: admission.breaker_status("acme", config)["probeInSeconds"] == 0)
    probe = asyncio.create_task(post_chat(http, gw, {"message": "probe", "userId": "u1"}))
    await agent.wait_calls(3)
    assert (await breaker_of(http, gw, "acme"))["state"] == "half_open"
    resp, body = await post_chat(http, gw, {"message": "meanwhile", "userId": "u2"})
    assert body["response"] == "Later, please."  # not a second probe
    assert len(agent.calls) == 3
    release.set()
    resp, body = await probe
    assert body["response"] == "recovered"
    assert (await breaker_of(http, gw, "acme"))["state"] == "closed"
    assert breaker_gauge(await scrape(http, gw), "acme", "closed") == 1
    resp, body = await post_chat(http, gw, {"message": "normal", "userId": "u2"})
    assert body["response"] == "recovered" and len(agent.calls) == 4


# Slack and Discord: one polite notice per window ------------------------------------------

NOTICE = "Easy there, try again in {retry_after} s."
USER_LIMITED = {**OFF, "user": {"per_minute": 1, "burst": 1}, "notice_text": NOTICE,
                "notice_interval": 600}


async def test_slack_user_over_the_limit_gets_one_notice_not_a_flood(
    fake_slack, make_agent, make_gateway
):
    agent = await make_agent()
    app = fake_slack.add_app()
    gw = await start(make_gateway, fake_slack,
                     {**slack_tenant("acme", agent.url, fake_slack, app), "limits": USER_LIMITED})
    for text in ("one", "two", "three"):
        delivery = await fake_slack.dm(app, "U0ALICE", text)
        await fake_slack.wait_ack(delivery)
        await fake_slack.wait_posts(1)
    await until(lambda: gw.metrics.registry.get_sample_value(
        "chatgateway_messages_rejected_total",
        {"tenant": "acme", "platform": "slack", "reason": "user_rate"}) == 2)
    posts = await fake_slack.wait_posts(2, channel="DU0ALICE")
    assert [p.text for p in posts] == ["agent: one", "Easy there, try again in 60 s."]
    # Another user is answered as usual.
    await fake_slack.dm(app, "U0BOB", "hello")
    await fake_slack.wait_posts(1, channel="DU0BOB")
    assert agent.texts() == ["one", "hello"]
    assert len(fake_slack.posts(channel="DU0ALICE")) == 2


async def test_discord_user_over_the_limit_gets_one_notice_not_a_flood(
    fake: FakeDiscord, make_agent, make_gateway
):
    agent = await make_agent()
    bot = fake.add_bot("acmebot")
    gw = await make_gateway({"tenants": [discord_tenant(
        "acme", agent.url, fake.bot_settings(bot, typing_indicator=False), limits=USER_LIMITED)]})
    await fake.wait_ready(bot)
    alice = user_object("1001", "alice")
    for text in ("one", "two", "three"):
        await fake.message_create(bot, text, channel_id="2001", author=alice)
    await until(lambda: gw.metrics.registry.get_sample_value(
        "chatgateway_messages_rejected_total",
        {"tenant": "acme", "platform": "discord", "reason": "user_rate"}) == 2)
    posts = await fake.wait_posts(2, token=bot.token)
    assert sorted(p.content for p in posts) == ["Easy there, try again in 60 s.", "agent: one"]
    await fake.message_create(bot, "hello", channel_id="2002", author=user_object("1002", "bob"))
    await fake.wait_posts(3, token=bot.token)
    assert agent.texts() == ["one", "hello"]
    assert len(fake.posts(token=bot.token)) == 3


# Reload and several instances --------------------------------------------------------------


async def test_reload_applies_new_limits_and_storage_needs_a_restart(
    make_agent, make_gateway, http
):
    agent = await make_agent()
    config = {"tenants": [tenant("acme", agent.url, [KEY],
                                 limits={**OFF, "tenant": {"per_minute": 1, "burst": 1}})]}
    gw = await make_gateway(config)
    assert (await post_chat(http, gw, {"message": "a", "userId": "u1"}))[0].status == 200
    assert (await post_chat(http, gw, {"message": "b", "userId": "u1"}))[0].status == 429
    config["tenants"][0]["limits"] = OFF
    config["limits"] = {"storage": "redis://127.0.0.1:6379"}
    gw.config_path.write_text(yaml.safe_dump({**yaml.safe_load(gw.config_path.read_text()),
                                              **config}))
    result = await gw.reload()
    assert result.restart_needed == ["limits.storage"]
    assert (await post_chat(http, gw, {"message": "c", "userId": "u1"}))[0].status == 200
    assert gw.pipeline is not None and gw.pipeline.admission.shared is None  # still in memory


async def test_two_gateways_on_one_redis_share_the_tenant_limit(make_agent, make_gateway, http,
                                                              tmp_path):
    agent = await make_agent()
    tenant_id = f"t{secrets.token_hex(4)}"  # fresh keys: the Redis outlives the test
    limits = {**OFF, "tenant": {"per_minute": 3, "burst": 3}}
    gateways = [
        await make_gateway({
            "limits": {"storage": "redis://127.0.0.1:6379"},
            "storage": {"path": str(tmp_path / f"gw{i}.db")},
            "tenants": [tenant(tenant_id, agent.url, [KEY], limits=limits)],
        })
        for i in range(2)
    ]
    statuses = [
        (await post_chat(http, gateways[i % 2], {"message": f"m{i}", "userId": "u"}))[0].status
        for i in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    assert len(agent.calls) == 3
