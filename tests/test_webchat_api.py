"""The browser-facing API: visitor tokens, isolation, origins/CORS, streaming chat, pages."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from adapters.web.chat import TENANT_HEADER, derive_key, issue_token
from chatgateway.models import ConversationKind, Platform, Role, SessionKey, TenantId, Turn
from tests.browser import GatedAgent
from tests.conftest import ADMIN_TOKEN, tenant, url

SECRET = "visitor-secret-for-tests-0123456789"
KEY_A = "key-of-tenant-a-000001"
ALLOWED = "https://shop.example"


def public(tenant_id: str, agent_url: str | None = None, **web_extra: Any) -> dict[str, Any]:
    return tenant(tenant_id, agent_url, web={"public": True, **web_extra})


@pytest.fixture
async def gateway(make_agent, make_gateway):
    agent = await make_agent()
    gw = await make_gateway({
        "admin": {"token": {"value": ADMIN_TOKEN}},
        "server": {"visitor_secret": {"value": SECRET}},
        "tenants": [
            tenant("a", agent.url, keys=[KEY_A], web={"public": True, "allowed_origins": [ALLOWED],
                                                      "title": "Shop A", "accent_color": "#0f766e"}),
            public("b", agent.url),
            tenant("private", agent.url),
            tenant("off", agent.url, web={"public": True, "enabled": False}),
        ],
    })
    return gw, agent


async def request(http: aiohttp.ClientSession, gw, method: str, path: str, *,
                  token: str | None = None, body: Any = None,
                  headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    async with http.request(method, url(gw, path), json=body, headers=all_headers) as resp:
        text = await resp.text()
        assert "Traceback" not in text
        if resp.content_type == "application/json" and text:
            return resp.status, json.loads(text), resp.headers
        return resp.status, text, resp.headers


async def visitor(http, gw, tenant_id: str, **headers: str) -> dict[str, Any]:
    status, body, _ = await request(http, gw, "POST", "/api/visitor-token",
                                    body={"tenantId": tenant_id}, headers=headers)
    assert status == 200, body
    return body


async def stream(http, gw, token: str, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """POST /api/chat/stream and return its events."""
    all_headers = {"Authorization": f"Bearer {token}", **(headers or {})}
    async with http.post(url(gw, "/api/chat/stream"), json=body, headers=all_headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/x-ndjson"
        return [json.loads(line) async for line in resp.content if line.strip()]


async def say(http, gw, who: dict[str, Any], text: str, **extra: Any) -> dict[str, Any]:
    events = await stream(http, gw, who["token"], {"message": text, "userId": who["userId"],
                                                   **extra})
    assert events[-1]["type"] == "done"
    return events[-1]


# Visitor tokens -----------------------------------------------------------------------------


async def test_public_tenant_hands_out_visitor_tokens(gateway, http):
    gw, _ = gateway
    body = await visitor(http, gw, "a")
    assert body["tenantId"] == "a"
    assert body["userId"].startswith("v_")
    assert body["token"].startswith("cgv1.p.a.")
    assert body["expiresAt"] > time.time() + 6 * 86400  # server.visitor_token_ttl: 7 days
    assert body["chat"] == {"title": "Shop A", "welcome": None, "accentColor": "#0f766e",
                            # What the page's file picker accepts (the tenant's files.*).
                            "files": {"maxBytes": 25 * 1024 * 1024,
                                      "allowedTypes": ["image/*", "text/*", "application/pdf"]}}
    other = await visitor(http, gw, "a")
    assert other["userId"] != body["userId"]  # every visitor is somebody new


@pytest.mark.parametrize(("payload", "status", "code"), [
    ({"tenantId": "private"}, 404, "not_found"),   # web chat, but not public
    ({"tenantId": "off"}, 404, "not_found"),       # web chat disabled
    ({"tenantId": "nobody"}, 404, "not_found"),
    ({}, 400, "invalid_body"),
    ({"tenantId": "a", "userId": "someone-else"}, 403, "forbidden"),  # no choosing who you are
    ({"tenantId": "a", "extra": 1}, 400, "invalid_body"),
])
async def test_visitor_token_refusals(gateway, http, payload, status, code):
    gw, _ = gateway
    got, body, _ = await request(http, gw, "POST", "/api/visitor-token", body=payload)
    assert (got, body["error"]["code"]) == (status, code)


async def test_renewal_keeps_the_visitor_and_extends_the_expiry(make_gateway, http):
    gw = await make_gateway({"server": {"visitor_secret": {"value": SECRET}},
                             "tenants": [public("a")]})
    key = derive_key(SECRET)
    old, _ = issue_token(key, "a", "v_returning", "p", ttl=60, now=time.time())
    status, body, _ = await request(http, gw, "POST", "/api/visitor-token", token=old,
                                    body={"tenantId": "a"})
    assert status == 200
    assert body["userId"] == "v_returning"
    assert body["expiresAt"] > time.time() + 86400


async def test_renewing_a_signed_in_users_token_does_not_extend_it(make_gateway, http):
    gw = await make_gateway({"server": {"visitor_secret": {"value": SECRET}},
                             "tenants": [public("a")]})
    minted, expires_at = issue_token(derive_key(SECRET), "a", "customer-42", "k", ttl=60,
                                     now=time.time())
    status, body, _ = await request(http, gw, "POST", "/api/visitor-token", token=minted,
                                    body={"tenantId": "a"})
    assert status == 200 and body["userId"] == "customer-42"
    assert body["token"] == minted and body["expiresAt"] == expires_at  # not a day longer
    done = await say(http, gw, body, "still signed in?")
    assert done["response"].endswith("still signed in?")


async def test_api_key_mints_a_token_for_a_known_user(gateway, http):
    gw, agent = gateway
    status, minted, _ = await request(http, gw, "POST", "/api/visitor-token", token=KEY_A,
                                      body={"userId": "customer-42"})
    assert status == 200 and minted["userId"] == "customer-42" and minted["tenantId"] == "a"
    done = await say(http, gw, minted, "my order?")
    assert done["response"] == "agent: my order?"
    assert agent.calls[-1].body["user"]["id"] == "customer-42"
    status, _, _ = await request(http, gw, "POST", "/api/visitor-token", token=KEY_A,
                                    body={"tenantId": "b"})
    assert status == 403  # an API key mints tokens for its own tenant only


async def test_forged_tampered_and_expired_tokens_are_refused(gateway, http):
    gw, _ = gateway
    good = await visitor(http, gw, "a")
    parts = good["token"].split(".")
    forged, _ = issue_token(derive_key("another secret"), "a", good["userId"], "p",
                            ttl=600, now=time.time())
    expired, _ = issue_token(derive_key(SECRET), "a", good["userId"], "p", ttl=600,
                             now=time.time() - 3600)
    retargeted = ".".join([parts[0], parts[1], "b", *parts[3:]])  # claims tenant b
    for token, message in [(forged, "invalid visitor token"),
                           (retargeted, "invalid visitor token"),
                           (expired, "visitor token expired"),
                           ("cgv1.garbage", "invalid visitor token")]:
        status, body, _ = await request(http, gw, "GET", "/api/sessions", token=token)
        assert (status, body["error"]["message"]) == (401, message)


async def test_generated_secret_survives_a_restart(make_agent, make_gateway, http):
    """Without server.visitor_secret the gateway makes one and keeps it in its store."""
    config = {"tenants": [public("a")]}
    first = await make_gateway(config)
    who = await visitor(http, first, "a")
    done = await say(http, first, who, "remember me")
    await first.stop()
    second = await make_gateway(config)
    status, body, _ = await request(http, second, "GET", f"/api/sessions/{done['sessionId']}",
                                    token=who["token"])
    assert status == 200
    assert [t["text"] for t in body["transcript"]] == ["remember me", "echo: remember me"]


# Isolation ------------------------------------------------------------------------------------


async def test_a_visitor_sees_and_continues_only_their_own_sessions(gateway, http):
    gw, agent = gateway
    alice, bob = await visitor(http, gw, "a"), await visitor(http, gw, "a")
    a_done = await say(http, gw, alice, "alice here")
    b_done = await say(http, gw, bob, "bob here")
    bob_session = b_done["sessionId"]

    status, body, _ = await request(http, gw, "GET", f"/api/sessions/{bob_session}",
                                    token=alice["token"])
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body, _ = await request(http, gw, "GET", f"/api/sessions/{bob_session}"
                                    f"?userId={bob['userId']}", token=alice["token"])
    assert status == 404  # a query parameter cannot widen a visitor's view
    status, listed, _ = await request(http, gw, "GET", "/api/sessions", token=alice["token"])
    assert [s["sessionId"] for s in listed] == [a_done["sessionId"]]
    status, body, _ = await request(http, gw, "DELETE", f"/api/sessions/{bob_session}",
                                    token=alice["token"])
    assert status == 404

    # Continuing bob's session as alice, or speaking as bob, is refused before the agent.
    calls = len(agent.calls)
    async with http.post(url(gw, "/api/chat/stream"),
                         json={"message": "hijack", "userId": alice["userId"],
                               "sessionId": bob_session},
                         headers={"Authorization": f"Bearer {alice['token']}"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    for path in ("/api/chat/stream", "/api/chat"):
        status, body, _ = await request(http, gw, "POST", path, token=alice["token"],
                                        body={"message": "hi", "userId": bob["userId"]})
        assert (status, body["error"]["code"]) == (403, "forbidden")
    assert len(agent.calls) == calls
    status, body, _ = await request(http, gw, "GET", f"/api/sessions/{bob_session}",
                                    token=bob["token"])
    assert [t["text"] for t in body["transcript"]] == ["bob here", "agent: bob here"]


async def test_a_visitor_never_sees_sessions_of_other_platforms(gateway, http):
    """A visitor id that equals a Slack user's id does not reach that user's Slack sessions."""
    gw, _ = gateway
    now = time.time()
    key = SessionKey(tenant_id=TenantId("a"), platform=Platform.SLACK, conversation_id="D042",
                     thread_id="", user_id="U042")
    slack = await gw.store.create_session(key, kind=ConversationKind.DM, user_name=None, now=now)
    await gw.store.record_exchange(TenantId("a"), slack.id, [Turn(Role.USER, "slack secret", now)],
                                   max_turns=50)
    status, minted, _ = await request(http, gw, "POST", "/api/visitor-token", token=KEY_A,
                                      body={"userId": "U042"})
    assert status == 200
    web_session = (await say(http, gw, minted, "hello from the web"))["sessionId"]
    for query in ("", "?platform=slack", "?platform=web", "?userId=U042"):
        status, listed, _ = await request(http, gw, "GET", f"/api/sessions{query}",
                                          token=minted["token"])
        expected = [] if query == "?platform=slack" else [web_session]
        assert (status, [s["sessionId"] for s in listed]) == (200, expected), query
    for method in ("GET", "DELETE"):
        status, body, _ = await request(http, gw, method, f"/api/sessions/{slack.id}",
                                        token=minted["token"])
        assert (status, body["error"]["code"]) == (404, "not_found"), method
        assert "slack secret" not in json.dumps(body)
    # The tenant's API key still sees it: the session was not deleted.
    status, detail, _ = await request(http, gw, "GET", f"/api/sessions/{slack.id}", token=KEY_A)
    assert status == 200 and detail["transcript"][0]["text"] == "slack secret"


async def test_tenant_a_visitor_token_is_refused_by_tenant_b(gateway, http):
    gw, agent = gateway
    a_visitor, b_visitor = await visitor(http, gw, "a"), await visitor(http, gw, "b")
    b_session = (await say(http, gw, b_visitor, "hello b"))["sessionId"]
    calls = len(agent.calls)
    naming_b = {TENANT_HEADER: "b"}

    status, body, _ = await request(http, gw, "POST", "/api/chat/stream", token=a_visitor["token"],
                                    body={"message": "hi", "userId": a_visitor["userId"]},
                                    headers=naming_b)
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    assert "not valid for 'b'" in body["error"]["message"]
    status, _, _ = await request(http, gw, "GET", f"/api/sessions/{b_session}",
                                 token=a_visitor["token"], headers=naming_b)
    assert status == 401
    status, _, _ = await request(http, gw, "POST", "/api/visitor-token", token=a_visitor["token"],
                                 body={"tenantId": "b"})
    assert status == 401  # cannot be renewed into a token of tenant b
    # Without naming b the token still only ever means tenant a.
    status, _, _ = await request(http, gw, "GET", f"/api/sessions/{b_session}",
                                 token=a_visitor["token"])
    assert status == 404
    status, body, _ = await request(http, gw, "POST", "/api/chat", token=a_visitor["token"],
                                    body={"message": "hi", "userId": a_visitor["userId"],
                                          "tenantId": "b"})
    assert status == 403
    assert len(agent.calls) == calls


async def test_tokens_die_with_public_chat(make_gateway, http):
    """A handed-out token stops working when the tenant turns public chat off."""
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}},
                             "tenants": [tenant("other")]})
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    spec = {"id": "shop", "agent": {"builtin": "echo"}, "web": {"public": True}}
    async with http.post(url(gw, "/admin/tenants"), json=spec, headers=admin) as resp:
        assert resp.status == 201
    who = await visitor(http, gw, "shop")
    await say(http, gw, who, "hi")
    spec["web"] = {"public": False}
    async with http.put(url(gw, "/admin/tenants/shop"), json=spec, headers=admin) as resp:
        assert resp.status == 200
    status, body, _ = await request(http, gw, "GET", "/api/sessions", token=who["token"])
    assert (status, body["error"]["message"]) == (401, "public web chat is off for this tenant")


# Origins and CORS ------------------------------------------------------------------------------


async def test_origin_checks_and_cors_headers(gateway, http):
    gw, _ = gateway
    own = url(gw, "")
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    # Preflight: allowed origin yes, anyone else no.
    status, _, headers = await request(http, gw, "OPTIONS", "/api/visitor-token",
                                       headers={"Origin": ALLOWED, **preflight})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
    status, _, headers = await request(http, gw, "OPTIONS", "/api/visitor-token",
                                       headers={"Origin": "https://evil.example", **preflight})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers

    # Token requests: the allowed site gets one it may read; others are refused.
    body = await visitor(http, gw, "a", Origin=ALLOWED)
    status, refused, headers = await request(http, gw, "POST", "/api/visitor-token",
                                             body={"tenantId": "a"},
                                             headers={"Origin": "https://evil.example"})
    assert (status, refused["error"]["code"]) == (403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in headers
    status, _, _ = await request(http, gw, "POST", "/api/visitor-token", body={"tenantId": "b"},
                                 headers={"Origin": ALLOWED})
    assert status == 403  # allowed for tenant a only
    status, _, headers = await request(http, gw, "POST", "/api/visitor-token",
                                       body={"tenantId": "b"}, headers={"Origin": own})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers  # same origin

    # A token in hand is still refused from a site the tenant does not allow.
    status, _, headers = await request(http, gw, "GET", "/api/sessions", token=body["token"],
                                       headers={"Origin": ALLOWED})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "Origin" in headers.getall("Vary")
    status, refused, _ = await request(http, gw, "GET", "/api/sessions", token=body["token"],
                                       headers={"Origin": "https://evil.example"})
    assert (status, refused["error"]["code"]) == (403, "origin_not_allowed")
    # Errors are readable by an allowed site (so the widget can renew an expired token).
    status, _, headers = await request(http, gw, "GET", "/api/sessions", token="cgv1.bad",
                                       headers={"Origin": ALLOWED})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == ALLOWED
    # API keys belong on servers: a page of another site cannot use one, even an allowed site.
    for method, path in [("GET", "/api/sessions"), ("POST", "/api/chat"),
                         ("POST", "/api/visitor-token")]:
        status, refused, headers = await request(
            http, gw, method, path, token=KEY_A, headers={"Origin": ALLOWED},
            body={"message": "hi", "userId": "u"} if path == "/api/chat" else {})
        assert (status, refused["error"]["code"]) == (403, "forbidden")
    status, _, _ = await request(http, gw, "GET", "/api/sessions", token=KEY_A)
    assert status == 200  # from a server (no Origin) it is fine


async def test_star_allows_any_site_and_public_url_counts_as_own(make_gateway, http):
    gw = await make_gateway({
        "server": {"public_url": "https://chat.example.com"},
        "tenants": [public("a", allowed_origins=["*"]), public("b")],
    })
    body = await visitor(http, gw, "a", Origin="https://anywhere.example")
    assert body["tenantId"] == "a"
    body = await visitor(http, gw, "b", Origin="https://chat.example.com")
    assert body["tenantId"] == "b"
    status, _, _ = await request(http, gw, "POST", "/api/visitor-token", body={"tenantId": "b"},
                                 headers={"Origin": "null"})
    assert status == 403


# Streaming chat ----------------------------------------------------------------------------------


async def test_streaming_agent_deltas_then_done(make_agent, make_gateway, http):
    agent = await make_agent(stream_chunks=["Hel", "lo ", "there"])
    gw = await make_gateway({"tenants": [public("a", agent.url)]})
    who = await visitor(http, gw, "a")
    events = await stream(http, gw, who["token"], {"message": "hi", "userId": who["userId"]})
    deltas = [e["text"] for e in events if e["type"] == "delta"]
    assert "".join(deltas) == "Hello there"
    done = events[-1]
    assert done == {"type": "done", "sessionId": done["sessionId"], "response": "Hello there",
                    "outcome": "ok"}
    assert agent.calls[0].headers["Accept"] == "application/json, application/x-ndjson"
    again = await say(http, gw, who, "more", sessionId=done["sessionId"])
    assert again["sessionId"] == done["sessionId"]
    fresh = await say(http, gw, who, "new topic", newSession=True)
    assert fresh["sessionId"] != done["sessionId"]


async def test_non_streaming_agent_is_one_delta(make_agent, make_gateway, http):
    agent = await make_agent()
    gw = await make_gateway({"tenants": [public("a", agent.url)]})
    who = await visitor(http, gw, "a")
    events = await stream(http, gw, who["token"], {"message": "hi", "userId": who["userId"]})
    assert [e["type"] for e in events] == ["delta", "done"]
    assert events[0]["text"] == events[1]["response"] == "agent: hi"


async def test_failing_agent_streams_the_fallback(make_agent, make_gateway, http):
    agent = await make_agent(status=500)
    gw = await make_gateway({"tenants": [
        tenant("a", agent.url, web={"public": True},
               agent={"retry": {"attempts": 1}, "fallback_text": "Back soon!"})]})
    who = await visitor(http, gw, "a")
    events = await stream(http, gw, who["token"], {"message": "hi", "userId": who["userId"]})
    assert events[-1]["response"] == "Back soon!"
    assert events[-1]["outcome"] == "fallback"


async def test_stream_refuses_bad_requests_before_streaming(gateway, http):
    gw, _ = gateway
    who = await visitor(http, gw, "a")
    for body, status in [({"userId": who["userId"]}, 400),
                         ({"message": "x", "userId": who["userId"], "sessionId": "s_nope"}, 404)]:
        async with http.post(url(gw, "/api/chat/stream"), json=body,
                             headers={"Authorization": f"Bearer {who['token']}"}) as resp:
            assert resp.status == status and resp.content_type == "application/json"
    async with http.post(url(gw, "/api/chat/stream"), json={"message": "x", "userId": "u"}) as resp:
        assert resp.status == 401


async def test_leaving_mid_answer_still_records_the_exchange(make_gateway, http):
    agent = await GatedAgent(["first half, ", "second half"]).start()
    try:
        gw = await make_gateway({"tenants": [public("a", agent.url)]})
        who = await visitor(http, gw, "a")
        agent.gates[0].set()
        async with aiohttp.ClientSession() as browser:
            resp = await browser.post(url(gw, "/api/chat/stream"),
                                      json={"message": "tell me", "userId": who["userId"]},
                                      headers={"Authorization": f"Bearer {who['token']}"})
            first = json.loads(await resp.content.readline())
            assert first == {"type": "delta", "text": "first half, "}
            resp.close()  # the visitor closes the tab mid-answer
        agent.gates[1].set()
        await asyncio.wait_for(agent.finished.wait(), 10)
        async with asyncio.timeout(10):
            while True:  # the exchange is recorded right after the agent's last line
                _, listed, _ = await request(http, gw, "GET", "/api/sessions", token=who["token"])
                if listed and listed[0]["messageCount"] == 2:
                    break
                await asyncio.sleep(0.02)
        _, body, _ = await request(http, gw, "GET", f"/api/sessions/{listed[0]['sessionId']}",
                                   token=who["token"])
        assert [t["text"] for t in body["transcript"]] == ["tell me", "first half, second half"]
    finally:
        await agent.stop()


# Pages and assets ----------------------------------------------------------------------------------


async def test_pages_widget_and_assets(make_gateway, http):
    gw = await make_gateway({"tenants": [
        public("default"), public("shop", title="Shop <b>&</b> Co", welcome="Hi there"),
        tenant("private"),
    ]})
    status, page, headers = await request(http, gw, "GET", "/chat/shop")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "<title>Shop &lt;b&gt;&amp;&lt;/b&gt; Co</title>" in page
    assert 'data-tenant="shop"' in page and 'data-welcome="Hi there"' in page
    assert 'src="../static/chat.js?v=' in page
    status, page, _ = await request(http, gw, "GET", "/")
    assert status == 200 and 'data-tenant="default"' in page and 'src="./static/chat.js' in page
    for missing in ("/chat/private", "/chat/nobody"):
        status, page, _ = await request(http, gw, "GET", missing)
        assert status == 404 and "no public chat" in page
    status, script, headers = await request(http, gw, "GET", "/widget.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert "ChatGateway" in script
    assert headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    status, _, headers = await request(http, gw, "GET", "/static/chat.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    status, _, _ = await request(http, gw, "GET", "/static/chat.css",
                                 headers={"If-None-Match": headers["ETag"]})
    assert status == 304
    for path in ("/static/chat.html", "/static/..%2Fchat.py", "/static/nothing.js"):
        status, _, _ = await request(http, gw, "GET", path)
        assert status == 404


async def test_root_without_a_public_default_tenant(make_gateway, http):
    gw = await make_gateway({"tenants": [public("shop")]})
    status, page, _ = await request(http, gw, "GET", "/")
    assert status == 404 and "no public chat" in page


async def test_openapi_lists_the_browser_endpoints(gateway, http):
    from openapi_spec_validator import validate

    from adapters.web.chat import routes

    gw, _ = gateway
    status, doc, _ = await request(http, gw, "GET", "/api/openapi.json")
    assert status == 200
    validate(doc)
    api = {(r.method, r.path) for r in routes if r.path.startswith("/api/")}
    assert api == {("POST", "/api/visitor-token"), ("POST", "/api/chat/stream")}
    assert api <= {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    token_request = doc["components"]["schemas"]["VisitorTokenRequest"]
    assert set(token_request["properties"]) == {"tenantId", "userId"}
