"""Usage per tenant: the store's daily buckets, the usage endpoint, metrics, the token budget."""

from __future__ import annotations

import time

from prometheus_client import generate_latest

from chatgateway.metrics import Metrics
from chatgateway.models import TenantId
from chatgateway.store.base import SessionStore
from chatgateway.usage import UsageRecorder, utc_day
from tests.conftest import ADMIN_TOKEN, tenant, url
from tests.test_agent_calls import chat
from tests.test_invoker_openai import KEY, gateway, make_openai, usage  # noqa: F401
from tests.test_store import A, B, store  # noqa: F401  (the backend-parametrized fixture)


async def test_store_adds_usage_by_day_scoped_by_tenant(store: SessionStore) -> None:  # noqa: F811
    await store.add_usage(A, "2026-12-01", calls=1, tokens_in=10, tokens_out=20)
    await store.add_usage(A, "2026-12-01", calls=2, tokens_in=1, tokens_out=2)
    await store.add_usage(A, "2026-12-03", calls=1, tokens_in=0, tokens_out=0)
    await store.add_usage(B, "2026-12-01", calls=5, tokens_in=50, tokens_out=50)
    rows = await store.usage(A, "2026-11-01", "2026-12-31")
    assert [(r.day, r.calls, r.tokens_in, r.tokens_out) for r in rows] == [
        ("2026-12-01", 3, 11, 22), ("2026-12-03", 1, 0, 0)]
    assert [r.day for r in await store.usage(A, "2026-12-02", "2026-12-03")] == ["2026-12-03"]
    assert [r.calls for r in await store.usage(B, "2026-12-01", "2026-12-01")] == [5]


async def test_recorder_batches_writes_and_checks_the_budget(store: SessionStore) -> None:  # noqa: F811
    from chatgateway.invoker import Usage

    metrics = Metrics()
    recorder = UsageRecorder(store, metrics)
    today = utc_day(time.time())
    recorder.record(A, Usage(3, 4))
    recorder.record(A, None)
    assert await store.usage(A, today, today) == []  # not written per call
    assert await recorder.spent_today(A) == 7  # a budget check writes what is pending first
    recorder.record(A, Usage(1, 1))
    assert await recorder.spent_today(A) == 9
    await recorder.close()
    [row] = await store.usage(A, today, today)
    assert (row.calls, row.tokens_in, row.tokens_out) == (3, 4, 5)
    text = generate_latest(metrics.registry).decode()
    assert 'chatgateway_agent_calls_total{tenant="tenant-a"} 3.0' in text
    assert 'chatgateway_agent_tokens_total{direction="out",tenant="tenant-a"} 5.0' in text


async def test_usage_endpoint_counts_every_protocol_and_survives_a_restart(
    make_agent, make_gateway, http
):
    agent = await make_agent()
    config = {"admin": {"token": {"value": ADMIN_TOKEN}},
              "tenants": [tenant("acme", agent.url, keys=[KEY]), tenant("other", agent.url)]}
    gw = await make_gateway(config)
    for i in range(3):
        await chat(http, gw, KEY, f"m{i}")
    status, report = await usage(http, gw)
    today = utc_day(time.time())
    assert status == 200
    assert report["to"] == today and report["days"] == [
        {"day": today, "calls": 3, "tokensIn": 0, "tokensOut": 0}]
    status, other = await usage(http, gw, "other")
    assert other["total"]["calls"] == 0
    await chat(http, gw, KEY, "last one")  # counted in memory, written when the gateway stops
    await gw.stop()
    gw2 = await make_gateway(config)
    status, report = await usage(http, gw2, **{"from": today, "to": today})
    assert report["total"]["calls"] == 4


async def test_usage_endpoint_refuses_bad_queries(make_gateway, http):
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}},
                             "tenants": [tenant("acme", keys=[KEY])]})
    for query in ({"from": "yesterday"}, {"to": "2026-13-01"}, {"from": "20261201"},
                  {"from": "2026-12-02", "to": "2026-12-01"},
                  {"from": "2020-01-01", "to": "2026-01-01"}):
        status, body = await usage(http, gw, **query)
        assert status == 400 and body["error"]["code"] == "invalid_query", query
    status, body = await usage(http, gw, "nobody")
    assert status == 404 and body["error"]["code"] == "not_found"
    async with http.get(url(gw, "/admin/tenants/acme/usage")) as resp:
        assert resp.status == 401
    async with http.get(url(gw, "/admin/tenants/acme/usage"),
                        headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 401


async def test_daily_token_budget_answers_the_notice_without_calling_the_agent(
    make_openai, make_gateway, http  # noqa: F811
):
    fake = await make_openai()
    gw = await gateway(make_gateway, fake, daily_token_budget=10,
                       budget_notice="Budget spent for today.")
    # "model says one two three four" = 6 + 5 (prompt, words) tokens: past the budget of 10.
    status, body = await chat(http, gw, KEY, "one two three four five")
    assert body["response"] == "model says one two three four five"
    status, body = await chat(http, gw, KEY, "again")
    assert status == 200 and body["response"] == "Budget spent for today."
    assert len(fake.requests) == 1
    status, report = await usage(http, gw)
    assert report["total"]["calls"] == 1  # the refusal is no agent call
    async with http.get(url(gw, "/metrics")) as resp:
        text = await resp.text()
    assert ('chatgateway_messages_rejected_total{platform="web",reason="token_budget",'
            'tenant="acme"} 1.0') in text


async def test_budget_counts_usage_another_instance_stored(
    make_openai, make_gateway, http  # noqa: F811
):
    fake = await make_openai()
    gw = await gateway(make_gateway, fake, daily_token_budget=100)
    # Another instance on the same store spent today's tokens.
    await gw.pipeline.store.add_usage(TenantId("acme"), utc_day(time.time()), calls=9,
                                      tokens_in=60, tokens_out=40)
    _status, body = await chat(http, gw, KEY, "hi")
    assert body["response"].startswith("Sorry, the daily usage limit")
    assert fake.requests == []
