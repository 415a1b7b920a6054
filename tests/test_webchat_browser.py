"""The chat page and the widget in a real browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Response, Route, expect

from tests import browser as shared
from tests.browser import GatedAgent, chromium, site, widget_host_page
from tests.conftest import tenant, url

pytestmark = pytest.mark.browser

WAIT = 15_000  # ms; generous, the machine is shared
#: Finished answers only: the typing indicator and a streaming answer are agent bubbles too.
AGENT = ".cg-messages .cg-agent:not(.cg-typing):not(.cg-streaming)"
USER = ".cg-messages .cg-user"
#: The gateway, the fake agents and the fake sites: the chat must never reach anything else.
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A chromium whose pages reach this machine only; a request elsewhere fails the test."""
    async with chromium() as running:
        running.foreign_requests = []  # type: ignore[attr-defined]
        yield running
        foreign = running.foreign_requests  # type: ignore[attr-defined]
    assert foreign == [], f"the page requested other hosts: {foreign}"


async def local_only(browser: Browser, context: BrowserContext) -> None:
    """Abort and record every request of `context` to a host other than this machine."""
    async def check(route: Route) -> None:
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
            await route.continue_()
        else:
            browser.foreign_requests.append(route.request.url)  # type: ignore[attr-defined]
            await route.abort()

    await context.route("**/*", check)


async def new_page(browser: Browser, *, phone: bool = False) -> Page:
    """tests.browser.new_page, with requests to other hosts refused and recorded."""
    page = await shared.new_page(browser, phone=phone)
    await local_only(browser, page.context)
    return page


def public(tenant_id: str, agent_url: str | None = None, **web: Any) -> dict[str, Any]:
    return tenant(tenant_id, agent_url, web={"public": True, **web})


async def open_chat(page: Page, address: str) -> None:
    await page.goto(address)
    await expect(page.locator(".cg-chat")).to_have_attribute("data-state", "ready", timeout=WAIT)


async def send(page: Page, text: str) -> None:
    """Type and press Enter once the previous answer is complete (the chat is ready)."""
    await expect(page.locator(".cg-chat")).to_have_attribute("data-state", "ready", timeout=WAIT)
    await page.locator("textarea").fill(text)
    await page.locator("textarea").press("Enter")


async def shot(page: Page, output_dir: Path, name: str) -> None:
    await page.screenshot(path=str(output_dir / f"webchat-{name}.png"))


async def test_enter_sends_and_the_reply_appears(browser, make_agent, make_gateway, output_dir):
    agent = await make_agent(prefix="")
    gw = await make_gateway({"tenants": [public(
        "acme", agent.url, title="Acme Support",
        welcome="Hi! I'm the Acme assistant. Ask me about orders, returns or shipping.")]})
    page = await new_page(browser)
    await open_chat(page, url(gw, "/chat/acme"))
    box = page.get_by_role("textbox", name="Message to Acme Support")
    await expect(box).to_be_focused()
    await expect(page.get_by_role("log")).to_have_attribute("aria-live", "polite")

    await box.fill("Where is my order #1042?")
    await box.press("Enter")
    await expect(page.locator(AGENT)).to_have_text("Acme Support: Where is my order #1042?",
                                                   timeout=WAIT)
    await expect(box).to_have_value("")
    await expect(box).to_be_focused()  # ready for the next message without reaching for the mouse

    # Shift+Enter makes a new line instead of sending.
    await box.press_sequentially("It was shipped to Berlin.")
    await box.press("Shift+Enter")
    await box.press_sequentially("Tracking: **DE-4471**, see https://track.example/DE-4471")
    await expect(box).to_have_value(
        "It was shipped to Berlin.\nTracking: **DE-4471**, see https://track.example/DE-4471")
    assert len(agent.calls) == 1
    await expect(page.locator(".cg-chat")).to_have_attribute("data-state", "ready")
    await box.press("Enter")
    await expect(page.locator(AGENT)).to_have_count(2, timeout=WAIT)
    assert agent.texts()[1] == (
        "It was shipped to Berlin.\nTracking: **DE-4471**, see https://track.example/DE-4471")
    last = page.locator(AGENT).last
    await expect(last.locator("strong")).to_have_text("DE-4471")
    await expect(last.locator("a")).to_have_attribute("href", "https://track.example/DE-4471")
    await expect(page.locator(USER)).to_have_count(2)
    assert page.script_errors == []
    await shot(page, output_dir, "desktop")

    phone = await new_page(browser, phone=True)
    key, value = json.dumps(await storage_key(page)), json.dumps(await storage_value(page))
    await phone.context.add_init_script(f"localStorage.setItem({key}, {value})")
    await open_chat(phone, url(gw, "/chat/acme"))
    await expect(phone.locator(AGENT)).to_have_count(2, timeout=WAIT)
    await shot(phone, output_dir, "phone")


