"""The `chatgateway` command as an operator runs it: a real subprocess, against a real daemon.

The daemon runs as systemd would start it (credentials in $CREDENTIALS_DIRECTORY, a relative
storage path); the CLI runs from another directory without those credentials.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.process import ROOT, GatewayProcess

ADMIN = "cli-admin-token-0123456789"
ACME_KEY = "acme-config-key-000001"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m chatgateway ARGS` in `cwd`, with none of the daemon's environment."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("CHATGATEWAY_")
                and k not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "NOTIFY_SOCKET")}
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "chatgateway", *args], cwd=cwd, env=full_env,
                          input=stdin, capture_output=True, text=True, timeout=60)


def chat(base: str, key: str | None, message: str = "hi") -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = json.dumps({"message": message, "userId": "u1"}).encode()
    request = urllib.request.Request(base + "/api/chat", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def systemd_like(tmp_path: Path, port: int | None = None) -> tuple[Path, dict[str, str]]:
    """A config whose secrets are credentials and whose database path is relative.

    Returns the config file (in tmp_path/etc) and the daemon's environment.
    """
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "secret_admin-token").write_text(ADMIN + "\n")
    (creds / "secret_acme-api-key").write_text(ACME_KEY + "\n")
    (creds / "secret_acme-agent-secret").write_text("agent-signing-secret\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    config = {
        "listen": {"host": "127.0.0.1", "port": port or free_port()},
        "storage": {"path": "state/gateway.db"},
        "logging": {"format": "json"},
        "admin": {"token": {"credential": "secret_admin-token"}},
        "tenants": [{
            "id": "acme", "name": "Acme Corp",
            "agent": {"builtin": "echo", "secret": {"credential": "secret_acme-agent-secret"}},
            "web": {"api_keys": [{"credential": "secret_acme-api-key"}]},
        }],
    }  # fmt: skip
    path = etc / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, {"CREDENTIALS_DIRECTORY": str(creds)}


@pytest.fixture
def daemon(tmp_path: Path):
    """A real daemon on a systemd-like config; yields (process, config path, another dir)."""
    config, env = systemd_like(tmp_path)
    proc = GatewayProcess(config, env)
    try:
        proc.wait_started()
        elsewhere = tmp_path / "home" / "operator"
        elsewhere.mkdir(parents=True)
        yield proc, config, elsewhere
    finally:
        proc.stop()


def relative(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def test_keys_through_the_running_gateway_from_another_directory(daemon, tmp_path):
    """The issue's two findings: a relative --config from elsewhere, credentials unresolvable."""
    proc, config, elsewhere = daemon
    conf = relative(config, elsewhere)  # ../../etc/gateway.yaml
    token = {"CHATGATEWAY_ADMIN_TOKEN": ADMIN}

    made = cli("keys", "create", "--tenant", "acme", "--label", "ci", "--config", conf,
               cwd=elsewhere, env=token)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("cgw_") and "shown only once" in made.stderr
    assert chat(proc.url, key)[0] == 200
    # Nothing was created beside the caller; the daemon's database is beside its config.
    assert list(elsewhere.iterdir()) == []
    assert (config.parent / "state" / "gateway.db").exists()

    listed = cli("keys", "list", "--tenant", "acme", "--json", "--config", conf,
                 cwd=elsewhere, env=token)
    assert listed.returncode == 0, listed.stderr
    keys = json.loads(listed.stdout)
    assert [k["label"] for k in keys] == ["ci"] and keys[0]["keyId"] in key
    table = cli("keys", "list", "--tenant", "acme", "--config", conf, cwd=elsewhere, env=token)
    header, row = table.stdout.splitlines()
    assert header.split() == ["KEY", "ID", "LABEL", "CREATED"]
    assert row.split()[0] == keys[0]["keyId"] and row.split()[2].endswith("Z")
    assert row.split()[2][:4].isdigit() and "T" in row.split()[2]

    # The token from a file flag instead of the environment; revoked keys stop at once.
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN + "\n")
    revoked = cli("keys", "revoke", "--tenant", "acme", keys[0]["keyId"], "--json",
                  "--admin-token-file", str(token_file), "--config", conf, cwd=elsewhere)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout) == {"tenantId": "acme", "keyId": keys[0]["keyId"],
                                          "revoked": True}
    assert chat(proc.url, key)[0] == 401
    assert chat(proc.url, ACME_KEY)[0] == 200


