"""The web API: the design document's requests, isolation between tenants, and the error contract."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.conftest import ADMIN_TOKEN, tenant, url

KEY_A = "key-of-tenant-a-000001"
KEY_B = "key-of-tenant-b-000002"


@pytest.fixture
async def two_tenants(make_agent, make_gateway):
    agent_a = await make_agent(prefix="A says: ")
    agent_b = await make_agent(prefix="B says: ")
    gw = await make_gateway({
        "admin": {"token": {"value": ADMIN_TOKEN}},
        "server": {"max_body_bytes": 4096},
        "tenants": [tenant("default", agent_a.url, keys=[KEY_A]),
                    tenant("acme", agent_b.url, keys=[KEY_B])],
    })
    return gw, agent_a, agent_b


async def call(http, gw, method: str, path: str, key: str | None = None,
               body: Any = None, raw: bytes | None = None,
               content_type: str = "application/json") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["Content-Type"] = content_type
    async with http.request(method, url(gw, path), data=data, headers=headers) as resp:
        text = await resp.text()
        assert "Traceback" not in text
        if resp.content_type == "application/x-ndjson":  # /api/chat/stream: a list of events
            return resp.status, [json.loads(line) for line in text.splitlines() if line]
        return resp.status, (json.loads(text) if text else None)


async def test_design_document_requests(two_tenants, http):
    """Section 9 of the design document: two tenants chat, each lists only its sessions."""
    gw, agent_a, agent_b = two_tenants
    status, a = await call(http, gw, "POST", "/api/chat", KEY_A,
                           {"message": "Hello", "userId": "user-a", "tenantId": "default"})
    assert status == 200 and a["response"] == "A says: Hello" and a["sessionId"]
    status, b = await call(http, gw, "POST", "/api/chat", KEY_B,
                           {"message": "Hello", "userId": "user-b", "tenantId": "acme"})
    assert status == 200 and b["response"] == "B says: Hello"
    status, listed = await call(http, gw, "GET", "/api/sessions?tenantId=default", KEY_A)
    assert status == 200
    assert [(s["sessionId"], s["userId"], s["tenantId"], s["platform"]) for s in listed] == [
        (a["sessionId"], "user-a", "default", "web")]
    assert [c.body["tenant"] for c in agent_a.calls] == ["default"]
    assert [c.body["tenant"] for c in agent_b.calls] == ["acme"]


async def test_consecutive_messages_reuse_the_session(two_tenants, http):
    gw, _, _ = two_tenants
    ids = set()
    for text in ("one", "two", "three"):
        _, body = await call(http, gw, "POST", "/api/chat", KEY_A, {"message": text, "userId": "u"})
        ids.add(body["sessionId"])
    assert len(ids) == 1
    _, other_user = await call(http, gw, "POST", "/api/chat", KEY_A, {"message": "x", "userId": "v"})
    assert other_user["sessionId"] not in ids
    _, fresh = await call(http, gw, "POST", "/api/chat", KEY_A,
                          {"message": "x", "userId": "u", "newSession": True})
    assert fresh["sessionId"] not in ids
    _, after = await call(http, gw, "POST", "/api/chat", KEY_A, {"message": "y", "userId": "u"})
    assert after["sessionId"] == fresh["sessionId"]
    _, detail = await call(http, gw, "GET", f"/api/sessions/{next(iter(ids))}", KEY_A)
    assert [t["text"] for t in detail["transcript"]] == [
        "one", "A says: one", "two", "A says: two", "three", "A says: three"]


async def test_session_expires_after_idle_time(make_gateway, http):
    gw = await make_gateway({"tenants": [tenant("acme", keys=[KEY_A],
                                                sessions={"idle_timeout": 0.2})]})
    _, first = await call(http, gw, "POST", "/api/chat", KEY_A, {"message": "a", "userId": "u"})
    _, again = await call(http, gw, "POST", "/api/chat", KEY_A, {"message": "b", "userId": "u"})
    assert again["sessionId"] == first["sessionId"]
    await asyncio.sleep(0.3)
    _, later = await call(http, gw, "POST", "/api/chat", KEY_A, {"message": "c", "userId": "u"})
    assert later["sessionId"] != first["sessionId"]


# The cross-tenant matrix ------------------------------------------------------------------

CREDENTIALS = {
    "own": KEY_A,
    "other": KEY_B,
    "none": None,
    "bad": "not-a-real-key-at-all",
    "bad_prefixed": "cgw_000000000000_forged",
    # Last: its round creates, changes and deletes tenants and keys, and reloads.
    "admin": ADMIN_TOKEN,
}
#: The tenant whose visitor token each credential may mint.
TENANT_OF = {"own": "default", "other": "acme"}
DELTA = {"id": "delta", "name": "Delta", "agent": {"builtin": "echo"}}


def endpoints(own_sid: str, foreign_sid: str,
              foreign_key_id: str) -> dict[str, tuple[str, str, Any]]:
    chat_calls = {}
    for kind, path in (("chat", "/api/chat"), ("stream", "/api/chat/stream")):
        chat_calls.update({
            kind: ("POST", path, {"message": "hi", "userId": "user-a"}),
            f"{kind}_forged_tenant": ("POST", path,
                                      {"message": "hi", "userId": "user-a", "tenantId": "acme"}),
            f"{kind}_forged_tenant_query": ("POST", f"{path}?tenantId=acme",
                                            {"message": "hi", "userId": "user-a"}),
            f"{kind}_foreign_session": ("POST", path, {"message": "hi", "userId": "user-b",
                                                       "sessionId": foreign_sid}),
            f"{kind}_other_users_session": ("POST", path, {"message": "hi", "userId": "mallory",
                                                           "sessionId": own_sid}),
        })
    return {
        **chat_calls,
        "list": ("GET", "/api/sessions", None),
        "list_forged_tenant": ("GET", "/api/sessions?tenantId=acme", None),
        "get": ("GET", f"/api/sessions/{own_sid}", None),
        "get_other_user": ("GET", f"/api/sessions/{own_sid}?userId=mallory", None),
        "get_forged_tenant": ("GET", f"/api/sessions/{own_sid}?tenantId=acme", None),
        "get_foreign": ("GET", f"/api/sessions/{foreign_sid}", None),
        "delete_foreign": ("DELETE", f"/api/sessions/{foreign_sid}", None),
        "delete_other_user": ("DELETE", f"/api/sessions/{own_sid}?userId=mallory", None),
        "delete_forged_tenant": ("DELETE", f"/api/sessions/{own_sid}?tenantId=acme", None),
        "visitor_token": ("POST", "/api/visitor-token", {}),
        "visitor_token_forged_tenant": ("POST", "/api/visitor-token", {"tenantId": "acme"}),
        # The endpoint reads no query; the token stays the key's tenant's (checked below).
        "visitor_token_forged_tenant_query": ("POST", "/api/visitor-token?tenantId=acme", {}),
        # In order: "delta" is created, read, changed and deleted within the admin round.
        "admin_list": ("GET", "/admin/tenants", None),
        "admin_create": ("POST", "/admin/tenants", DELTA),
        "admin_get": ("GET", "/admin/tenants/acme", None),
        "admin_get_own": ("GET", "/admin/tenants/default", None),
        "admin_update": ("PUT", "/admin/tenants/delta", {**DELTA, "name": "Delta 2"}),
        "admin_list_keys": ("GET", "/admin/tenants/acme/keys", None),
        "admin_create_key": ("POST", "/admin/tenants/acme/keys", {"label": "matrix"}),
        "admin_delete_key": ("DELETE", f"/admin/tenants/acme/keys/{foreign_key_id}", None),
        "admin_delete_config_tenant": ("DELETE", "/admin/tenants/acme", None),
        "admin_delete": ("DELETE", "/admin/tenants/delta", None),
        "admin_status": ("GET", "/admin/status", None),
        "admin_reload": ("POST", "/admin/reload", None),
    }


# Expected status for (endpoint, credential) with the caller being tenant A's key ("own"):
# "other" is tenant B's key, so for B "own_sid" is foreign and "foreign_sid" is its own.
EXPECTED: dict[str, dict[str, int]] = {
    **{name: expected for kind in ("chat", "stream") for name, expected in {
        kind: {"own": 200, "other": 200},
        f"{kind}_forged_tenant": {"own": 403, "other": 200},
        f"{kind}_forged_tenant_query": {"own": 403, "other": 200},
        f"{kind}_foreign_session": {"own": 404, "other": 200},
        f"{kind}_other_users_session": {"own": 404, "other": 404},
    }.items()},
    "list": {"own": 200, "other": 200},
    "list_forged_tenant": {"own": 403, "other": 200},
    "get": {"own": 200, "other": 404},
    "get_other_user": {"own": 404, "other": 404},
    "get_forged_tenant": {"own": 403, "other": 404},
    "get_foreign": {"own": 404, "other": 200},
    "delete_foreign": {"own": 404, "other": 204},
    "delete_other_user": {"own": 404, "other": 404},
    "delete_forged_tenant": {"own": 403, "other": 404},
    # Without a credential the body must name a public tenant; neither tenant is public.
    "visitor_token": {"own": 200, "other": 200, "none": 400},
    "visitor_token_forged_tenant": {"own": 403, "other": 200, "none": 404},
    "visitor_token_forged_tenant_query": {"own": 403, "other": 200, "none": 400},
    # A tenant's API key is no admin credential, not even for its own tenant.
    **{name: {"own": 401, "other": 401, "admin": admin} for name, admin in {
        "admin_list": 200,
        "admin_create": 201,
        "admin_get": 200,
        "admin_get_own": 200,
        "admin_update": 200,
        "admin_list_keys": 200,
        "admin_create_key": 201,
        "admin_delete_key": 204,
        "admin_delete_config_tenant": 409,  # config-file tenants change in the file
        "admin_delete": 204,
        "admin_status": 200,
        "admin_reload": 200,
    }.items()},
}


async def test_cross_tenant_matrix(two_tenants, http):
    gw, agent_a, agent_b = two_tenants
    _, own = await call(http, gw, "POST", "/api/chat", KEY_A,
                        {"message": "tenant A private words", "userId": "user-a"})
    own_sid = own["sessionId"]
    status, foreign_key = await call(http, gw, "POST", "/admin/tenants/acme/keys", ADMIN_TOKEN,
                                     {"label": "to be deleted by the admin round"})
    assert status == 201
    failures = []
    for cred_name, key in CREDENTIALS.items():
        # A fresh foreign session each round: "delete_foreign" by B deletes it.
        _, foreign = await call(http, gw, "POST", "/api/chat", KEY_B,
                                {"message": "tenant B private words", "userId": "user-b"})
        for name, (method, path, body) in endpoints(own_sid, foreign["sessionId"],
                                                    foreign_key["keyId"]).items():
            expected = EXPECTED[name].get(cred_name, 401)
            status, resp = await call(http, gw, method, path, key, body)
            text = json.dumps(resp)
            if status != expected:
                failures.append(f"{name} with {cred_name} key: {status} != {expected} ({text})")
            if status >= 400:
                assert set(resp) == {"error"} and {"code", "message"} <= set(resp["error"])
            if name.startswith("visitor_token") and status == 200:
                assert resp["tenantId"] == TENANT_OF[cred_name], (name, cred_name, resp)
            # No foreign data in any body.
            if cred_name == "own":
                assert "tenant B" not in text and "B says" not in text and '"acme"' not in text
            if cred_name == "other":
                assert "tenant A" not in text and "A says" not in text
    assert not failures, "\n".join(failures)
    # Only the admin round changed tenants and keys: "delta" came and went, the key is gone.
    _, tenants = await call(http, gw, "GET", "/admin/tenants", ADMIN_TOKEN)
    assert [t["id"] for t in tenants] == ["acme", "default"]
    _, keys = await call(http, gw, "GET", "/admin/tenants/acme/keys", ADMIN_TOKEN)
    assert [k["label"] for k in keys] == ["matrix"]
    # Forged or foreign calls never reached another tenant's agent.
    assert all(c.body["tenant"] == "default" for c in agent_a.calls)
    assert all(c.body["tenant"] == "acme" for c in agent_b.calls)


async def test_own_session_can_be_deleted(two_tenants, http):
    gw, _, _ = two_tenants
    _, own = await call(http, gw, "POST", "/api/chat", KEY_A, {"message": "x", "userId": "u"})
    assert (await call(http, gw, "DELETE", f"/api/sessions/{own['sessionId']}", KEY_A))[0] == 204
    assert (await call(http, gw, "GET", f"/api/sessions/{own['sessionId']}", KEY_A))[0] == 404


# Bad input --------------------------------------------------------------------------------

BAD_BODIES = [
    ("malformed", b'{"message": "hi", "userId": ', "application/json", 400, "malformed_json"),
    ("not an object", b'["hi"]', "application/json", 400, "invalid_body"),
    ("wrong type", b'{"message": 5, "userId": "u"}', "application/json", 400, "invalid_body"),
    ("missing field", b'{"message": "hi"}', "application/json", 400, "invalid_body"),
    ("unknown field", b'{"message": "hi", "userId": "u", "colour": "red"}', "application/json",
     400, "invalid_body"),
    ("empty message", b'{"message": "", "userId": "u"}', "application/json", 400, "invalid_body"),
    ("not utf-8", b'{"message": "\xff\xfe"}', "application/json", 400, "malformed_json"),
    ("nested too deeply", b"[" * 4000, "application/json", 400, "malformed_json"),
    # JSON may spell lone surrogates, which are not text: SQLite cannot store them.
    ("surrogate message", rb'{"message": "\ud800", "userId": "u"}', "application/json", 400,
     "invalid_body"),
    ("surrogate userId", rb'{"message": "hi", "userId": "a\udfff"}', "application/json", 400,
     "invalid_body"),
    ("surrogate sessionId", rb'{"message": "hi", "userId": "u", "sessionId": "\ud800"}',
     "application/json", 400, "invalid_body"),
    ("surrogate metadata key", rb'{"message": "hi", "userId": "u", "metadata": {"\ud800": 1}}',
     "application/json", 400, "invalid_body"),
    ("surrogate metadata value",
     rb'{"message": "hi", "userId": "u", "metadata": {"k": ["ok", {"x": "\udc00"}]}}',
     "application/json", 400, "invalid_body"),
    ("wrong content type", b'{"message": "hi", "userId": "u"}', "text/plain", 415,
     "unsupported_media_type"),
    ("too large", b'{"message": "' + b"x" * 10_000 + b'", "userId": "u"}', "application/json",
     413, "body_too_large"),
]


@pytest.mark.parametrize("name,raw,ctype,status,code", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_bad_input_gets_a_clear_4xx(two_tenants, http, name, raw, ctype, status, code):
    gw, agent_a, _ = two_tenants
    got, body = await call(http, gw, "POST", "/api/chat", KEY_A, raw=raw, content_type=ctype)
    assert (got, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"]
    assert agent_a.calls == []


async def test_unknown_field_is_named(two_tenants, http):
    gw, _, _ = two_tenants
    _, body = await call(http, gw, "POST", "/api/chat", KEY_A,
                         {"message": "hi", "userId": "u", "colour": "red"})
    assert "colour" in body["error"]["message"]
    _, body = await call(http, gw, "POST", "/api/chat", KEY_A, {"message": 5, "userId": "u"})
    assert "message" in body["error"]["message"]
    for raw, field in [(rb'{"message": "\ud800", "userId": "u"}', "message"),
                       (rb'{"message": "hi", "userId": "\ud800"}', "userId"),
                       (rb'{"message": "hi", "userId": "u", "sessionId": "\ud800"}', "sessionId"),
                       (rb'{"message": "hi", "userId": "u", "metadata": {"\ud800": 1}}',
                        "metadata"),
                       (rb'{"message": "hi", "userId": "u", "metadata": {"k": [{"x": "\udc00"}]}}',
                        "metadata.k[0].x")]:
        _, body = await call(http, gw, "POST", "/api/chat", KEY_A, raw=raw)
        assert body["error"]["message"].startswith(f"{field}: "), body
        assert "UTF-8" in body["error"]["message"]


async def test_unknown_route_and_method_are_json(two_tenants, http):
    gw, _, _ = two_tenants
    status, body = await call(http, gw, "GET", "/api/nope", KEY_A)
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await call(http, gw, "PUT", "/api/chat", KEY_A, {"message": "x"})
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


async def test_bad_query_parameters(two_tenants, http):
    gw, _, _ = two_tenants
    for query in ("limit=abc", "limit=0", "limit=1001", "limit=100000000000000000000",
                  "offset=-1", "offset=x", "offset=2147483648", "offset=100000000000000000000",
                  "platform=telegram"):
        status, body = await call(http, gw, "GET", f"/api/sessions?{query}", KEY_A)
        assert status == 400 and body["error"]["code"] == "invalid_query", query
        assert query.partition("=")[0] in body["error"]["message"], query
    status, _ = await call(http, gw, "GET", "/api/sessions?offset=2147483647&limit=1000", KEY_A)
    assert status == 200


async def test_malformed_authorization_header(two_tenants, http):
    gw, _, _ = two_tenants
    async with http.get(url(gw, "/api/sessions"), headers={"Authorization": "Basic abc"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"


async def raw_request(gw, request: bytes) -> tuple[int, Any]:
    """Send bytes the aiohttp client would refuse to write; return the status and JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("token", [b"\xff\xfe", b"cgv1.\xff", "k\u00e9y".encode(),
                                   "cgv1.p.default.dg.1.\u00e4".encode()],
                         ids=["latin-1", "visitor-latin-1", "utf-8", "visitor-utf-8"])