async def storage_key(page: Page) -> str:
    return await page.evaluate("Object.keys(localStorage).find(k => k.startsWith('chatgateway:'))")


async def storage_value(page: Page) -> str:
    return await page.evaluate(
        "localStorage.getItem(Object.keys(localStorage).find(k => k.startsWith('chatgateway:')))")


async def test_no_sideways_scrolling_at_320px(browser, make_agent, make_gateway, output_dir):
    """The smallest phones in use are 320 CSS px wide: nothing may stick out sideways."""
    agent = await make_agent(prefix="")
    gw = await make_gateway({"tenants": [public(
        "acme", agent.url, title="Acme Support for Very Long Company Names Incorporated",
        welcome="Hi! Ask me anything: https://support.acme.example/a/very/long/path/to/the/faq")]})
    context = await browser.new_context(viewport={"width": 320, "height": 640},
                                        device_scale_factor=2, is_mobile=True, has_touch=True)
    await local_only(browser, context)
    page = await context.new_page()
    await open_chat(page, url(gw, "/chat/acme"))
    await send(page, "x" * 300)  # one unbreakable word, echoed back by the agent
    await expect(page.locator(AGENT)).to_have_count(1, timeout=WAIT)
    await send(page, "`" + "y" * 200 + "` and https://track.example/" + "z" * 200)
    await expect(page.locator(AGENT)).to_have_count(2, timeout=WAIT)
    scroll_width, inner_width, log_overflow = await page.evaluate(
        """[document.documentElement.scrollWidth, window.innerWidth,
            document.querySelector('.cg-log').scrollWidth
              - document.querySelector('.cg-log').clientWidth]""")
    # A phone zooms out to fit a page that is too wide: then innerWidth grows past 320.
    assert inner_width == 320
    assert scroll_width <= inner_width, f"the page scrolls sideways ({scroll_width} px)"
    assert log_overflow <= 0, "the conversation scrolls sideways"
    await shot(page, output_dir, "320px")


async def test_streaming_reply_grows_in_place(browser, make_gateway, output_dir):
    agent = await GatedAgent(["Once upon a time, ", "a gateway ", "streamed its answers."]).start()
    try:
        gw = await make_gateway({"tenants": [public("default", agent.url, title="Storyteller")]})
        page = await new_page(browser)
        await open_chat(page, url(gw, "/"))
        await send(page, "Tell me a story")

        # Before the agent says anything: a typing indicator, announced to screen readers.
        typing = page.locator(".cg-messages .cg-typing")
        await expect(typing).to_be_visible(timeout=WAIT)
        await expect(typing).to_contain_text("Storyteller is typing")
        await expect(page.get_by_role("log")).to_have_attribute("aria-busy", "true")
        await shot(page, output_dir, "typing")

        agent.gates[0].set()
        reply = page.locator(".cg-messages .cg-agent")  # the indicator becomes the answer
        await expect(reply).to_contain_text("Once upon a time,", timeout=WAIT)
        await expect(reply).to_have_class("cg-msg cg-agent cg-streaming")
        await expect(reply).not_to_contain_text("streamed")
        agent.gates[1].set()
        await expect(reply).to_contain_text("Once upon a time, a gateway", timeout=WAIT)
        await expect(reply).not_to_contain_text("streamed")
        await shot(page, output_dir, "streaming")
        agent.gates[2].set()
        await expect(reply).to_have_text(
            "Storyteller: Once upon a time, a gateway streamed its answers.", timeout=WAIT)
        await expect(reply).to_have_class("cg-msg cg-agent")
        await expect(page.get_by_role("log")).to_have_attribute("aria-busy", "false")
        await expect(page.locator(".cg-typing")).to_have_count(0)
        assert page.script_errors == []
    finally:
        await agent.stop()


