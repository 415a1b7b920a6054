"""A user's export (GDPR article 15) carries the answers' files and buttons, not only their text,
and never the store's internal separator (U+001E) in any text: through the tenant's API, the
admin API and `chatgateway users export`."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp import web

from chatgateway.models import Role, SessionId, TenantId, Turn
from chatgateway.rich import MARK
from chatgateway.testing.agent import AgentCall
from tests.conftest import ADMIN_TOKEN, tenant, url
from tests.test_cli import cli

KEY = "acme-key-export-0123456789"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
FILES = "https://files.example/reports/42.pdf"


@pytest.fixture
async def gateway(make_agent, make_gateway):
    async def behaviour(call: AgentCall) -> web.StreamResponse:
        text = call.body["message"]["text"]
        if text == "deploy?":
            return web.json_response({
                "response": "Here is the plan.",
                "attachments": [
                    {"name": "chart.png", "contentType": "image/png",
                     "data": base64.b64encode(PNG).decode()},
                    {"name": "report.pdf", "contentType": "application/pdf", "url": FILES},
                ],
                "actions": [
                    {"label": "Approve", "value": "approve-7", "style": "primary"},
                    {"label": "Reject", "value": "reject-7"},
                ],
            })
        # A plain answer that holds the separator character itself (no files: stored as is).
        return web.json_response({"response": f"got{MARK}{text}"})

    agent = await make_agent(behaviour=behaviour)
    return await make_gateway({
        "admin": {"token": {"value": ADMIN_TOKEN}},
        "tenants": [tenant("acme", agent.url, keys=[KEY])],
    })


async def get_json(http: aiohttp.ClientSession, gw: Any, path: str, token: str) -> Any:
    async with http.get(url(gw, path), headers={"Authorization": f"Bearer {token}"}) as r:
        text = await r.text()
        assert r.status == 200, text
        assert MARK not in text and "\\u001e" not in text.lower()
        return json.loads(text)


async def chat(http: aiohttp.ClientSession, gw: Any, message: str) -> str:
    async with http.post(url(gw, "/api/chat"), headers={"Authorization": f"Bearer {KEY}"},
                         json={"userId": "alice", "message": message}) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["sessionId"])


async def test_the_export_gives_the_answers_files_and_buttons_and_never_the_separator(
    gateway, http, tmp_path: Path
) -> None:
    gw = gateway
    await chat(http, gw, "deploy?")
    await chat(http, gw, f"my{MARK}text")  # a user may type the character too

    export = await get_json(http, gw, "/api/users/alice/export", KEY)
    transcript = export["sessions"][0]["transcript"]
    assert [(t["role"], t["text"]) for t in transcript] == [
        ("user", "deploy?"),
        ("agent", "Here is the plan."),
        ("user", "mytext"),
        ("agent", "gotmytext"),
    ]
    answer = transcript[1]
    # What the gateway keeps: the bytes the agent gave (base64), the agent's URL as it gave it.
    assert answer["attachments"] == [
        {"name": "chart.png", "contentType": "image/png", "data": base64.b64encode(PNG).decode()},
        {"name": "report.pdf", "contentType": "application/pdf", "url": FILES},
    ]
    assert answer["actions"] == [
        {"label": "Approve", "value": "approve-7", "style": "primary"},
        {"label": "Reject", "value": "reject-7"},
    ]
    # Turns without files or buttons carry neither key.
    assert all("attachments" not in t and "actions" not in t for t in transcript[2:])

    # The document is the one the OpenAPI document describes.
    async with http.get(url(gw, "/api/openapi.json")) as r:
        components = (await r.json())["components"]
    schema = {"$ref": "#/components/schemas/UserExport", "components": components}
    jsonschema.Draft202012Validator(schema).validate(export)

    admin = await get_json(http, gw, "/admin/tenants/acme/users/alice/export", ADMIN_TOKEN)
    assert admin["sessions"][0]["transcript"] == transcript

    # The CLI prints the admin API's document (in a thread: the gateway serves on this loop).
    env = {"CHATGATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    done = await asyncio.to_thread(
        cli, "users", "export", "--url", url(gw, ""), "--tenant", "acme", "alice",
        cwd=tmp_path, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert MARK not in done.stdout
    assert json.loads(done.stdout)["sessions"][0]["transcript"] == transcript


async def test_a_stored_turn_whose_tail_does_not_parse_is_exported_without_the_separator(
    gateway, http
) -> None:
    gw = gateway
    session = await chat(http, gw, "hello")
    # An answer stored by a newer gateway (a format version this one cannot read): the tail is
    # kept as text by the store, and the export still shows no separator.
    broken = Turn(Role.AGENT, 'old answer\x1e{"v": 99, "attachments": []}', 1e9)
    await gw.store.record_exchange(
        TenantId("acme"), SessionId(session), [Turn(Role.USER, "again", 1e9 - 1), broken],
        max_turns=50,
    )
    export = await get_json(http, gw, "/api/users/alice/export", KEY)
    texts = [t["text"] for t in export["sessions"][0]["transcript"]]
    assert texts[-1] == 'old answer{"v": 99, "attachments": []}'