@pytest.mark.parametrize("method,path", [("GET", "/api/sessions"), ("POST", "/api/chat"),
                                         ("POST", "/api/visitor-token"),
                                         ("GET", "/admin/tenants"), ("GET", "/metrics")])
async def test_non_ascii_credential_is_401_not_500(two_tenants, method, path, token):
    gw, agent_a, _ = two_tenants
    body = b'{"message": "hi", "userId": "u"}' if path == "/api/chat" else b"{}"
    status, answer = await raw_request(gw, (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    ).encode() + b"Authorization: Bearer " + token + b"\r\n\r\n" + body)
    assert (status, answer["error"]["code"]) == (401, "unauthorized"), answer
    assert agent_a.calls == []


async def test_web_disabled_tenant_is_refused(make_gateway, http):
    gw = await make_gateway({"tenants": [tenant("acme", keys=[KEY_A], web={"enabled": False})]})
    status, body = await call(http, gw, "POST", "/api/chat", KEY_A, {"message": "x", "userId": "u"})
    assert status == 403 and "disabled" in body["error"]["message"]


async def test_anonymous_default_only_when_configured(make_gateway, http):
    gw = await make_gateway({"tenants": [tenant("default", web={"anonymous": True})]})
    status, body = await call(http, gw, "POST", "/api/chat", None, {"message": "x", "userId": "u"})
    assert (status, body["response"]) == (200, "echo: x")
    gw2 = await make_gateway({"tenants": [tenant("default", keys=[KEY_A])]})
    assert (await call(http, gw2, "POST", "/api/chat", None, {"message": "x", "userId": "u"}))[0] == 401


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
async def test_anonymous_default_refused_through_a_proxy(make_gateway, http, header):
    """A reverse proxy on loopback would make every caller on the internet look local."""
    gw = await make_gateway({"tenants": [tenant("default", web={"anonymous": True})]})
    value = "for=203.0.113.7" if header == "Forwarded" else "203.0.113.7"
    async with http.post(url(gw, "/api/chat"), json={"message": "x", "userId": "u"},
                         headers={header: value}) as resp:
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (401, "unauthorized")
        assert "proxy" in body["error"]["message"] and header in body["error"]["message"]
    async with http.get(url(gw, "/api/sessions"), headers={header: value}) as resp:
        assert resp.status == 401
    status, _ = await call(http, gw, "POST", "/api/chat", None, {"message": "x", "userId": "u"})
    assert status == 200  # a local caller without the header still is anonymous


