"""The chat page's file picker in a real browser: a file reaches the agent, refusals are shown."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Route, expect

from tests.conftest import url
from tests.test_webchat_browser import (
    AGENT,
    USER,
    WAIT,
    browser,  # noqa: F401 - the fixture
    new_page,
    open_chat,
    public,
    shot,
)

pytestmark = pytest.mark.browser

PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)


async def test_a_picked_file_reaches_the_agent_and_refusals_are_clear(
    browser, make_agent, make_gateway, output_dir: Path  # noqa: F811
):
    agent = await make_agent(prefix="Got it: ")
    gw = await make_gateway({"tenants": [public(
        "acme", agent.url, title="Acme Support",
    ) | {"files": {"max_bytes": 1024, "allowed_types": ["image/*", "application/pdf"]}}]})
    page = await new_page(browser)
    await open_chat(page, url(gw, "/chat/acme"))
    attach = page.get_by_role("button", name="Attach a file")
    await expect(attach).to_be_enabled()
    picker = page.locator("input[type=file]")

    # Too large for the tenant: refused in the page with the file's name and the limit.
    await picker.set_input_files(
        files=[{"name": "holiday.png", "mimeType": "image/png", "buffer": bytes(5000)}]
    )
    notice = page.get_by_role("alert")
    await expect(notice).to_contain_text("holiday.png is too large (4.9 KB)", timeout=WAIT)
    await expect(notice).to_contain_text("files up to 1 KB can be sent here")
    await expect(page.locator(".cg-attachments")).to_be_hidden()
    await shot(page, output_dir, "file-too-large")

    # A type the tenant does not accept.
    await picker.set_input_files(
        files=[{"name": "setup.exe", "mimeType": "application/x-msdownload", "buffer": b"MZ"}]
    )
    await expect(notice).to_contain_text(
        "setup.exe can't be sent here: files of type application/x-msdownload are not accepted"
    )

    # An accepted file: uploaded at once, shown above the box, sent with the message.
    await picker.set_input_files(
        files=[{"name": "receipt.png", "mimeType": "image/png", "buffer": PNG}]
    )
    chip = page.locator(".cg-attachments .cg-file")
    await expect(chip).to_contain_text("receipt.png", timeout=WAIT)
    await expect(chip).to_contain_text("208 bytes")
    await expect(notice).to_be_hidden()
    await shot(page, output_dir, "file-picked")
    box = page.get_by_role("textbox", name="Message to Acme Support")
    await box.fill("Is this receipt valid?")
    await box.press("Enter")
    await expect(page.locator(AGENT)).to_have_text(
        "Acme Support: Got it: Is this receipt valid?", timeout=WAIT
    )
    await expect(page.locator(USER)).to_contain_text("receipt.png")
    await expect(page.locator(".cg-attachments")).to_be_hidden()
    [call] = agent.calls
    [item] = call.body["message"]["attachments"]
    assert (item["name"], item["contentType"], item["size"]) == ("receipt.png", "image/png", 208)
    async with aiohttp.ClientSession() as http, http.get(item["url"]) as resp:
        assert resp.status == 200 and await resp.read() == PNG
    await shot(page, output_dir, "file-sent")

    assert page.script_errors == []  # type: ignore[attr-defined]


async def test_a_refused_type_is_named_in_the_page(
    browser, make_agent, make_gateway  # noqa: F811
):
    agent = await make_agent()
    gw = await make_gateway({"tenants": [public("acme", agent.url) | {
        "files": {"allowed_types": ["image/png"]}}]})
    page = await new_page(browser)
    await open_chat(page, url(gw, "/chat/acme"))
    notice = page.get_by_role("alert")
    await page.locator("input[type=file]").set_input_files(
        files=[{"name": "scan.gif", "mimeType": "image/gif", "buffer": b"GIF89a"}]
    )
    await expect(notice).to_contain_text(
        "scan.gif can't be sent here: files of type image/gif are not accepted", timeout=WAIT
    )
    assert page.script_errors == []  # type: ignore[attr-defined]
    assert agent.calls == []


async def test_the_gateways_refusal_of_an_upload_is_shown(
    browser, make_agent, make_gateway  # noqa: F811
):
    """The page's rules may be stale (a reload changed the tenant): the gateway decides."""
    agent = await make_agent()
    gw = await make_gateway({"tenants": [public("acme", agent.url) | {
        "files": {"allowed_types": ["image/png"], "max_bytes": 1000}}]})
    page = await new_page(browser)

    async def stale_rules(route: Route) -> None:
        response = await route.fetch()
        body = await response.json()
        body["chat"]["files"] = {"maxBytes": 10**9, "allowedTypes": ["*/*"]}
        await route.fulfill(response=response, json=body)

    await page.route("**/api/visitor-token", stale_rules)
    await open_chat(page, url(gw, "/chat/acme"))
    picker = page.locator("input[type=file]")
    notice = page.get_by_role("alert")
    await picker.set_input_files(
        files=[{"name": "scan.gif", "mimeType": "image/gif", "buffer": b"GIF89a"}]
    )
    await expect(notice).to_contain_text(
        "scan.gif: files of type image/gif are not accepted here (allowed: image/png)",
        timeout=WAIT,
    )
    await expect(page.locator(".cg-attachments")).to_be_hidden()
    await picker.set_input_files(
        files=[{"name": "big.png", "mimeType": "image/png", "buffer": bytes(2000)}]
    )
    await expect(notice).to_contain_text("big.png is larger than 1000 bytes", timeout=WAIT)
    await expect(page.get_by_role("button", name="Attach a file")).to_be_enabled()
    assert page.script_errors == []  # type: ignore[attr-defined]
    assert agent.calls == []
