"""Fetching agent-given URLs: the SSRF guards, redirects, the size cap, streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from chatgateway.fetch import FetchError, fetch, public_address

BODY = b"%PDF-1.4 " + b"x" * 200_000


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def file(request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/pdf")

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no Content-Length: the cap applies while reading
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"y" * 10_000)
        return response

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/file.pdf", file)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/missing", missing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def test_public_address() -> None:
    assert public_address("8.8.8.8") and public_address("2001:4860:4860::8888")
    for private in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
    ):
        assert not public_address(private), private


async def test_the_tenants_agent_host_may_be_private(server: str) -> None:
    async with fetch(server + "/file.pdf", trusted_hosts=["127.0.0.1"]) as got:
        assert got.size == len(BODY) and got.content_type == "application/pdf"
        assert await got.read() == BODY


async def test_private_addresses_are_refused(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    for url in (
        server + "/file.pdf",  # an IP literal, not the agent's host
        f"http://localhost:{port}/file.pdf",  # a name resolving to loopback
        f"http://[::1]:{port}/file.pdf",
        "http://169.254.169.254/latest/meta-data/",
    ):
        with pytest.raises(FetchError, match="public address"):
            async with fetch(url, trusted_hosts=["agent.example"]):
                pass
    for url in ("file:///etc/passwd", "ftp://example.com/x", "gopher://127.0.0.1/"):
        with pytest.raises(FetchError, match="only http and https"):
            async with fetch(url):
                pass


async def test_redirects_are_checked_each_time(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    # From the trusted host to a name that is not trusted and resolves to loopback: refused.
    url = f"{server}/redirect?to=http://localhost:{port}/file.pdf"
    with pytest.raises(FetchError, match="public address"):
        async with fetch(url, trusted_hosts=["127.0.0.1"]):
            pass
    url = f"{server}/redirect?to=/file.pdf"
    async with fetch(url, trusted_hosts=["127.0.0.1"]) as got:
        assert await got.read() == BODY
    loop = f"{server}/redirect?to=/redirect%3Fto%3D/redirect%253Fto%253D/redirect%25253Fto%25253D/redirect%2525253Fto%2525253D/file.pdf"
    with pytest.raises(FetchError, match="redirects"):
        async with fetch(loop, trusted_hosts=["127.0.0.1"]):
            pass


async def test_size_cap_and_errors(server: str) -> None:
    with pytest.raises(FetchError, match="larger than 1000 bytes"):
        async with fetch(server + "/file.pdf", trusted_hosts=["127.0.0.1"], max_bytes=1000):
            pass
    # Without a declared size, the cap cuts the stream while it is read (never buffered whole).
    seen = 0
    with pytest.raises(FetchError, match="larger than 50000 bytes"):
        async with fetch(server + "/chunked", trusted_hosts=["127.0.0.1"], max_bytes=50_000) as got:
            async for chunk in got.chunks():
                seen += len(chunk)
    assert seen <= 50_000
    with pytest.raises(FetchError, match="HTTP 404"):
        async with fetch(server + "/missing", trusted_hosts=["127.0.0.1"]):
            pass
    with pytest.raises(FetchError, match="could not be reached"):
        async with fetch("http://127.0.0.1:9/x", trusted_hosts=["127.0.0.1"]):
            pass