async def test_anonymous_default_refused_off_loopback(make_gateway, http):
    gw = await make_gateway({"listen": {"host": "0.0.0.0", "port": 0},
                             "tenants": [tenant("default", web={"anonymous": True})]})
    status, _ = await call(http, gw, "POST", "/api/chat", None, {"message": "x", "userId": "u"})
    assert status == 401


async def test_flood_from_one_tenant_gets_429_while_another_is_served(make_agent, make_gateway, http):
    slow = await make_agent(delay=1.0)
    fast = await make_agent()
    gw = await make_gateway({"tenants": [
        tenant("flood", slow.url, keys=[KEY_A], agent={"max_concurrency": 2, "max_queue": 2}),
        tenant("calm", fast.url, keys=[KEY_B]),
    ]})
    flood = [asyncio.create_task(call(http, gw, "POST", "/api/chat", KEY_A,
                                      {"message": "x", "userId": f"u{i}"})) for i in range(10)]
    await slow.wait_calls(2)
    status, body = await call(http, gw, "POST", "/api/chat", KEY_B, {"message": "hi", "userId": "u"})
    assert (status, body["response"]) == (200, "agent: hi")
    statuses = sorted(s for s, _ in await asyncio.gather(*flood))
    assert statuses.count(200) == 4 and statuses.count(429) == 6
    rejected = gw.metrics.registry.get_sample_value(
        "chatgateway_messages_rejected_total",
        {"tenant": "flood", "platform": "web", "reason": "overloaded"},
    )
    assert rejected == 6
    assert gw.metrics.registry.get_sample_value(
        "chatgateway_messages_rejected_total",
        {"tenant": "calm", "platform": "web", "reason": "overloaded"},
    ) is None


