"""A full run of the real daemon with known secrets: none of them reach its output."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from chatgateway.testing.agent import AgentCall
from tests.conftest import tenant, url, write_config

SECRETS = {
    "agent_secret": "hmac-secret-A1b2C3d4E5f6G7h8",
    "wrong_agent_secret": "hmac-secret-the-agent-expects-Z9y8",
    "bearer": "agent-bearer-Q1w2E3r4T5y6U7i8",
    "bearer_after_reload": "agent-bearer-after-reload-P0o9I8u7",
    "echoed_bearer": "agent-bearer-that-the-agent-echoes-M1n2",
    "acme_key": "acme-api-key-K1e2Y3k4E5y6",
    "globex_key": "globex-api-key-L1o2N3g4",
    "env_key": "env-api-key-from-environment-V1a2R3",
    "credential_key": "credential-api-key-F1i2L3e4",
    "admin": "admin-token-S3cr3t-T0k3n-9876",
    "visitor": "visitor-signing-secret-W1e2B3c4H5a6T7",
    "slack_bot": "xoxb-111111111111-222222222222-SlAcKbOtToKeN",
    "slack_app": "xapp-1-A0000000000-333333333333-SlAcKaPpToKeN",
    "discord": "MTExMTExMTExMTExMTExMTEx.GdIsCo.rDtOkEnDiScOrDtOkEnXyZ",
}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_no_secret_reaches_the_logs(make_agent, gateway_process, http, tmp_path: Path):
    good = await make_agent(secret=SECRETS["agent_secret"].encode())
    picky = await make_agent(secret=SECRETS["wrong_agent_secret"].encode())

    async def echo_auth(call: AgentCall) -> web.StreamResponse:
        # A careless agent that puts the credential it received into its error.
        error = {"error": f"rejected {call.headers.get('Authorization')}"}
        return web.Response(body=json.dumps(error) + "\n", content_type="application/x-ndjson")

    echoing = await make_agent(behaviour=echo_auth)
    dead = f"127.0.0.1:{closed_port()}"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "secret_key").write_text(SECRETS["credential_key"] + "\n")

    def config(bearer: str) -> dict[str, Any]:
        return {
            "logging": {"level": "debug", "format": "json"},
            "admin": {"token": {"value": SECRETS["admin"]}},
            "server": {"visitor_secret": {"value": SECRETS["visitor"]}},
            "tenants": [
                {
                    "id": "acme",
                    "agent": {
                        "url": good.url,
                        "secret": {"value": SECRETS["agent_secret"]},
                        "bearer_token": {"value": bearer},
                    },
                    "web": {
                        "api_keys": [
                            {"value": SECRETS["acme_key"]},
                            {"env": "ACME_ENV_KEY"},
                            {"credential": "secret_key"},
                        ]
                    },
                    "slack": {
                        "apps": [
                            {
                                "bot_token": {"value": SECRETS["slack_bot"]},
                                "app_token": {"value": SECRETS["slack_app"]},
                                "api_base_url": f"http://{dead}/api/",
                            }
                        ]
                    },
                    "discord": {
                        "bots": [
                            {
                                "token": {"value": SECRETS["discord"]},
                                "api_base_url": f"http://{dead}/api/v10",
                                "gateway_url": f"ws://{dead}/gateway",
                            }
                        ]
                    },
                },
                {
                    "id": "globex",
                    "agent": {
                        "url": picky.url,
                        "secret": {"value": SECRETS["agent_secret"]},
                        "retry": {"attempts": 1},
                    },
                    "web": {"api_keys": [{"value": SECRETS["globex_key"]}]},
                },
                {
                    "id": "initech",
                    "agent": {
                        "url": echoing.url,
                        "bearer_token": {"value": SECRETS["echoed_bearer"]},
                        "retry": {"attempts": 1},
                    },
                    "web": {"api_keys": [{"value": "initech-key-0123456789"}]},
                },
            ],
        }

    path = write_config(tmp_path, config(SECRETS["bearer"]))
    proc = gateway_process(
        path,
        {"ACME_ENV_KEY": SECRETS["env_key"], "CREDENTIALS_DIRECTORY": str(credentials)},
    )

    async def chat(key: str, text: str) -> int:
        async with http.post(
            f"{proc.url}/api/chat",
            json={"message": text, "userId": "u1"},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            await resp.read()
            return resp.status

    for key in ("acme_key", "env_key", "credential_key"):
        assert await chat(SECRETS[key], f"my key is {SECRETS[key]}") == 200
    assert await chat(SECRETS["globex_key"], "signed with the wrong secret") == 200  # fallback
    assert await chat("initech-key-0123456789", "hello") == 200  # fallback
    assert await chat(SECRETS["admin"], "admin token as an API key") == 401
    admin = {"Authorization": f"Bearer {SECRETS['admin']}"}
    async with http.get(f"{proc.url}/admin/status", headers=admin) as resp:
        assert resp.status == 200
        status_text = await resp.text()
    async with http.get(f"{proc.url}/metrics") as resp:
        metrics_text = await resp.text()
    async with http.get(f"{proc.url}/admin/status", headers={"Authorization": "Bearer x"}):
        pass

    # Reload with a new bearer token; the new secret is masked too.
    write_config(tmp_path, config(SECRETS["bearer_after_reload"]))
    proc.signal(signal.SIGHUP)
    await asyncio.to_thread(proc.wait_for_event, "config_reloaded")
    assert await chat(SECRETS["acme_key"], "after reload") == 200
    # Both platform adapters got to try (and fail) against the dead address.
    for platform in ("slack", "discord"):
        await asyncio.to_thread(
            proc.wait_for_event, "adapter_failed", 30.0, platform=platform, tenant_id="acme"
        )

    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    output = proc.output()

    # The run did exercise the risky paths...
    assert good.calls[-1].headers["Authorization"] == f"Bearer {SECRETS['bearer_after_reload']}"
    failures = [e for e in proc.events() if e.get("event") == "agent_failed"]
    assert {e["cause"] for e in failures} == {"http_4xx", "agent_error"}
    echoed = next(e for e in failures if e["cause"] == "agent_error")
    assert echoed["detail"].endswith("rejected Bearer [redacted]"), "the scrubber masked it"
    # ...and no secret appears anywhere: logs, the status document or the metrics.
    leaked = {
        name: where
        for name, value in SECRETS.items()
        for where, text in (("logs", output), ("status", status_text), ("metrics", metrics_text))
        if value in text
    }
    assert leaked == {}, leaked
    assert output.count("\n") > 10


async def test_message_log_lines_carry_tenant_platform_and_session(
    make_agent, gateway_process, http
):
    failing = await make_agent(status=503)
    proc = gateway_process(
        {
            "tenants": [
                {
                    "id": "acme",
                    "agent": {"url": failing.url, "retry": {"attempts": 1}},
                    "web": {"api_keys": [{"value": "acme-key-0123456789"}]},
                }
            ]
        }
    )
    async with http.post(
        f"{proc.url}/api/chat",
        json={"message": "hi", "userId": "u1"},
        headers={"Authorization": "Bearer acme-key-0123456789"},
    ) as resp:
        session_id = (await resp.json())["sessionId"]
    handled = await asyncio.to_thread(proc.wait_for_event, "message_handled")
    failed = proc.wait_for_event("agent_failed")
    for event in (handled, failed):
        assert event["tenant_id"] == "acme"
        assert event["platform"] == "web"
        assert event["session_id"] == session_id
        assert event["logger"] == "chatgateway.pipeline"
    # Lines after the message no longer carry its context.
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    stopped = proc.wait_for_event("gateway_stopped")
    assert "session_id" not in stopped and "tenant_id" not in stopped


async def test_in_process_message_lines_carry_tenant_platform_and_session(
    make_agent, make_gateway, http, capsys
):
    """One good and one failing (agent answers 500) /api/chat: both lines name the message."""
    good = await make_agent()
    failing = await make_agent(status=500)
    gw = await make_gateway(
        {
            "tenants": [
                tenant("acme", good.url, keys=["acme-key-0123456789"]),
                tenant(
                    "globex",
                    failing.url,
                    keys=["globex-key-0123456789"],
                    agent={"retry": {"attempts": 1}},
                ),
            ]
        }
    )
    capsys.readouterr()  # start-up lines
    sessions = {}
    for tenant_id in ("acme", "globex"):
        async with http.post(
            url(gw, "/api/chat"),
            json={"message": "hi", "userId": "u1"},
            headers={"Authorization": f"Bearer {tenant_id}-key-0123456789"},
        ) as resp:
            assert resp.status == 200
            sessions[tenant_id] = (await resp.json())["sessionId"]
    await asyncio.sleep(0)  # lines are written at the end of the loop iteration
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()
              if line.startswith("{")]
    context = [
        (e["event"], e.get("tenant_id"), e.get("platform"), e.get("session_id"))
        for e in events
        if e["event"] in ("message_handled", "agent_failed")
    ]
    assert context == [
        ("message_handled", "acme", "web", sessions["acme"]),
        ("agent_failed", "globex", "web", sessions["globex"]),
        ("message_handled", "globex", "web", sessions["globex"]),
    ]
    failed = next(e for e in events if e["event"] == "agent_failed")
    assert failed["cause"] == "http_5xx" and "500" in failed["detail"]
