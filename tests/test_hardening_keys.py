"""A key value authenticates one tenant: config keys, runtime tenants' keys and generated keys."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import yaml
from structlog.testing import capture_logs

from chatgateway.daemon import Daemon
from tests.conftest import ADMIN_TOKEN, tenant, url

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BETA_CONFIG_KEY = "beta-config-key-0123456789"


async def whose(http: aiohttp.ClientSession, gw: Daemon, key: str) -> str | None:
    """The tenant `key` authenticates as (None when refused)."""
    async with http.post(
        url(gw, "/api/visitor-token"), json={}, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        body = await resp.json()
        return body["tenantId"] if resp.status == 200 else None


async def generated_key(http: aiohttp.ClientSession, gw: Daemon, tenant_id: str) -> str:
    async with http.post(url(gw, f"/admin/tenants/{tenant_id}/keys"), json={},
                         headers=ADMIN) as resp:
        assert resp.status == 201
        return str((await resp.json())["key"])


def config(*tenants: dict[str, Any]) -> dict[str, Any]:
    return {"admin": {"token": {"value": ADMIN_TOKEN}}, "tenants": list(tenants)}


async def test_runtime_tenant_cannot_take_a_generated_key(make_gateway, http):
    gw = await make_gateway(config(tenant("beta", keys=[BETA_CONFIG_KEY])))
    key = await generated_key(http, gw, "beta")
    thief = {"id": "thief", "agent": {"builtin": "echo"}, "web": {"api_keys": [{"value": key}]}}
    async with http.post(url(gw, "/admin/tenants"), json=thief, headers=ADMIN) as resp:
        assert resp.status == 409
        error = (await resp.json())["error"]
        assert error["code"] == "conflict" and "web.api_keys[0]" in error["message"]
        assert key not in error["message"]
    assert await whose(http, gw, key) == "beta"
    # Nor through PUT of an existing runtime tenant, nor with beta's config key.
    honest = {"id": "thief", "agent": {"builtin": "echo"}}
    async with http.post(url(gw, "/admin/tenants"), json=honest, headers=ADMIN) as resp:
        assert resp.status == 201
    for stolen in (key, BETA_CONFIG_KEY):
        spec = {**honest, "web": {"api_keys": [{"value": stolen}]}}
        async with http.put(url(gw, "/admin/tenants/thief"), json=spec, headers=ADMIN) as resp:
            assert resp.status == 409
        assert await whose(http, gw, stolen) == "beta"
    # Its own generated key is fine as one of its own keys.
    own = await generated_key(http, gw, "thief")
    spec = {**honest, "web": {"api_keys": [{"value": own}]}}
    async with http.put(url(gw, "/admin/tenants/thief"), json=spec, headers=ADMIN) as resp:
        assert resp.status == 200
    assert await whose(http, gw, own) == "thief"


async def test_config_key_equal_to_a_generated_key_is_refused(make_gateway, http, capsys):
    first = await make_gateway(config(tenant("alpha"), tenant("beta")))
    key = await generated_key(http, first, "beta")
    # Reload with alpha claiming beta's generated key: the key stays beta's, and it is logged.
    path = first.config_path
    path.write_text(yaml.safe_dump({
        **yaml.safe_load(path.read_text()),
        "tenants": [tenant("alpha", keys=[key, "alpha-own-key-0123456"]), tenant("beta")],
    }))
    with capture_logs() as logs:
        result = await first.reload()
    assert result.ok
    conflicts = [e for e in logs if e["event"] == "api_key_conflict"]
    assert [(e["tenant_id"], e["path"], e["other_tenant_id"]) for e in conflicts] == [
        ("alpha", "web.api_keys[0]", "beta")]
    assert await whose(http, first, key) == "beta"
    assert await whose(http, first, "alpha-own-key-0123456") == "alpha"
    await first.stop()
    # At start-up (same store, same file): the same. (start() configures logging to stdout.)
    capsys.readouterr()
    second = Daemon(path, {})
    await second.start()
    try:
        logs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [e["tenant_id"] for e in logs if e["event"] == "api_key_conflict"] == ["alpha"]
        assert await whose(http, second, key) == "beta"
    finally:
        await second.stop()
