"""Drive Debian's chromium headless with Playwright, and serve pages from another origin."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright

#: `playwright install` cannot download a browser here; Debian's chromium stands in.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 780}


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless chromium, closed on exit."""
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - once per test, before any I/O
        pytest.fail("chromium is not installed (scripts/test.sh installs it)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def new_page(browser: Browser, *, phone: bool = False) -> Page:
    """A page in its own context (own localStorage) that fails the test on a script error."""
    if phone:
        context = await browser.new_context(
            viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
        )
    else:
        context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.script_errors = errors  # type: ignore[attr-defined]
    return page


@dataclass
class Site:
    """A web site on 127.0.0.1 with a port of its own: another origin than the gateway's."""

    origin: str
    html: str = ""


@asynccontextmanager
async def site() -> AsyncIterator[Site]:
    """Serve `Site.html` at /; the origin is known before the page is written."""
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=served.html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    served = Site(f"http://127.0.0.1:{runner.addresses[0][1]}")
    try:
        yield served
    finally:
        await runner.cleanup()


def widget_host_page(gateway: str, tenant: str, title: str = "Example shop") -> str:
    """A third-party page embedding the widget; it records the widget's ready/error events."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  body {{ margin: 0; font: 16px/1.5 Georgia, serif; color: #3a2f25; background: #fbf7f2; }}
  header {{ padding: 20px 32px; background: #3a2f25; color: #fbf7f2; font-size: 22px; }}
  main {{ max-width: 720px; margin: 32px auto; padding: 0 24px; }}
  div, button {{ color: red; font-size: 30px; }}  /* the host has none: must not reach the widget */
</style>
<script>
  window.chatEvents = [];
  addEventListener("chatgateway:ready", e => chatEvents.push(["ready", e.detail]));
  addEventListener("chatgateway:error", e => chatEvents.push(["error", e.detail]));
</script>
</head><body>
<header>{title}</header>
<main><h1>Handmade ceramics</h1>
<p>Questions about an order? Our assistant is in the corner.</p></main>
<script src="{gateway}/widget.js" data-tenant="{tenant}" async></script>
</body></html>"""


class GatedAgent:
    """An agent that streams `chunks` as NDJSON, each only after the test opens its gate."""

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks
        self.gates = [asyncio.Event() for _ in chunks]
        self.calls: list[dict[str, Any]] = []
        self.finished = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> GatedAgent:
        app = web.Application()
        app.router.add_post("/agent", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/agent"
        return self

    async def stop(self) -> None:
        for gate in self.gates:
            gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for chunk, gate in zip(self.chunks, self.gates, strict=True):
            await gate.wait()
            await response.write(json.dumps({"delta": chunk}).encode() + b"\n")
        await response.write_eof()
        self.finished.set()
        return response