async def test_reload_restores_and_new_conversation_starts_fresh(browser, make_agent,
                                                                 make_gateway):
    agent = await make_agent()
    gw = await make_gateway({"tenants": [public("acme", agent.url)]})
    page = await new_page(browser)
    await open_chat(page, url(gw, "/chat/acme"))
    await send(page, "first question")
    await expect(page.locator(AGENT)).to_have_count(1, timeout=WAIT)
    await send(page, "second question")
    await expect(page.locator(AGENT)).to_have_count(2, timeout=WAIT)
    first_session = agent.calls[0].body["sessionId"]
    assert agent.calls[1].body["sessionId"] == first_session

    await page.reload()
    await expect(page.locator(".cg-chat")).to_have_attribute("data-state", "ready", timeout=WAIT)
    await expect(page.locator(".cg-messages .cg-bubble")).to_have_text(
        ["first question", "agent: first question", "second question", "agent: second question"])

    # WCAG 2.5.3: the accessible name contains the visible label "New chat".
    new_chat = page.get_by_role("button", name="New chat: start a new conversation", exact=True)
    await expect(new_chat).to_contain_text("New chat")
    await new_chat.click()
    await expect(page.locator(".cg-messages .cg-msg")).to_have_count(0)
    await expect(page.get_by_role("textbox")).to_be_focused()
    await expect(page.get_by_role("status")).to_have_text("Started a new conversation.")
    await send(page, "another topic")
    await expect(page.locator(AGENT)).to_have_text("Acme: agent: another topic", timeout=WAIT)
    assert agent.calls[2].body["sessionId"] != first_session
    assert [turn["text"] for turn in agent.calls[2].body["history"]] == []

    await page.reload()
    await expect(page.locator(".cg-messages .cg-bubble")).to_have_text(
        ["another topic", "agent: another topic"], timeout=WAIT)


async def test_failing_agent_shows_the_fallback_text(browser, make_agent, make_gateway):
    agent = await make_agent(status=500)
    gw = await make_gateway({"tenants": [tenant(
        "acme", agent.url, web={"public": True},
        agent={"retry": {"attempts": 1},
               "fallback_text": "Our assistant is taking a break. Please try again soon."})]})
    page = await new_page(browser)
    await open_chat(page, url(gw, "/chat/acme"))
    await send(page, "hello?")
    reply = page.locator(AGENT)
    await expect(reply).to_have_text(
        "Acme: Our assistant is taking a break. Please try again soon.", timeout=WAIT)
    await expect(reply).to_have_class("cg-msg cg-agent cg-fallback")
    await expect(page.locator(".cg-notice")).to_be_hidden()
    assert len(agent.calls) == 1


