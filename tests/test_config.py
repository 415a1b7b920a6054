"""Configuration: every problem reported at once with file, key path and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatgateway.cli import main
from chatgateway.config import EXIT_CONFIG, load_config, parse_config
from chatgateway.errors import ConfigError
from chatgateway.logging import secrets_in

ROOT = Path(__file__).resolve().parent.parent

BROKEN = """\
listen:
  port: 99999
tenants:
  - id: good
    agent: {builtin: echo}
  - id: Bad Slug
    agent: {url: "ftp://nowhere"}
  - id: acme
    agent:
      url: http://127.0.0.1:9/agent
      timeout: -1
      secret: {env: ACME_AGENT_SECRET}
    web:
      api_keys: [{file: missing-key.txt}]
    slack:
      apps:
        - bot_token: {env: SLACK_BOT}
    colour: blue
  - id: good
    agent: {builtin: echo}
"""


def test_every_problem_is_reported_with_its_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    found = {(p.path, p.message) for p in info.value.problems}
    paths = {p.path for p in info.value.problems}
    assert all(p.file == str(path) for p in info.value.problems)
    assert {
        "listen.port",
        "tenants[1].id",
        "tenants[1].agent.url",
        "tenants[2].agent.timeout",
        "tenants[2].agent.secret",
        "tenants[2].web.api_keys[0]",
        "tenants[2].slack.apps[0].bot_token",
        "tenants[2].slack.apps[0].app_token",
        "tenants[2].colour",
        "tenants[3].id",
    } <= paths
    assert ("tenants[2].agent.secret", "environment variable ACME_AGENT_SECRET is not set") in found
    assert ("tenants[2].colour", "unknown key") in found
    assert ("tenants[2].slack.apps[0].app_token", "required key is missing") in found
    assert any("duplicate tenant id 'good'" in m for p, m in found if p == "tenants[3].id")
    assert any("missing-key.txt" in m for p, m in found if p == "tenants[2].web.api_keys[0]")


def test_secret_references_resolve(tmp_path):
    (tmp_path / "key.txt").write_text("from-a-file-123\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "agent_secret").write_text("from-a-credential")
    path = tmp_path / "ok.yaml"
    path.write_text("""
tenants:
  - id: acme
    agent:
      url: http://127.0.0.1:9/agent
      secret: {credential: agent_secret}
      bearer_token: {env: BEARER}
    web:
      api_keys: [{file: key.txt}, {value: inline-key-000}]