def test_the_admin_token_from_the_running_services_credentials(daemon, tmp_path):
    """Under systemd, root reads the token where systemd keeps the service's credentials."""
    from chatgateway.cli.settings import admin_target, credential_environ

    proc, config, _ = daemon
    fallback = tmp_path / "credentials"  # stands in for /run/credentials/chatgateway.service
    assert credential_environ({}, fallback) == {"CREDENTIALS_DIRECTORY": str(fallback)}
    assert credential_environ({"CREDENTIALS_DIRECTORY": "/x"}, fallback) == {
        "CREDENTIALS_DIRECTORY": "/x"}
    assert credential_environ({}, tmp_path / "absent") == {}
    target = admin_target(url=None, token_file=None, config=config,
                          environ={"CREDENTIALS_DIRECTORY": str(fallback)})
    assert target.url == proc.url  # from the config's listen section
    assert target.token is not None and target.token.get_secret_value() == ADMIN


def test_tenants_status_and_reload(daemon, tmp_path):
    proc, config, elsewhere = daemon
    env = {"CHATGATEWAY_ADMIN_TOKEN": ADMIN, "CHATGATEWAY_CONFIG": str(config)}

    listed = cli("tenants", "list", "--json", cwd=elsewhere, env=env)
    assert listed.returncode == 0, listed.stderr
    assert [(t["id"], t["source"]) for t in json.loads(listed.stdout)] == [("acme", "config")]
    table = cli("tenants", "list", cwd=elsewhere, env=env).stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "SOURCE", "AGENT", "PLATFORMS"]
    assert table[1].split()[0] == "acme"

    spec = tmp_path / "beta.yaml"
    spec.write_text("id: beta\nname: Beta\nagent: {builtin: echo}\n"
                    "web: {api_keys: [{value: beta-key-0000000001}]}\n")
    added = cli("tenants", "add", str(spec), "--json", cwd=elsewhere, env=env)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["source"] == "runtime"
    assert chat(proc.url, "beta-key-0000000001")[0] == 200
    again = cli("tenants", "add", "-", cwd=elsewhere, env=env, stdin=spec.read_text())
    assert again.returncode == 6 and "409" in again.stderr  # the id is taken

    shown = cli("tenants", "show", "beta", "--json", cwd=elsewhere, env=env)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["id"] == "beta" and detail["sessions"] == {"active": 1, "total": 1}
    assert detail["keys"] == [] and detail["breaker"]["state"] == "closed"
    text = cli("tenants", "show", "beta", cwd=elsewhere, env=env).stdout
    assert "sessions: 1 active, 1 total" in " ".join(text.split()).replace(" :", ":")

    refused = cli("tenants", "remove", "beta", cwd=elsewhere, env=env)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert chat(proc.url, "beta-key-0000000001")[0] == 200
    removed = cli("tenants", "remove", "beta", "--yes", cwd=elsewhere, env=env)
    assert removed.returncode == 0, removed.stderr
    assert chat(proc.url, "beta-key-0000000001")[0] == 401
    assert cli("tenants", "show", "beta", cwd=elsewhere, env=env).returncode == 5
    assert cli("tenants", "remove", "acme", "--yes", cwd=elsewhere, env=env).returncode == 6

    status = cli("status", "--json", cwd=elsewhere, env=env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["state"] == "ready" and report["pid"] == proc.proc.pid
    lines = cli("status", cwd=elsewhere, env=env).stdout.splitlines()
    assert lines[0].split() == ["state:", "ready"] and lines[1].split() == ["ready:", "yes"]
    assert any(line.startswith("started:") and "Z (up" in line for line in lines)
    assert any(line.split()[:1] == ["TENANT"] for line in lines)

    # A new tenant in the file: reload applies it; a broken file exits 78 and changes nothing.
    data = yaml.safe_load(config.read_text())
    data["tenants"].append({"id": "gamma", "agent": {"builtin": "echo"},
                            "web": {"api_keys": [{"value": "gamma-key-000000001"}]}})
    config.write_text(yaml.safe_dump(data))
    reloaded = cli("reload", "--json", cwd=elsewhere, env=env)
    assert reloaded.returncode == 0, reloaded.stderr
    assert json.loads(reloaded.stdout)["ok"] is True
    assert chat(proc.url, "gamma-key-000000001")[0] == 200
    data["tenants"][1]["agent"] = {"url": "not a url"}
    config.write_text(yaml.safe_dump(data))
    broken = cli("reload", cwd=elsewhere, env=env)
    assert broken.returncode == 78 and "tenants[1].agent.url" in broken.stderr
    assert chat(proc.url, "gamma-key-000000001")[0] == 200


def test_exit_codes(daemon, tmp_path):
    proc, config, elsewhere = daemon
    env = {"CHATGATEWAY_ADMIN_TOKEN": ADMIN}
    conf = str(config)

    assert cli("keys", "list", "--tenant", "nobody", "--config", conf,
               cwd=elsewhere, env=env).returncode == 5
    wrong = cli("keys", "list", "--tenant", "acme", "--config", conf,
                cwd=elsewhere, env={"CHATGATEWAY_ADMIN_TOKEN": "wrong"})
    assert wrong.returncode == 8 and "CHATGATEWAY_ADMIN_TOKEN" in wrong.stderr
    assert "wrong" not in wrong.stderr  # the token itself is never printed
    # The config's admin.token is a credential this shell cannot read: a clear config error.
    unresolved = cli("status", "--config", conf, cwd=elsewhere)
    assert unresolved.returncode == 78
    assert f"{conf}: admin.token: credential secret_admin-token" in unresolved.stderr
    down = cli("status", "--url", f"http://127.0.0.1:{free_port()}", cwd=elsewhere, env=env)
    assert down.returncode == 7 and "cannot reach the gateway" in down.stderr
    assert "Traceback" not in down.stderr + wrong.stderr + unresolved.stderr
    usage = cli("keys", "create", cwd=elsewhere)  # no --tenant
    assert usage.returncode == 2 and "--tenant" in usage.stderr
    # The URL from CHATGATEWAY_URL, the token from stdin.
    via_env = cli("status", "--json", "--admin-token-file", "-", cwd=elsewhere,
                  env={"CHATGATEWAY_URL": proc.url}, stdin=ADMIN + "\n")
    assert via_env.returncode == 0, via_env.stderr


def test_offline_keys_use_the_daemons_database_and_never_create_one(daemon, tmp_path):
    proc, config, elsewhere = daemon
    conf = relative(config, elsewhere)
    made = cli("keys", "create", "--offline", "--tenant", "acme", "--config", conf,
               "--json", cwd=elsewhere)
    assert made.returncode == 0, made.stderr  # no admin token, no credentials needed
    key = json.loads(made.stdout)["key"]
    assert chat(proc.url, key)[0] == 200
    listed = cli("tenants", "list", "--offline", "--json", "--config", conf, cwd=elsewhere)
    assert [t["id"] for t in json.loads(listed.stdout)] == ["acme"]
    # Online-only commands refuse --offline at parse time.
    assert cli("tenants", "remove", "acme", "--offline", cwd=elsewhere).returncode == 2

    other = tmp_path / "other.yaml"
    other.write_text("storage: {path: nowhere/gateway.db}\n"
                     "tenants: [{id: acme, agent: {builtin: echo}}]\n")
    missing = cli("keys", "create", "--offline", "--tenant", "acme", "--config", str(other),
                  cwd=elsewhere)
    assert missing.returncode == 5 and "no database at" in missing.stderr
    assert not (tmp_path / "nowhere").exists() and list(elsewhere.iterdir()) == []


def test_run_without_config_from_any_directory(tmp_path):
    """The embedded default ships in the package; its database goes to the user's state dir."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            sock.bind(("127.0.0.1", 8080))
        except OSError:
            pytest.skip("127.0.0.1:8080 (the embedded default's port) is in use")
    somewhere = tmp_path / "somewhere"
    somewhere.mkdir()
    state = tmp_path / "state"
    proc = GatewayProcess(somewhere / "unused.yaml", {"XDG_STATE_HOME": str(state)},
                          args=["run"])
    try:
        assert proc.wait_started() == 8080
        with urllib.request.urlopen(proc.url + "/healthz", timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        assert chat(proc.url, None)[1]["response"] == "echo: hi"  # no key: the loopback default
        assert (state / "chatgateway" / "chatgateway.db").exists()
        assert list(somewhere.iterdir()) == []
    finally:
        assert proc.stop() == 0


def test_relative_storage_precedence():
    from chatgateway.config import StorageConfig
    from chatgateway.daemon import EMBEDDED_CONFIG, resolve_storage

    relative_db = StorageConfig(path="data/gw.db")
    resolve = resolve_storage
    assert resolve(relative_db, {}, "/etc/gw/gateway.yaml").path == "/etc/gw/data/gw.db"
    systemd = {"STATE_DIRECTORY": "/var/lib/chatgateway:/var/lib/other"}
    assert resolve(relative_db, systemd, "/etc/gw/gateway.yaml").path == "/var/lib/chatgateway/gw.db"
    home = {"HOME": "/home/me"}
    assert resolve(relative_db, home, EMBEDDED_CONFIG).path == (
        "/home/me/.local/state/chatgateway/data/gw.db")
    assert resolve(relative_db, {**home, "XDG_STATE_HOME": "/xdg"}, None).path == (
        "/xdg/chatgateway/data/gw.db")
    assert resolve(relative_db, {**home, "XDG_STATE_HOME": "rel"}, None).path == (
        "/home/me/.local/state/chatgateway/data/gw.db")  # a relative XDG value is ignored
    absolute = StorageConfig(path="/srv/gw.db")
    assert resolve(absolute, systemd, "/etc/gw/gateway.yaml") == absolute
    memory = StorageConfig(path=":memory:")
    assert resolve(memory, {}, "/etc/gw/gateway.yaml") == memory


def test_listen_url_and_output_helpers():
    from chatgateway.cli.output import iso_time, table
    from chatgateway.cli.settings import listen_url
    from chatgateway.config import ListenConfig

    assert listen_url(ListenConfig(host="0.0.0.0", port=9000)) == "http://127.0.0.1:9000"
    assert listen_url(ListenConfig(host="::", port=9000)) == "http://[::1]:9000"
    assert listen_url(ListenConfig(host="10.1.2.3", port=80)) == "http://10.1.2.3:80"
    assert iso_time(0) == "1970-01-01T00:00:00Z" and iso_time(None) == "-"
    assert table(["a", "bb"], [("x", None), ("yyy", ["p", "q"])]).splitlines() == [
        "A    BB", "x    -", "yyy  p,q"]


def _subcommands(parser: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    import argparse

    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{' '.join((*prefix, name))} has no help"
                found.append(((*prefix, name), sub))
                found += _subcommands(sub, (*prefix, name))
    return found


def test_every_subcommand_and_option_has_help(capsys):
    from chatgateway.cli import _parser, main

    commands = _subcommands(_parser())
    names = {" ".join(c) for c, _ in commands}
    assert {"run", "check-config", "keys create", "keys list", "keys revoke", "tenants list",
            "tenants show", "tenants add", "tenants remove", "tenants purge", "status",
            "users export", "users erase",
            "reload", "db status", "db migrate", "db backup"} <= names
    for command, sub in commands:
        assert sub.description, f"{' '.join(command)} has no description"
        for action in sub._actions:
            if action.dest not in ("help",) and not action.__class__.__name__.startswith("_Sub"):
                assert action.help, f"{' '.join(command)} {action.dest} has no help"
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"], {})
        assert exit_info.value.code == 0
        assert sub.description.split()[0] in capsys.readouterr().out


def test_start_sh_installs_only_when_needed(tmp_path):
    """start.sh runs pip only for a new venv or a changed pyproject.toml (a stamp file)."""
    (tmp_path / "scripts").mkdir()
    start = tmp_path / "scripts" / "start.sh"
    start.write_text((ROOT / "scripts" / "start.sh").read_text())
    start.chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    calls = tmp_path / "calls.log"
    # A stand-in interpreter: `-m venv` makes the venv, `-m pip` records the call; the venv's
    # `chatgateway` records how it was run.
    python = tmp_path / "fake-python"
    python.write_text(f"""#!/bin/sh
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"; cp "$0" "$3/bin/python"
    printf '#!/bin/sh\\necho "chatgateway $*" >> {calls}\\n' > "$3/bin/chatgateway"
    chmod +x "$3/bin/chatgateway"; exit 0
fi
echo "python $*" >> {calls}
""")
    python.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(python), "HOME": str(tmp_path)}

    def run() -> list[str]:
        calls.unlink(missing_ok=True)
        result = subprocess.run([str(start), "--flag"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert ".venv/bin/chatgateway" in result.stderr  # says where the command is
        return calls.read_text().splitlines()

    first = run()
    assert "python -m pip install -e ." in first and first[-1] == "chatgateway run --flag"
    assert run() == ["chatgateway run --flag"]  # the second start installs nothing
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert "python -m pip install -e ." in run()
    assert run() == ["chatgateway run --flag"]


def test_tenants_purge(daemon, tmp_path):
    """Offboarding: a runtime tenant and a former config tenant, with what was deleted."""
    proc, config, elsewhere = daemon
    env = {"CHATGATEWAY_ADMIN_TOKEN": ADMIN, "CHATGATEWAY_CONFIG": str(config)}
    spec = json.dumps({"id": "beta", "agent": {"builtin": "echo"},
                       "web": {"api_keys": [{"value": "beta-key-0000000001"}]}})
    assert cli("tenants", "add", "-", cwd=elsewhere, env=env, stdin=spec).returncode == 0
    assert chat(proc.url, "beta-key-0000000001")[0] == 200

    unconfirmed = cli("tenants", "purge", "beta", cwd=elsewhere, env=env)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    purged = cli("tenants", "purge", "beta", "--yes", "--json", cwd=elsewhere, env=env)
    assert purged.returncode == 0, purged.stderr
    report = json.loads(purged.stdout)
    assert report["tenantId"] == "beta" and report["tenantRemoved"] is True
    assert report["deleted"]["sessions"] == 1 and report["deleted"]["turns"] == 2
    assert chat(proc.url, "beta-key-0000000001")[0] == 401

    # A tenant still in the config file is refused (409); once removed from it, purged.
    assert chat(proc.url, ACME_KEY)[0] == 200
    in_file = cli("tenants", "purge", "acme", "--yes", cwd=elsewhere, env=env)
    assert in_file.returncode == 6 and "config file" in in_file.stderr
    data = yaml.safe_load(config.read_text())
    data["tenants"] = []
    config.write_text(yaml.safe_dump(data))
    assert cli("reload", cwd=elsewhere, env=env).returncode == 0
    table = cli("tenants", "purge", "acme", "--yes", cwd=elsewhere, env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "purged tenant acme (data purged)"
    assert lines[1].split() == ["TABLE", "ROWS", "DELETED"]
    assert ["sessions", "1"] in [line.split() for line in lines[2:]]


def test_users_export_and_erase(daemon, tmp_path):
    """A user's data (GDPR articles 15 and 17) through the CLI."""
    proc, config, elsewhere = daemon
    env = {"CHATGATEWAY_ADMIN_TOKEN": ADMIN, "CHATGATEWAY_CONFIG": str(config)}
    assert chat(proc.url, ACME_KEY, "my data")[0] == 200

    out = elsewhere / "u1.json"
    exported = cli("users", "export", "--tenant", "acme", "u1", "--platform", "web",
                   "--out", out.name, cwd=elsewhere, env=env)
    assert exported.returncode == 0, exported.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    document = json.loads(out.read_text())
    assert document["userId"] == "u1" and len(document["sessions"]) == 1
    assert [t["text"] for t in document["sessions"][0]["transcript"]] == ["my data", "echo: my data"]
    exists = cli("users", "export", "--tenant", "acme", "u1", "--out", out.name,
                 cwd=elsewhere, env=env)
    assert exists.returncode == 2  # never overwrites a file

    assert cli("users", "erase", "--tenant", "acme", "u1", cwd=elsewhere, env=env).returncode == 2
    erased = cli("users", "erase", "--tenant", "acme", "u1", "--yes", "--json",
                 cwd=elsewhere, env=env)
    assert erased.returncode == 0, erased.stderr
    assert json.loads(erased.stdout)["deleted"]["sessions"] == 1
    gone = cli("users", "export", "--tenant", "acme", "u1", cwd=elsewhere, env=env)
    assert gone.returncode == 5 and "404" in gone.stderr


def test_run_from_another_directory_keeps_the_database_beside_its_config(tmp_path):
    """`chatgateway run --config ../etc/gateway.yaml`: relative paths follow the file."""
    config, env = systemd_like(tmp_path, port=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = GatewayProcess(elsewhere / "unused.yaml", env,
                          args=["run", "--config", relative(config, elsewhere)])
    try:
        proc.wait_started()
        assert chat(proc.url, ACME_KEY)[0] == 200
        assert (config.parent / "state" / "gateway.db").exists()
        assert list(elsewhere.iterdir()) == []
    finally:
        assert proc.stop() == 0


def test_shipped_configs_listen_on_loopback():
    """The examples for /etc/chatgateway/gateway.yaml agree: behind a proxy, on loopback."""
    for path in [ROOT / "config" / "multi-tenant.example.yaml",
                 ROOT / "systemd" / "gateway.example.yaml",
                 ROOT / "chatgateway" / "cli" / "default.yaml"]:
        assert yaml.safe_load(path.read_text())["listen"]["host"] == "127.0.0.1", path
