"""Starting the real daemon: exit codes for bad configs and failed starts; systemd credentials."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import yaml

from chatgateway.config import EXIT_CONFIG
from chatgateway.daemon import EXIT_FAILURE
from tests.conftest import tenant, write_config


def test_bad_config_exits_78_listing_every_problem(gateway_process, tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": 99999},
                "tenants": [
                    {
                        "id": "acme",
                        "agent": {"url": "https://agent.example", "secret": {"env": "X"}},
                    },
                    {"id": "Not Valid", "agent": {"builtin": "echo"}},
                ],
            }
        )
    )
    proc = gateway_process(path, wait=False)
    assert proc.proc.wait(30) == EXIT_CONFIG == 78
    proc._reader.join(5)
    out = proc.output()
    assert "configuration is invalid (3 problem(s))" in out
    assert f"{path}: listen.port: Input should be less than or equal to 65535" in out
    assert f"{path}: tenants[0].agent.secret: environment variable X is not set" in out
    assert f"{path}: tenants[1].id: String should match pattern" in out
    assert "Traceback" not in out


def test_missing_config_file_exits_78(gateway_process, tmp_path: Path):
    proc = gateway_process(tmp_path / "absent.yaml", wait=False)
    assert proc.proc.wait(30) == EXIT_CONFIG
    proc._reader.join(5)
    assert f"{tmp_path / 'absent.yaml'}: cannot read: No such file or directory" in proc.output()


def test_a_start_failure_that_is_not_the_config_exits_1(gateway_process, tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(
            tmp_path, {"listen": {"host": "127.0.0.1", "port": port}, "tenants": [tenant("a")]}
        )
        proc = gateway_process(path, wait=False)
        assert proc.proc.wait(30) == EXIT_FAILURE == 1
    proc._reader.join(5)
    failed = proc.wait_for_event("gateway_start_failed")
    assert "address already in use" in failed["error"].lower()


async def test_secrets_come_from_the_credentials_directory(
    make_agent, gateway_process, http, tmp_path: Path
):
    """LoadCredential= puts files in $CREDENTIALS_DIRECTORY; {credential: NAME} reads them."""
    agent = await make_agent()
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "secret_acme-agent-token").write_text("agent-bearer-from-credential\n")
    (credentials / "secret_acme-api-key").write_text("acme-key-from-credential-0123\n")
    config = {
        "tenants": [
            {
                "id": "acme",
                "agent": {
                    "url": agent.url,
                    "bearer_token": {"credential": "secret_acme-agent-token"},
                    "headers": {"X-From": "env"},
                },
                "web": {"api_keys": [{"credential": "secret_acme-api-key"}, {"env": "ACME_KEY"}]},
            }
        ]
    }
    proc = gateway_process(
        write_config(tmp_path, config),
        {"CREDENTIALS_DIRECTORY": str(credentials), "ACME_KEY": "acme-key-from-env-0123456"},
    )
    for key in ("acme-key-from-credential-0123", "acme-key-from-env-0123456"):
        async with http.post(
            f"{proc.url}/api/chat",
            json={"message": "hi", "userId": "u"},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
    await agent.wait_calls(2)
    assert agent.calls[0].headers["Authorization"] == "Bearer agent-bearer-from-credential"

    # Without the credentials directory the same config is refused with a clear reason.
    other = gateway_process(
        write_config(tmp_path, config, "other.yaml"), {"ACME_KEY": "x" * 20}, wait=False
    )
    assert await asyncio.to_thread(other.proc.wait, 30) == EXIT_CONFIG
    other._reader.join(5)
    assert "CREDENTIALS_DIRECTORY is not set" in other.output()
