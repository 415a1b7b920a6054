"""The chat page shows an answer the agent sends later (202, then its callback), also after a
reload. Real chromium (tests/browser.py) against the real gateway and a loopback agent."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from playwright.async_api import Browser, expect

from tests.browser import chromium, new_page
from tests.conftest import tenant, url
from tests.test_callbacks import accept_later, post_callback

pytestmark = pytest.mark.browser

WAIT = 15_000  # ms
PENDING = ".cg-messages .cg-agent.cg-pending"
ANSWER = ".cg-messages .cg-agent:not(.cg-typing):not(.cg-streaming)"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as running:
        yield running


async def test_the_page_shows_a_late_answer_and_after_a_reload(
    browser, make_agent, make_gateway, http: aiohttp.ClientSession, output_dir
):
    agent = await make_agent(behaviour=accept_later)
    gw = await make_gateway({"tenants": [tenant("acme", agent.url, web={"public": True})]})
    page = await new_page(browser)
    await page.goto(url(gw, "/chat/acme"))
    chat = page.locator(".cg-chat")
    await expect(chat).to_have_attribute("data-state", "ready", timeout=WAIT)
    box = page.locator("textarea")
    await box.fill("Compile the quarterly numbers")
    await box.press("Enter")
    await expect(page.locator(PENDING)).to_have_count(1, timeout=WAIT)
    await expect(chat).to_have_attribute("data-state", "ready", timeout=WAIT)  # can type on
    callback = (await agent.wait_calls(1))[0].body["callback"]

    # Progress shows in the pending bubble, then the final answer replaces it.
    await post_callback(http, callback["url"], callback["token"],
                        {"text": "Working on Q3…", "final": False})
    await expect(page.locator(PENDING)).to_contain_text("Working on Q3", timeout=WAIT)
    await post_callback(http, callback["url"], callback["token"],
                        {"text": "Revenue was **up 4%**."})
    await expect(page.locator(PENDING)).to_have_count(0, timeout=WAIT)
    await expect(page.locator(ANSWER)).to_have_text("Acme: Revenue was up 4%.")
    await expect(page.locator(ANSWER).locator("strong")).to_have_text("up 4%")

    # A second late answer, with the page reloaded while it is pending.
    await box.fill("And Q4?")
    await box.press("Enter")
    second = (await agent.wait_calls(2))[1].body["callback"]
    await expect(page.locator(PENDING)).to_have_count(1, timeout=WAIT)
    await page.reload()
    await expect(chat).to_have_attribute("data-state", "ready", timeout=WAIT)
    await expect(page.locator(PENDING)).to_have_count(1, timeout=WAIT)
    await page.screenshot(path=str(output_dir / "callbacks-pending.png"))
    await post_callback(http, second["url"], second["token"], {"text": "Q4 is not closed yet."})
    await expect(page.locator(PENDING)).to_have_count(0, timeout=WAIT)
    await expect(page.locator(".cg-messages .cg-bubble")).to_have_text(
        ["Compile the quarterly numbers", "Revenue was up 4%.", "And Q4?",
         "Q4 is not closed yet."], timeout=WAIT)
    assert page.script_errors == []  # type: ignore[attr-defined]
