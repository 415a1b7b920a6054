"""Issue 12's holes in the web API: NUL characters, DNS rebinding, credentials in the log,
HTTP parser errors, 405 without Allow, deep JSON, the body cap, the OpenAPI tenant body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate

from adapters.discord.convert import to_normalized
from adapters.slack.convert import BotIdentity, Inbound, event_to_inbound
from adapters.web.app import MAX_JSON_DEPTH
from chatgateway.config import TenantConfig
from chatgateway.daemon import Daemon
from chatgateway.models import NormalizedMessage, Role, SessionKey, TenantId, Turn
from chatgateway.store.base import SessionStore
from tests.conftest import ADMIN_TOKEN, tenant, url
from tests.test_discord_convert import ALICE, message
from tests.test_store import postgres_schema, store  # noqa: F401 (the store fixture)

KEY = "hardening-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def storage(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[dict[str, Any]]:
    """The `storage` section of a config, for each backend (a fresh schema for PostgreSQL)."""
    if request.param == "sqlite":
        yield {"path": str(tmp_path / "gateway.db")}
        return
    async with postgres_schema() as dsn:
        yield {"backend": "postgres", "dsn": {"value": dsn}}


async def send(http: aiohttp.ClientSession, gw: Daemon, method: str, path: str,
               body: Any = None, headers: dict[str, str] | None = None,
               key: str | None = KEY) -> tuple[int, Any]:
    all_headers = {"Authorization": f"Bearer {key}"} if key else {}
    all_headers.update(headers or {})
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    async with http.request(method, url(gw, path), data=data, headers=all_headers) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server answers before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


# 2. NUL characters: refused at the edge, the same on both backends ------------------------


async def test_nul_is_refused_at_the_edge_on_every_backend(make_agent, make_gateway, http,
                                                            storage):
    agent = await make_agent()
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}}, "storage": storage,
                             "tenants": [tenant("acme", agent.url, keys=[KEY])]})
    status, first = await send(http, gw, "POST", "/api/chat", {"message": "hi", "userId": "u"})
    assert status == 200
    sid = first["sessionId"]
    good = {"message": "hi", "userId": "u"}
    bodies = {
        "message": {**good, "message": "a\u0000b"},
        "userId": {**good, "userId": "u\u0000"},
        "userName": {**good, "userName": "\u0000"},
        "sessionId": {**good, "sessionId": sid + "\u0000"},
        "tenantId": {**good, "tenantId": "acme\u0000"},
        "metadata.k": {**good, "metadata": {"k": ["x", "y\u0000"]}},
        "metadata": {**good, "metadata": {"k\u0000": 1}},
    }
    for field, body in bodies.items():
        for path in ("/api/chat", "/api/chat/stream"):
            status, error = await send(http, gw, "POST", path, body)
            assert status == 400, (field, path, error)
            assert error["error"]["code"] == "invalid_body"
            assert "NUL" in error["error"]["message"]
            assert error["error"]["message"].startswith(field.split(".")[0])
    status, error = await send(http, gw, "POST", "/api/visitor-token", {"tenantId": "a\u0000"},
                               key=None)
    assert status == 400 and "NUL" in error["error"]["message"]
    urls = [
        ("GET", f"/api/sessions/{sid}%00", "invalid_path"),
        ("DELETE", f"/api/sessions/{sid}%00", "invalid_path"),
        ("GET", "/api/sessions?userId=u%00", "invalid_query"),
        ("GET", "/api/sessions?tenantId=%00", "invalid_query"),
        ("GET", f"/api/sessions/{sid}?userId=%00", "invalid_query"),
        ("POST", "/api/chat?tenantId=acme%00", "invalid_query"),
    ]
    for method, path, code in urls:
        status, error = await send(http, gw, method, path, good if method == "POST" else None)
        assert (status, error["error"]["code"]) == (400, code), (method, path)
    for method, path in [("GET", "/admin/tenants/acme%00/keys"),
                         ("DELETE", "/admin/tenants/acme/keys/k%00"),
                         ("PUT", "/admin/tenants/x%00")]:
        status, error = await send(http, gw, method, path, {} if method == "PUT" else None,
                                   headers=ADMIN, key=None)
        assert (status, error["error"]["code"]) == (400, "invalid_path"), (method, path)
    # The agent was called for the one good message only, and it was recorded.
    assert agent.texts() == ["hi"]
    status, detail = await send(http, gw, "GET", f"/api/sessions/{sid}")
    assert status == 200 and [t["text"] for t in detail["transcript"]] == ["hi", "agent: hi"]


def slack_message(text: str) -> NormalizedMessage:
    event = {"type": "message", "channel_type": "im", "channel": "D1\u0000", "user": "U\ud800",
             "text": text, "ts": "100.000001", "user_profile": {"display_name": "Al\u0000"},
             "files": [{"name": "f\u0000.txt", "url_private": "https://x/\udfff"}]}
    body = {"type": "event_callback", "team_id": "T\u0000", "event_id": "Ev\u0000",
            "event": event}
    result = event_to_inbound(TenantId("acme"), body, BotIdentity("UBOT", "BBOT", "T1"))
    assert isinstance(result, Inbound)
    return result.message


def discord_message(text: str) -> NormalizedMessage:
    author = {**ALICE, "global_name": "Al\u0000ice\ud83d"}
    return to_normalized(message(text, guild=False, author=author), TenantId("acme"),
                         bot_id=1, via="dm", bot_name="b")


def strings(value: Any) -> list[str]:
    """Every string in a normalized message (dataclasses, tuples, dicts, keys included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings(k) + strings(v)]
    if isinstance(value, list | tuple):
        return [s for item in value for s in strings(item)]
    if hasattr(value, "__dataclass_fields__"):
        return [s for name in value.__dataclass_fields__ for s in strings(getattr(value, name))]
    return []


