from tests.conftest import ADMIN_TOKEN, tenant, url


async def test_chat_round_trip_through_http_agent(make_agent, make_gateway, http):
    agent = await make_agent()
    gw = await make_gateway({"admin": {"token": {"value": ADMIN_TOKEN}},
                             "tenants": [tenant("acme", agent.url, keys=["acme-key-123456"])]})
    async with http.post(url(gw, "/api/chat"), json={"message": "hi", "userId": "u"},
                         headers={"Authorization": "Bearer acme-key-123456"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["response"] == "agent: hi"
    assert agent.calls[0].body["tenant"] == "acme"