async def test_widget_on_allowed_and_disallowed_sites(browser, make_agent, make_gateway,
                                                      output_dir):
    agent = await make_agent(prefix="Shop bot: ")
    async with site() as allowed, site() as other:
        gw = await make_gateway({"tenants": [public(
            "shop", agent.url, title="Clay & Co", accent_color="#b45309",
            welcome="Hello! Ask me about glazes, delivery or returns.",
            allowed_origins=[allowed.origin])]})
        allowed.html = widget_host_page(url(gw, ""), "shop", "Clay & Co")
        other.html = widget_host_page(url(gw, ""), "shop", "Copycat shop")

        page = await new_page(browser)
        await page.goto(allowed.origin)
        launcher = page.get_by_role("button", name="Open chat with Clay & Co")
        await expect(launcher).to_be_visible(timeout=WAIT)
        await expect(launcher).to_have_attribute("aria-expanded", "false")
        await launcher.click()
        dialog = page.get_by_role("dialog", name="Chat with Clay & Co")
        await expect(dialog).to_be_visible()
        box = dialog.get_by_role("textbox")
        await expect(box).to_be_focused(timeout=WAIT)
        await box.fill("Do you ship to Norway?")
        await box.press("Enter")
        await expect(dialog.locator(AGENT)).to_have_text(
            "Clay & Co: Shop bot: Do you ship to Norway?", timeout=WAIT)
        assert agent.calls[0].body["tenant"] == "shop"
        assert agent.calls[0].body["user"]["id"].startswith("v_")
        # The host page's CSS (red 30px text) does not leak into the widget.
        size = await dialog.locator(".cg-user .cg-bubble").evaluate(
            "e => getComputedStyle(e).fontSize")
        assert size == "15px"
        await shot(page, output_dir, "widget-desktop")

        # Escape closes the panel and gives focus back to the launcher.
        await box.press("Escape")
        await expect(dialog).to_be_hidden()
        await expect(launcher).to_be_focused()
        assert await page.evaluate("chatEvents.map(e => e[0])") == ["ready"]

        # The conversation survives a reload of the host page.
        await page.reload()
        await page.get_by_role("button", name="Open chat with Clay & Co").click()
        await expect(page.locator(AGENT)).to_have_count(1, timeout=WAIT)

        phone = await new_page(browser, phone=True)
        await phone.goto(allowed.origin)
        await phone.get_by_role("button", name="Open chat with Clay & Co").click()
        await expect(phone.get_by_role("dialog")).to_be_visible(timeout=WAIT)
        await expect(phone.locator(".cg-welcome")).to_be_visible(timeout=WAIT)
        await shot(phone, output_dir, "widget-phone")

        # Another site embedding the same tenant's widget is refused.
        stranger = await new_page(browser)
        await stranger.goto(other.origin)
        await stranger.wait_for_function("chatEvents.length > 0", timeout=WAIT)
        events = await stranger.evaluate("chatEvents")
        assert [e[0] for e in events] == ["error"]
        await expect(stranger.locator("chatgateway-widget")).to_have_count(0)
        assert len(agent.calls) == 1


async def test_widget_for_a_signed_in_user_of_a_private_tenant(browser, make_agent, make_gateway,
                                                               http):
    """A tenant without public chat mints a token for its user; the widget starts from it."""
    agent = await make_agent()
    async with site() as shop:
        gw = await make_gateway({"tenants": [tenant(
            "members", agent.url, keys=["members-key-0123456789"],
            web={"allowed_origins": [shop.origin]})]})
        async with http.post(url(gw, "/api/visitor-token"), json={"userId": "member-7"},
                             headers={"Authorization": "Bearer members-key-0123456789"}) as resp:
            assert resp.status == 200
            minted = (await resp.json())["token"]
        page_html = widget_host_page(url(gw, ""), "members", "Members area")
        shop.html = page_html.replace('data-tenant="members"',
                                      f'data-tenant="members" data-token="{minted}"')
        page = await new_page(browser)
        await page.goto(shop.origin)
        await page.get_by_role("button", name="Open chat with Members").click()
        await send(page, "am I signed in?")
        await expect(page.locator(AGENT)).to_have_count(1, timeout=WAIT)
        assert agent.calls[0].body["user"]["id"] == "member-7"

        # Signed out: the site gives no token, so the member's conversation is not reused.
        shop.html = page_html
        await page.reload()
        await page.wait_for_function("chatEvents.length > 0", timeout=WAIT)
        assert [e[0] for e in await page.evaluate("chatEvents")] == ["error"]
        await expect(page.locator("chatgateway-widget")).to_have_count(0)
        stored = await page.evaluate("JSON.stringify(localStorage)")
        assert "member-7" not in stored and "cgv1." not in stored