""")
    config = load_config(path, {"BEARER": "from-env", "CREDENTIALS_DIRECTORY": str(creds)})
    agent = config.tenants[0].agent
    assert agent.secret is not None and agent.secret.get_secret_value() == "from-a-credential"
    assert agent.bearer_token is not None and agent.bearer_token.get_secret_value() == "from-env"
    keys = [k.get_secret_value() for k in config.tenants[0].web.api_keys]
    assert keys == ["from-a-file-123", "inline-key-000"]
    assert "from-env" not in repr(config)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tenants:\n  - id: a\n   agent: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems[0].path.startswith("line ")


def test_check_config_cli(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    assert main(["check-config", str(path)], environ={}) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{path}: tenants[2].agent.timeout:" in err
    assert f"{path}: tenants[1].agent.url: must be an http:// or https:// URL" in err
    assert main(["check-config", str(ROOT / "chatgateway" / "cli" / "default.yaml")],
                environ={}) == 0
    assert main(["check-config", str(tmp_path / "absent.yaml")], environ={}) == EXIT_CONFIG
    assert "cannot read" in capsys.readouterr().err


def test_shipped_examples_are_valid():
    shipped = [*(ROOT / "config").glob("*.yaml"), ROOT / "chatgateway" / "cli" / "default.yaml"]
    for path in sorted(shipped):
        env = {name: f"placeholder-{name.lower()}" for name in (
            "ACME_API_KEY", "ACME_AGENT_SECRET", "GLOBEX_API_KEY", "SLACK_BOT_TOKEN",
            "SLACK_APP_TOKEN", "DISCORD_BOT_TOKEN", "CHATGATEWAY_ADMIN_TOKEN")}
        load_config(path, env)


def test_run_with_bad_config_exits_with_config_code_and_no_traceback(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = subprocess.run([sys.executable, "-m", "chatgateway", "run", "--config", str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == EXIT_CONFIG
    assert "tenants[2].agent.timeout" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_keys_cli_creates_a_working_key(tmp_path, capsys):
    path = tmp_path / "gw.yaml"
    path.write_text(f"storage: {{path: {tmp_path / 'db.sqlite'}}}\n"
                    "tenants:\n  - id: acme\n    agent: {builtin: echo}\n")
    # --offline acts on an existing database only: the gateway (or `db migrate`) creates it.
    assert main(["keys", "create", "--offline", "--tenant", "acme", "--config", str(path)],
                environ={}) == 5
    assert main(["db", "migrate", "--config", str(path)], environ={}) == 0
    capsys.readouterr()
    assert main(["keys", "create", "--offline", "--tenant", "acme", "--config", str(path)],
                environ={}) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("cgw_")
    assert main(["keys", "list", "--offline", "--tenant", "acme", "--config", str(path)],
                environ={}) == 0
    key_id = capsys.readouterr().out.splitlines()[1].split()[0]
    assert key_id in key
    assert main(["keys", "create", "--offline", "--tenant", "nobody", "--config", str(path)],
                environ={}) == 5
    assert main(["keys", "revoke", "--offline", "--tenant", "acme", key_id, "--config", str(path)],
                environ={}) == 0


def test_allowed_origins_must_be_origins(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("tenants:\n  - id: a\n    agent: {builtin: echo}\n"
                    "    web: {allowed_origins: ['https://shop.example', 'shop.example', "
                    "'https://x.example/path', '*']}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert [p.path for p in info.value.problems] == ["tenants[0].web.allowed_origins[1]",
                                                     "tenants[0].web.allowed_origins[2]"]


def test_discord_bot_names_are_unique_within_a_tenant(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("tenants:\n  - id: a\n    agent: {builtin: echo}\n"
                    "    discord: {bots: [{token: {value: one-token-1}},"
                    " {token: {value: two-token-2}}]}\n"
                    "  - id: b\n    agent: {builtin: echo}\n"
                    "    discord: {bots: [{name: x, token: {value: one-token-1}},"
                    " {name: y, token: {value: two-token-2}}]}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert [(p.path, p.message) for p in info.value.problems] == [
        ("tenants[0].discord", "bot names must be unique within a tenant: default")]


def test_an_api_key_shared_by_two_tenants_is_refused(tmp_path, capsys):
    path = tmp_path / "k.yaml"
    path.write_text("tenants:\n"
                    "  - {id: a, agent: {builtin: echo},"
                    " web: {api_keys: [{value: shared-key-01}]}}\n"
                    "  - {id: b, agent: {builtin: echo},"
                    " web: {api_keys: [{value: own-key-0001}, {value: shared-key-01}]}}\n")
    assert main(["check-config", str(path)], environ={}) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert (f"{path}: tenants[1].web.api_keys[1]: the same API key as tenants[0].web.api_keys[0]"
            in err)
    assert "shared-key-01" not in err


async def test_admin_api_refuses_a_key_of_another_tenant(make_gateway, http):
    from tests.conftest import ADMIN_TOKEN, tenant, url

    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}},
                             "tenants": [tenant("acme", keys=["acme-key-0001"])]})
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    spec = {"id": "other", "agent": {"builtin": "echo"},
            "web": {"api_keys": [{"value": "acme-key-0001"}]}}
    async with http.post(url(gw, "/admin/tenants"), json=spec, headers=admin) as resp:
        assert resp.status == 409
        assert "web.api_keys[0]" in (await resp.json())["error"]["message"]
    spec["web"] = {"api_keys": [{"value": "other-key-001"}]}
    async with http.post(url(gw, "/admin/tenants"), json=spec, headers=admin) as resp:
        assert resp.status == 201
    spec["web"] = {"api_keys": [{"value": "other-key-001"}, {"value": "acme-key-0001"}]}
    async with http.put(url(gw, "/admin/tenants/other"), json=spec, headers=admin) as resp:
        assert resp.status == 409
        assert "web.api_keys[1]" in (await resp.json())["error"]["message"]
    for key, owner in (("acme-key-0001", "acme"), ("other-key-001", "other")):
        runtime = await gw.tenants.authenticate(key)
        assert runtime is not None and runtime.id == owner


def test_agent_header_values_are_text_or_secret_references(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("tenants:\n  - id: a\n    agent:\n      url: http://127.0.0.1:9/agent\n"
                    "      headers: {X-Key: {env: MISSING}, X-Bad: 3, X-Ok: plain}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert [(p.path, p.message) for p in info.value.problems] == [
        ("tenants[0].agent.headers.X-Key", "environment variable MISSING is not set"),
        ("tenants[0].agent.headers.X-Bad",
         "must be text or a secret reference such as {env: NAME}"),
    ]


async def test_runtime_tenants_take_only_inline_secrets(make_gateway, http, tmp_path):
    from tests.conftest import ADMIN_TOKEN, tenant, url

    victim = tmp_path / "victim-secret.txt"
    victim.write_text("victims-agent-secret-0001")
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}}, "tenants": [
        tenant("victim", agent={"builtin": "echo"})]}, environ={"VICTIM_TOKEN": "victim-token-01"})
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    agent = {"url": "http://127.0.0.1:9/agent"}
    for path, spec in (
        ("agent.bearer_token", {"agent": {**agent, "bearer_token": {"file": str(victim)}}}),
        ("agent.secret", {"agent": {**agent, "secret": {"env": "VICTIM_TOKEN"}}}),
        ("agent.headers.X-Key", {"agent": {**agent, "headers": {"X-Key": {"credential": "k"}}}}),
        ("web.api_keys[0]", {"agent": agent, "web": {"api_keys": [{"env": "VICTIM_TOKEN"}]}}),
    ):
        async with http.post(url(gw, "/admin/tenants"), json={"id": "thief", **spec},
                             headers=admin) as resp:
            assert resp.status == 400, path
            message = (await resp.json())["error"]["message"]
        assert message.startswith(f"{path}: a runtime tenant takes only inline secrets"), message
    spec = {"id": "thief", "agent": {**agent, "bearer_token": {"value": "own-token-0001"},
                                     "headers": {"X-Key": {"value": "own-key-00001"}}}}
    async with http.post(url(gw, "/admin/tenants"), json=spec, headers=admin) as resp:
        assert resp.status == 201


def test_postgres_storage_needs_a_dsn():
    with pytest.raises(ConfigError) as info:
        parse_config({"storage": {"backend": "postgres"}}, file="gw.yaml", environ={})
    assert [p.path for p in info.value.problems] == ["storage.dsn"]
    dsn = "postgresql://gw:pw-123@db.internal/gw"
    config = parse_config({"storage": {"backend": "postgres", "dsn": {"env": "DSN"}}},
                          file="gw.yaml", environ={"DSN": dsn})
    assert config.storage.dsn is not None and config.storage.dsn.get_secret_value() == dsn
    assert dsn not in repr(config)
    assert dsn in secrets_in(config)
    assert parse_config({}, file="gw.yaml", environ={}).storage.dsn is None