@pytest.mark.parametrize("convert", [slack_message, discord_message], ids=["slack", "discord"])
async def test_platform_text_with_nul_or_surrogates_is_stored_on_every_backend(
    convert: Any, store: SessionStore  # noqa: F811 (the fixture)
):
    normalized = convert("bad \u0000 and \ud800 text")
    assert normalized.text == "bad \ufffd and \ufffd text"
    for text in strings(normalized):
        assert "\u0000" not in text
        text.encode("utf-8")  # no lone surrogate left
    assert "\ufffd" in normalized.user.display_name
    # What the pipeline stores for it: the session key, the user's name, the turns.
    key = SessionKey(normalized.tenant_id, normalized.platform, normalized.conversation.id,
                     normalized.conversation.thread_id or "", normalized.user.id)
    session = await store.create_session(key, kind=normalized.conversation.kind,
                                         user_name=normalized.user.display_name, now=1.0)
    turns = [Turn(Role.USER, normalized.text, 1.0), Turn(Role.AGENT, "ok", 2.0)]
    await store.record_exchange(key.tenant_id, session.id, turns, max_turns=10,
                                processed_event=(normalized.platform, normalized.message_id))
    assert [t.text for t in await store.history(key.tenant_id, session.id, 10)] == [
        normalized.text, "ok"]
    assert await store.find_active_session(key, idle_since=0.0) is not None


# 4. DNS rebinding on the anonymous default tenant ------------------------------------------


async def test_anonymous_access_needs_a_loopback_host(make_gateway, http):
    gw = await make_gateway({"tenants": [tenant("default", web={"anonymous": True})]})
    status, _ = await send(http, gw, "POST", "/api/chat", {"message": "secret", "userId": "u"},
                           key=None)
    assert status == 200
    port = gw.port
    for host in (f"rebind.attacker.example:{port}", "rebind.attacker.example",
                 f"127.0.0.1.attacker.example:{port}", f"localhost.:{port}", f"::1:{port}"):
        origin = f"http://{host}"
        for method, path in (("GET", "/api/sessions"), ("POST", "/api/chat")):
            body = {"message": "x", "userId": "u"} if method == "POST" else None
            status, error = await send(http, gw, method, path, body, key=None,
                                       headers={"Host": host, "Origin": origin})
            assert status == 401, (host, path)
            assert "loopback Host" in error["error"]["message"]
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST",
                 f"[::1]:{port}", "[::1]"):
        status, listed = await send(http, gw, "GET", "/api/sessions", key=None,
                                    headers={"Host": host})
        assert status == 200 and len(listed) == 1, host


# 5. No credential in the log, whatever the shape of the Authorization line ----------------


