"""Answers with files and buttons in the chat page, in a real browser (chromium): an image shown
inline, a PDF downloaded through the gateway's link, and a click reaching the agent as the
button's value in the same session, the buttons then closed showing the choice."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import expect

from chatgateway.testing.agent import AgentCall
from tests.conftest import url
from tests.test_webchat_browser import AGENT, USER, WAIT, browser, new_page, open_chat, public, send

pytestmark = pytest.mark.browser
__all__ = ["browser"]  # the fixture, imported

DOCS_IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
#: The width of an image once loaded (decode() fails for a broken or refused image).
LOADED_WIDTH = "img => img.decode().then(() => img.naturalWidth)"
PDF = b"%PDF-1.4\n% weekly report\n" + b"0" * 50_000


def bar_chart(width: int = 320, height: int = 180) -> bytes:
    """A small PNG bar chart, made here (no image library needed)."""
    bars = [0.35, 0.6, 0.45, 0.8, 0.7, 0.95]
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter: none
        for x in range(width):
            slot, offset = divmod(x - 20, 48)
            inside = 0 <= slot < len(bars) and 8 <= offset < 40
            if inside and height - 16 - y < bars[slot] * (height - 32) and y < height - 16:
                row += bytes((37, 99, 235))
            elif y == height - 16:
                row += bytes((148, 163, 184))
            else:
                row += bytes((248, 250, 252))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


@pytest.fixture
async def files_server() -> AsyncIterator[str]:
    async def pdf(request: web.Request) -> web.Response:
        return web.Response(body=PDF, content_type="application/pdf")

    app = web.Application()
    app.router.add_get("/weekly-report.pdf", pdf)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_images_files_and_buttons_in_the_page(browser, make_agent, make_gateway, files_server,
                                                    output_dir):
    chart = bar_chart()

    async def behaviour(call: AgentCall) -> web.StreamResponse:
        text = call.body["message"]["text"]
        if text == "approve":
            return web.json_response({"response": "Published. The team has been notified."})
        return web.json_response({
            "response": "Here is this week's report: sign-ups are **up 18%**. Publish it?",
            "attachments": [
                {"name": "signups.png", "contentType": "image/png",
                 "data": base64.b64encode(chart).decode()},
                {"name": "weekly-report.pdf", "contentType": "application/pdf",
                 "url": files_server + "/weekly-report.pdf"},
            ],
            "actions": [
                {"label": "Approve", "value": "approve", "style": "primary"},
                {"label": "Reject", "value": "reject", "style": "danger"},
            ],
        })

    agent = await make_agent(behaviour=behaviour)
    gw = await make_gateway({"tenants": [public("acme", agent.url, title="Acme Reports")]})
    page = await new_page(browser)
    await open_chat(page, url(gw, "/chat/acme"))
    await send(page, "Weekly report please")
    answer = page.locator(AGENT).first
    await expect(answer.locator(".cg-bubble strong")).to_have_text("up 18%", timeout=WAIT)

    # The image is shown inline (loaded: it has its real size), through the gateway's link.
    image = answer.locator(".cg-image img")
    await expect(image).to_have_attribute("alt", "signups.png")
    assert await image.evaluate(LOADED_WIDTH) == 320
    assert (await image.get_attribute("src") or "").startswith(url(gw, "/api/answer-files/"))

    approve = answer.get_by_role("button", name="Approve")
    reject = answer.get_by_role("button", name="Reject")
    await expect(approve).to_be_enabled()
    await expect(reject).to_be_enabled()
    await page.screenshot(path=str(output_dir / "webchat-actions.png"))
    DOCS_IMAGES.mkdir(exist_ok=True)
    await page.screenshot(path=str(DOCS_IMAGES / "webchat-actions.png"))

    # The PDF is a download link; the download is the agent's file.
    link = answer.get_by_role("link", name="weekly-report.pdf (download)")
    async with page.expect_download() as info:
        await link.click()
    download = await info.value
    assert download.suggested_filename == "weekly-report.pdf"
    saved = await download.path()
    assert saved.read_bytes() == PDF

    # A click: the value reaches the agent as the next message of the same session.
    await approve.click()
    await expect(page.locator(AGENT)).to_have_count(2, timeout=WAIT)
    await expect(page.locator(AGENT).last).to_contain_text("Published.")
    first, second = agent.calls
    assert second.body["message"]["text"] == "approve"
    assert second.body["sessionId"] == first.body["sessionId"]
    assert second.body["metadata"] == {"action": {"value": "approve", "label": "Approve",
                                                  "index": 1, "via": "button"}}
    await expect(page.locator(USER).last).to_have_text("You: Approve")
    await expect(approve).to_be_disabled()
    await expect(reject).to_be_disabled()
    await expect(approve).to_have_attribute("aria-pressed", "true")
    await expect(approve).to_have_class("cg-choice cg-choice-primary cg-chosen")

    # Reloaded: the transcript shows the image, the closed buttons and the choice again.
    await page.reload()
    await expect(page.locator(AGENT)).to_have_count(2, timeout=WAIT)
    answer = page.locator(AGENT).first
    assert await answer.locator(".cg-image img").evaluate(LOADED_WIDTH) == 320
    await expect(answer.get_by_role("button", name="Approve")).to_be_disabled()
    await expect(answer.get_by_role("button", name="Approve")).to_have_attribute("aria-pressed",
                                                                                 "true")
    await expect(answer.get_by_role("button", name="Reject")).to_have_attribute("aria-pressed",
                                                                                "false")
    await expect(page.locator(USER).last).to_have_text("You: Approve")
    assert page.script_errors == []  # type: ignore[attr-defined]


async def test_typing_the_number_closes_the_buttons(browser, make_agent, make_gateway):
    async def behaviour(call: AgentCall) -> web.StreamResponse:
        if call.body["message"]["text"] == "go?":
            return web.json_response({"response": "Which one?", "actions": [
                {"label": "Blue", "value": "color:blue"}, {"label": "Green", "value": "color:green"}]})
        return web.json_response({"response": "You said " + call.body["message"]["text"]})

    agent = await make_agent(behaviour=behaviour)
    gw = await make_gateway({"tenants": [public("acme", agent.url)]})
    page = await new_page(browser)
    await open_chat(page, url(gw, "/chat/acme"))
    await send(page, "go?")
    green = page.locator(AGENT).first.get_by_role("button", name="Green")
    await expect(green).to_be_enabled(timeout=WAIT)
    await send(page, "2")  # the text fallback's rule works in the page too
    await expect(page.locator(AGENT).last).to_contain_text("You said color:green", timeout=WAIT)
    await expect(green).to_be_disabled()
    assert agent.calls[-1].body["metadata"]["action"]["via"] == "typed"