# Admin API and runtime tenants ------------------------------------------------------------


async def test_admin_api_manages_tenants_and_keys(two_tenants, http, make_agent):
    gw, _, _ = two_tenants
    agent_c = await make_agent(prefix="C says: ")
    assert (await call(http, gw, "GET", "/admin/tenants", None))[0] == 401
    assert (await call(http, gw, "GET", "/admin/tenants", KEY_A))[0] == 401
    status, listed = await call(http, gw, "GET", "/admin/tenants", ADMIN_TOKEN)
    assert status == 200 and [t["id"] for t in listed] == ["acme", "default"]
    spec = {"id": "gamma", "name": "Gamma", "agent": {"url": agent_c.url}}
    status, created = await call(http, gw, "POST", "/admin/tenants", ADMIN_TOKEN, spec)
    assert status == 201 and created["source"] == "runtime"
    assert (await call(http, gw, "POST", "/admin/tenants", ADMIN_TOKEN, spec))[0] == 409
    status, bad = await call(http, gw, "POST", "/admin/tenants", ADMIN_TOKEN,
                             {"id": "Bad Id", "agent": {}})
    assert status == 400 and "id" in bad["error"]["message"] and "agent" in bad["error"]["message"]
    status, key = await call(http, gw, "POST", "/admin/tenants/gamma/keys", ADMIN_TOKEN,
                             {"label": "ci"})
    assert status == 201 and key["key"].startswith("cgw_")
    status, chat = await call(http, gw, "POST", "/api/chat", key["key"],
                              {"message": "hi", "userId": "u"})
    assert (status, chat["response"]) == (200, "C says: hi")
    # The new key cannot reach the other tenants' data.
    assert (await call(http, gw, "GET", "/api/sessions?tenantId=acme", key["key"]))[0] == 403
    status, keys = await call(http, gw, "GET", "/admin/tenants/gamma/keys", ADMIN_TOKEN)
    assert [k["keyId"] for k in keys] == [key["keyId"]] and "key" not in keys[0]
    # Update takes effect without a restart.
    spec["agent"] = {"builtin": "echo"}
    assert (await call(http, gw, "PUT", "/admin/tenants/gamma", ADMIN_TOKEN, spec))[0] == 200
    _, chat = await call(http, gw, "POST", "/api/chat", key["key"], {"message": "yo", "userId": "u"})
    assert chat["response"] == "echo: yo"
    # Config-file tenants are changed in the file, not here.
    assert (await call(http, gw, "DELETE", "/admin/tenants/acme", ADMIN_TOKEN))[0] == 409
    # Revoking a key works at once.
    assert (await call(http, gw, "DELETE", f"/admin/tenants/gamma/keys/{key['keyId']}",
                       ADMIN_TOKEN))[0] == 204
    assert (await call(http, gw, "GET", "/api/sessions", key["key"]))[0] == 401
    assert (await call(http, gw, "DELETE", "/admin/tenants/gamma", ADMIN_TOKEN))[0] == 204
    assert (await call(http, gw, "GET", "/admin/tenants/gamma", ADMIN_TOKEN))[0] == 404
    # Other tenants were not disturbed.
    _, a = await call(http, gw, "POST", "/api/chat", KEY_A, {"message": "still", "userId": "u"})
    assert a["response"] == "A says: still"


