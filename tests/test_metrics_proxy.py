"""GET /metrics is open to local scrapers only: through a reverse proxy it needs the admin token."""

from __future__ import annotations

import pytest

from tests.conftest import ADMIN_TOKEN, url

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
async def test_metrics_through_a_proxy_need_the_admin_token(make_gateway, http, header):
    """A proxy on the same host makes every caller on the internet a loopback peer."""
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}}, "tenants": []})
    proxied = {header: "203.0.113.7" if header != "Forwarded" else "for=203.0.113.7"}
    async with http.get(url(gw, "/metrics"), headers=proxied) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"
    async with http.get(url(gw, "/metrics"), headers={**proxied, **ADMIN}) as resp:
        assert resp.status == 200
        assert "chatgateway_" in await resp.text()
    async with http.get(url(gw, "/metrics")) as resp:  # a local scraper still needs no token
        assert resp.status == 200


async def test_metrics_for_a_rebound_host_need_the_admin_token(make_gateway, http):
    """DNS rebinding: a web page whose name now points at 127.0.0.1 is a loopback peer too."""
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}}, "tenants": []})
    rebound = {"Host": f"rebind.attacker.example:{gw.port}"}
    async with http.get(url(gw, "/metrics"), headers=rebound) as resp:
        assert resp.status == 401
    async with http.get(url(gw, "/metrics"), headers={**rebound, **ADMIN}) as resp:
        assert resp.status == 200
    for host in (f"localhost:{gw.port}", f"127.0.0.1:{gw.port}"):
        async with http.get(url(gw, "/metrics"), headers={"Host": host}) as resp:
            assert resp.status == 200