async def test_malformed_authorization_never_reaches_the_log(make_gateway, capsys):
    gw = await make_gateway({"logging": {"level": "debug", "format": "json"},
                             "tenants": [tenant("acme", keys=[KEY])]})
    # Not a configured secret (the scrubber does not know it): a generated key's shape.
    credential = "cgw_0a1b2c3d4e5f_Zm9vYmFyLXNlY3JldC1rZXktdmFsdWU"
    shapes = [
        b"Bearer " + credential.encode() + b" extra",
        b"Bearer \xc3\xa9" + credential.encode(),
        b"bearer " + credential.encode(),
        b"Basic " + credential.encode(),
        b"Token " + credential.encode(),
        b"Bearer\t" + credential.encode(),
        b"Bearer " + credential.encode() + b"\x01",
        b"Bearer " + credential.encode() + b"\x00",
        b"Bearer " + credential.encode() + b"\x7f",
        b"Bearer " + credential.encode() + b"\r",
        b"Bearer " + credential.encode() + b"\n folded",
    ]
    lines = [b"Authorization: " + shape for shape in shapes]
    lines += [b"Authorization : Bearer " + credential.encode(),
              b"X-Api-Key: " + credential.encode() + b"\x01",
              b"Authorization: Bearer " + credential.encode() + b"x" * 9000]
    capsys.readouterr()
    for line in lines:
        request = (b"GET /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line
                   + b"\r\nConnection: close\r\n\r\n")
        status, headers, body = split_response(await raw_exchange(gw.port, request))
        assert status in (400, 401), line
        assert headers["content-type"].startswith("application/json"), line
        assert set(json.loads(body)["error"]) == {"code", "message"}
        assert credential.encode() not in body and b"Zm9vYmFy" not in body
    output = capsys.readouterr().out
    assert "http_request_rejected" in output  # the parser errors were logged, without bytes
    assert "Zm9vYmFy" not in output and credential not in output


# 6. Smaller ones ------------------------------------------------------------------------------


async def test_http_parser_errors_are_json(make_gateway, capsys):
    gw = await make_gateway({"tenants": [tenant("acme", keys=[KEY])]})
    chat = (b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + KEY.encode() + b"\r\nContent-Type: application/json\r\n")
    cases = {
        "request line": b"GARBAGE\r\n\r\n",
        "method": b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
        "target": b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
        "header": b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
        "too long": b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
        "chunked": chat + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n",
        "content-length": chat + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n{}",
    }
    for name, request in cases.items():
        status, headers, body = split_response(await raw_exchange(gw.port, request))
        assert status == 400, name
        assert headers["content-type"].startswith("application/json"), name
        error = json.loads(body)["error"]
        assert error["code"] == "bad_request" and error["message"], name
    assert "Traceback" not in capsys.readouterr().out


async def test_body_encoding_broken_while_read_is_a_400(gateway_process):
    """A chunked body that breaks after the handler began reading it is a 400, not a 500.

    Only aiohttp's pure-Python parser reports this to the reader (the C parser leaves the read
    waiting; the connection's body deadline ends it), so the daemon runs with that parser.
    """
    proc = gateway_process({"tenants": [tenant("acme", keys=[KEY])]},
                           env={"AIOHTTP_NO_EXTENSIONS": "1"})
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                 + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler starts reading the body; no event to wait on
    writer.write(b"QQ\r\n\r\n")
    await writer.drain()
    status, headers, body = split_response(await asyncio.wait_for(reader.read(), 10))
    writer.close()
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert "web_handler_failed" not in proc.output()


async def test_405_has_allow(make_gateway, http):
    gw = await make_gateway({"tenants": [tenant("acme", keys=[KEY])]})
    for method, path, allowed in (("PUT", "/api/chat", {"POST"}),
                                  ("PATCH", "/api/sessions/x", {"GET", "DELETE"}),
                                  ("POST", "/api/sessions", {"GET"})):
        async with http.request(method, url(gw, path)) as resp:
            assert resp.status == 405, path
            assert allowed <= {m.strip() for m in resp.headers["Allow"].split(",")}, path
            assert (await resp.json())["error"]["code"] == "method_not_allowed"


def nested(depth: int) -> Any:
    """A value `depth` levels of containers deep."""
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