async def test_admin_api_refuses_a_deeply_nested_body(two_tenants, http):
    gw, _, _ = two_tenants
    for path in ("/admin/tenants", "/admin/tenants/acme/keys"):
        status, body = await call(http, gw, "POST", path, ADMIN_TOKEN, raw=b"[" * 4000)
        assert (status, body["error"]["code"]) == (400, "malformed_json"), path


async def test_admin_api_refuses_lone_surrogates(two_tenants, http):
    gw, _, _ = two_tenants
    for method, path, raw, field in [
        ("POST", "/admin/tenants", rb'{"id": "gamma", "name": "\ud800", "agent": {}}', "name"),
        ("PUT", "/admin/tenants/gamma", rb'{"id": "gamma", "name": "\ud800", "agent": {}}',
         "name"),
        ("POST", "/admin/tenants/acme/keys", rb'{"label": "\ud800"}', "label"),
    ]:
        status, body = await call(http, gw, method, path, ADMIN_TOKEN, raw=raw)
        assert (status, body["error"]["code"]) == (400, "invalid_body"), (path, body)
        assert body["error"]["message"].startswith(f"{field}: "), body


async def test_admin_api_disabled_without_token(make_gateway, http):
    gw = await make_gateway({"tenants": [tenant("acme", keys=[KEY_A])]})
    status, body = await call(http, gw, "GET", "/admin/tenants", "anything")
    assert status == 403 and "admin.token" in body["error"]["message"]


# OpenAPI ----------------------------------------------------------------------------------


async def test_openapi_document_is_valid_and_matches_the_code(two_tenants, http):
    gw, _, _ = two_tenants
    status, doc = await call(http, gw, "GET", "/api/openapi.json")
    assert status == 200
    validate(doc)
    chat_schema = doc["components"]["schemas"]["ChatRequest"]
    from adapters.web.schemas import ChatRequest

    assert set(chat_schema["properties"]) == set(ChatRequest.model_fields)
    assert set(chat_schema["required"]) == {"message", "userId"}
    assert chat_schema.get("additionalProperties") is False
    # Every route the running gateway serves (chat, browser, admin and operations), except the
    # pages and files, which are for browsers (docs/web-chat.md), and the document itself.
    pages = {"/", "/chat/{tenant_id}", "/widget.js", "/static/{name}", "/api/openapi.json"}
    served = {(r.method, r.resource.canonical) for r in gw.runner.app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    served = {(m, p) for m, p in served if p not in pages}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
            ("GET", "/admin/status"), ("POST", "/admin/reload")} <= served
    assert served == documented
    for path in ("/api/chat", "/api/chat/stream"):
        assert "503" in doc["paths"][path]["post"]["responses"], path