async def test_a_token_of_another_tenant_is_replaced(browser, make_agent, make_gateway):
    """The page of tenant b refuses a stored token of tenant a and starts a fresh visitor."""
    agent = await make_agent()
    gw = await make_gateway({"tenants": [public("a", agent.url), public("b", agent.url)]})
    page = await new_page(browser)
    await open_chat(page, url(gw, "/chat/a"))
    await send(page, "secret of a")
    await expect(page.locator(AGENT)).to_have_count(1, timeout=WAIT)
    a_key = await storage_key(page)
    a_state = json.loads(await storage_value(page))
    # Plant a's token and session where b's page keeps its own.
    b_key = a_key[: -len(":a")] + ":b"
    await page.evaluate("([k, v]) => localStorage.setItem(k, v)", [b_key, json.dumps(a_state)])
    await open_chat(page, url(gw, "/chat/b"))
    await expect(page.locator(".cg-messages .cg-msg")).to_have_count(0)
    b_state = json.loads(await page.evaluate("k => localStorage.getItem(k)", b_key))
    assert b_state["token"].startswith("cgv1.p.b.")
    assert b_state["userId"] != a_state["userId"]
    assert "sessionId" not in b_state
    await send(page, "hello b")
    await expect(page.locator(AGENT)).to_have_count(1, timeout=WAIT)
    assert agent.calls[-1].body["tenant"] == "b"
    assert agent.calls[-1].body["history"] == []


async def stored_state(page: Page) -> dict[str, Any]:
    return json.loads(await storage_value(page))


async def plant_state(page: Page, key: str, state: dict[str, Any]) -> None:
    """Overwrite the page's stored chat state, as a visitor with devtools (or a script) could."""
    await page.evaluate("([k, v]) => localStorage.setItem(k, v)", [key, json.dumps(state)])


async def visitor_who_said(
    browser: Browser, address: str, text: str
) -> tuple[Page, dict[str, Any]]:
    """A new visitor's page at `address` after one message and its answer, and its stored state."""
    page = await new_page(browser)
    await open_chat(page, address)
    await send(page, text)
    await expect(page.locator(AGENT)).to_have_count(1, timeout=WAIT)
    return page, await stored_state(page)


async def page_text(page: Page) -> str:
    """All text in the document, hidden parts too (a leak into a hidden node is still a leak)."""
    return await page.evaluate("document.documentElement.textContent")


async def test_a_visitor_cannot_open_another_visitors_session(browser, make_agent, make_gateway,
                                                              output_dir):
    """Visitor a's page, told to show visitor b's session, gets 404 and starts a clean chat."""
    agent = await make_agent()
    gw = await make_gateway({"tenants": [public("acme", agent.url)]})
    secret = "My locker code is 7391, keep it between us"
    bob, bob_state = await visitor_who_said(browser, url(gw, "/chat/acme"), secret)
    bob_session = bob_state["sessionId"]

    alice = await new_page(browser)
    await open_chat(alice, url(gw, "/chat/acme"))
    await send(alice, "Where is my parcel?")
    await expect(alice.locator(AGENT)).to_have_count(1, timeout=WAIT)
    alice_key, alice_state = await storage_key(alice), await stored_state(alice)
    assert alice_state["userId"] != bob_state["userId"]
    assert alice_state["sessionId"] != bob_session

    # Alice's own valid token, but Bob's session id: only the server can say no.
    await plant_state(alice, alice_key, {**alice_state, "sessionId": bob_session})
    responses: list[Response] = []
    alice.on("response", lambda r: responses.append(r))
    bob_path = urlsplit(url(gw, f"/api/sessions/{bob_session}")).path
    async with alice.expect_response(
            lambda r: urlsplit(r.url).path == bob_path and r.request.method == "GET",
            timeout=WAIT) as asked:
        await alice.reload()
    refused = await asked.value
    assert refused.status == 404
    assert (await refused.json())["error"]["code"] == "not_found"
    await expect(alice.locator(".cg-chat")).to_have_attribute("data-state", "ready", timeout=WAIT)
    await expect(alice.locator(".cg-messages .cg-msg")).to_have_count(0)
    await expect(alice.locator(".cg-notice")).to_be_hidden()
    assert secret not in await page_text(alice)
    after = await stored_state(alice)
    assert after["userId"] == alice_state["userId"]
    assert "sessionId" not in after  # the page forgot the session it may not see

    # The page still works: Alice chats on, in a session of her own.
    await send(alice, "Are you still there?")
    await expect(alice.locator(AGENT)).to_have_text("Acme: agent: Are you still there?",
                                                    timeout=WAIT)
    last = agent.calls[-1].body
    assert last["user"]["id"] == alice_state["userId"]
    assert last["sessionId"] not in (bob_session, None)
    assert all(secret not in turn["text"] for turn in last["history"])
    assert secret not in await page_text(alice)
    assert [r.status for r in responses if urlsplit(r.url).path == bob_path] == [404]
    assert alice.script_errors == []
    await shot(alice, output_dir, "foreign-session-refused")

    # Bob's conversation is untouched by Alice's attempt.
    await bob.reload()
    await expect(bob.locator(".cg-messages .cg-bubble")).to_have_text(
        [secret, f"agent: {secret}"], timeout=WAIT)