async def test_deep_json_is_refused_at_the_edge(make_agent, make_gateway, http):
    agent = await make_agent()
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=[KEY])]})
    # The body is level 1, metadata level 2.
    deepest = {"message": "ok", "userId": "u", "metadata": nested(MAX_JSON_DEPTH - 1)}
    status, _ = await send(http, gw, "POST", "/api/chat", deepest)
    assert status == 200
    assert agent.calls[-1].body["metadata"] == deepest["metadata"]
    too_deep = {"message": "deep", "userId": "u", "metadata": nested(MAX_JSON_DEPTH)}
    deepest_parsable = (b'{"message": "deep", "userId": "u", "metadata": {"k": '
                        + b"[" * 1000 + b"]" * 1000 + b"}}")  # json.dumps would recurse
    for body in (too_deep, deepest_parsable):
        status, error = await send(http, gw, "POST", "/api/chat", body)
        assert status == 400 and error["error"]["code"] == "invalid_body"
        assert f"deeper than {MAX_JSON_DEPTH}" in error["error"]["message"]
    assert agent.texts() == ["ok"]


async def test_longest_message_fits_the_default_body_cap(make_agent, make_gateway, http):
    agent = await make_agent()
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, keys=[KEY])]})
    longest = "\U0001f600" * 32_000  # each one JSON-escaped as a surrogate pair: 12 bytes
    body = json.dumps({"message": longest, "userId": "u", "userName": "\U0001f600" * 256})
    assert len(body) > 384_000
    status, answer = await send(http, gw, "POST", "/api/chat", body.encode())
    assert status == 200 and answer["response"] == "agent: " + longest
    status, error = await send(http, gw, "POST", "/api/chat",
                               {"message": longest + "x", "userId": "u"})
    assert status == 400 and "message" in error["error"]["message"]


async def test_anonymous_on_another_tenant_is_a_config_error(make_gateway, http, tmp_path):
    from chatgateway.config import parse_config
    from chatgateway.errors import ConfigError

    data = {"tenants": [tenant("default", web={"anonymous": True}),
                        tenant("acme", web={"anonymous": True})]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, file="gw.yaml", environ={})
    assert [(p.file, p.path) for p in caught.value.problems] == [
        ("gw.yaml", "tenants[1].web.anonymous")]
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}},
                             "tenants": [tenant("default")]})
    spec = {"id": "runtime", "agent": {"builtin": "echo"}, "web": {"anonymous": True}}
    async with http.post(url(gw, "/admin/tenants"), json=spec, headers=ADMIN) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_tenant" and "web.anonymous" in error["message"]
    async with http.post(url(gw, "/admin/tenants"), json={**spec, "id": "default2",
                                                          "web": {}}, headers=ADMIN) as resp:
        assert resp.status == 201
    async with http.put(url(gw, "/admin/tenants/default2"), json=spec, headers=ADMIN) as resp:
        assert resp.status == 400


async def test_openapi_describes_the_tenant_body(make_gateway, http):
    gw = await make_gateway({"tenants": [tenant("acme", keys=[KEY])]})
    async with http.get(url(gw, "/api/openapi.json")) as resp:
        document = await resp.json()
    validate(document)
    schemas = document["components"]["schemas"]
    for path, method in (("/admin/tenants", "post"), ("/admin/tenants/{tenant_id}", "put")):
        body = document["paths"][path][method]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": "#/components/schemas/TenantSpec"}
    spec = schemas["TenantSpec"]
    assert set(spec["properties"]) == set(TenantConfig.model_fields)
    assert spec["required"] == ["id", "agent"] and spec["additionalProperties"] is False
    secret = {"$ref": "#/components/schemas/SecretValue"}
    assert schemas["WebConfig"]["properties"]["api_keys"]["items"] == secret
    assert secret in schemas["AgentConfig"]["properties"]["bearer_token"]["anyOf"]
    assert schemas["SecretValue"]["required"] == ["value"]
    assert "password" not in json.dumps(document)  # no secret left as a plain string


async def test_agent_answer_with_nul_is_stored_on_every_backend(make_agent, make_gateway, http,
                                                                 storage):
    """An agent's NUL must not make the exchange fail to be recorded (PostgreSQL refuses it)."""
    agent = await make_agent(prefix="a\x00b ")
    gw = await make_gateway({"storage": storage, "tenants": [tenant("acme", agent.url, keys=[KEY])]})
    status, body = await send(http, gw, "POST", "/api/chat", {"message": "hi", "userId": "u1"})
    assert status == 200, body
    assert body["response"] == "a\ufffdb hi"
    status, session = await send(http, gw, "GET", f"/api/sessions/{body['sessionId']}")
    assert status == 200, session
    assert [t["text"] for t in session["transcript"]] == ["hi", "a\ufffdb hi"]