async def test_tenant_b_refuses_a_visitor_token_of_tenant_a(browser, make_agent, make_gateway,
                                                            output_dir):
    """Tenant b's page answers a planted token of tenant a with 401 and a visitor of its own."""
    agent = await make_agent()
    gw = await make_gateway({"tenants": [public("a", agent.url), public("b", agent.url)]})
    secret = "Tenant a's order 5521 goes to Hauptstrasse 9"
    _, a_state = await visitor_who_said(browser, url(gw, "/chat/a"), secret)
    assert a_state["token"].startswith("cgv1.p.a.") and a_state["sessionId"]

    page_b = await new_page(browser)
    await open_chat(page_b, url(gw, "/chat/b"))
    b_key, b_first = await storage_key(page_b), await stored_state(page_b)
    assert b_key.endswith(":b")
    # All of a's state, token and session, where b's page keeps its own.
    await plant_state(page_b, b_key, a_state)
    responses: list[Response] = []
    page_b.on("response", lambda r: responses.append(r))
    token_path = urlsplit(url(gw, "/api/visitor-token")).path
    a_bearer = f"Bearer {a_state['token']}"
    async with page_b.expect_response(
            lambda r: urlsplit(r.url).path == token_path
            and r.request.headers.get("authorization") == a_bearer,
            timeout=WAIT) as presented:
        await page_b.reload()
    refused = await presented.value
    assert refused.status == 401
    assert (await refused.json())["error"]["code"] == "unauthorized"
    await expect(page_b.locator(".cg-chat")).to_have_attribute("data-state", "ready",
                                                               timeout=WAIT)
    await expect(page_b.locator(".cg-messages .cg-msg")).to_have_count(0)

    # The refusal was followed by a fresh token of b, asked for without a credential.
    token_calls = [r for r in responses if urlsplit(r.url).path == token_path]
    assert [r.status for r in token_calls] == [401, 200]
    assert "authorization" not in await token_calls[1].request.all_headers()
    fresh = await token_calls[1].json()
    b_state = await stored_state(page_b)
    assert fresh["tenantId"] == "b" and b_state["token"] == fresh["token"]
    assert b_state["token"].startswith("cgv1.p.b.")
    assert b_state["token"] not in (a_state["token"], b_first["token"])
    assert b_state["userId"] not in (a_state["userId"], b_first["userId"])
    assert "sessionId" not in b_state
    # a's session was never even asked for, and nothing of a's conversation is shown.
    assert not [r for r in responses if a_state["sessionId"] in r.url]
    assert secret not in await page_text(page_b)

    await send(page_b, "hello b")
    await expect(page_b.locator(AGENT)).to_have_text("B: agent: hello b", timeout=WAIT)
    last = agent.calls[-1].body
    assert (last["tenant"], last["user"]["id"], last["history"]) == ("b", b_state["userId"], [])
    assert last["sessionId"] != a_state["sessionId"]
    assert secret not in await page_text(page_b)
    assert page_b.script_errors == []
    await shot(page_b, output_dir, "foreign-tenant-token-refused")
