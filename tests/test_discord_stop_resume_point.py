"""A Discord message that arrives while the adapter is stopping is left for the bot's next owner.

It is not answered here (the adapter is leaving), and discord.py has already counted it in the
gateway sequence, so the resume point the adapter saves with its lease must stay before it: else
the next owner's RESUME starts after it and nobody ever answers it. Driven through real
discord.py against the fake Discord: the adapter stops while its gateway connection is being
resumed (a connection it began before the stop), the RESUME replays a message, an answer in
flight finishes, and a second adapter resumes from what the first one saved.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from discord.gateway import KeepAliveHandler

from adapters.discord.adapter import DiscordAdapter
from chatgateway.config import DiscordBotConfig
from chatgateway.models import TenantId
from chatgateway.testing.agent import AgentCall, FakeAgent
from tests.conftest import tenant
from tests.fakes.discord import FakeBot, Posted, user_object
from tests.fakes.discord_interactions import FakeDiscordRich

ALICE = user_object("1001", "alice")


class HeldResumeDiscord(FakeDiscordRich):
    """The fake Discord (with buttons and clicks), able to hold a connection to the resume URL
    before its handshake."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        if request.path == "/resume" and self.hold is not None:
            self.held.set()
            await self.hold.wait()
        return await super()._gateway(request)


@pytest.fixture
async def fake() -> AsyncIterator[HeldResumeDiscord]:
    server = HeldResumeDiscord()
    await server.start()
    yield server
    await server.stop()


async def behaviour(call: AgentCall) -> web.StreamResponse:
    """The agent: takes a second over "early question", answers "pick" with a button."""
    text = call.body["message"]["text"]
    if text == "early question":
        await asyncio.sleep(1.0)
    if text == "pick":
        return web.json_response({"response": "Pick one", "actions": [
            {"label": "Yes", "value": "yes"}]})
    return web.json_response({"response": f"agent: {text}"})


#: Sends the late event to the bot's session; returns the id the answer replies to and the
#: text the agent is given.
SendLate = Callable[[], Awaitable[tuple[str, str]]]


async def left_while_stopping(
    fake: HeldResumeDiscord,
    agent: FakeAgent,
    daemon: Any,
    bot: FakeBot,
    send_late: SendLate,
    prepare: Callable[[], Awaitable[int]] | None = None,
) -> None:
    """Run the scenario: the late event reaches the first adapter while it stops, and the next
    owner, resuming from what the first one saved, answers it. `prepare` runs once the first
    adapter is connected (what the late event needs) and says how many answers it posted."""
    assert daemon.pipeline is not None
    settings = DiscordBotConfig.model_validate(fake.bot_settings(bot))
    saved: list[dict[str, Any]] = []

    first = DiscordAdapter(TenantId("acme"), settings, daemon.pipeline)
    first.hand_over(None, lambda data, now: saved.append(data))  # as a lease would keep it
    running = asyncio.create_task(first.run())
    session = await fake.wait_ready(bot)
    answered_before = await prepare() if prepare is not None else 0
    calls = len(agent.calls)

    # An answer in flight (the agent takes a second).
    early = await fake.message_create(bot, "early question", author=ALICE)
    await agent.wait_calls(calls + 1)

    # The connection drops (resumable); the reconnect's handshake is held by the fake.
    fake.hold = asyncio.Event()
    await fake.close(bot, 4000)
    await fake.held.wait()
    # An event sent meanwhile: Discord replays it on RESUME.
    late_id, late_text = await send_late()
    late_seq = session.seq

    # The adapter begins to stop (a hand-over); then the held connection completes and its
    # RESUME delivers the late event to the stopping adapter, which leaves it.
    stopping = asyncio.create_task(first.stop())
    await asyncio.sleep(0.1)
    fake.hold.set()
    await fake.wait_for(lambda: session.seq > late_seq)  # RESUMED: the late event went out
    await asyncio.wait_for(stopping, 15)
    await asyncio.wait_for(running, 15)

    # The early message was answered here, the late event not.
    posts = fake.posts(bot.token)
    assert len(posts) == answered_before + 1
    assert posts[-1].reference is not None and posts[-1].reference["message_id"] == early["id"]
    assert late_text not in agent.texts()
    # The saved resume point stays before the late event (the early answer finished after it).
    assert saved and saved[-1]["session_id"] == session.id
    assert saved[-1]["seq"] < late_seq
    # And the session was left resumable (closed with 4000; 1000 would end it at Discord).
    last = [c for c in fake.connections if c.session is session][-1]
    assert last.ws.close_code == 4000

    # The next owner resumes from what was saved: Discord replays the late event to it.
    fake.hold = None
    second = DiscordAdapter(TenantId("acme"), settings, daemon.pipeline)
    second.hand_over(saved[-1], lambda data, now: None)
    running = asyncio.create_task(second.run())
    try:
        posts = await fake.wait_posts(answered_before + 2, token=bot.token, within=15)
        answer = posts[answered_before + 1]
        assert answer.reference is not None and answer.reference["message_id"] == late_id
        assert answer.content == f"agent: {late_text}"
        assert agent.texts().count(late_text) == 1
        assert agent.texts().count("early question") == 1
        assert len(fake.ops(2, bot.token)) == 1, "resumed, never identified again"
        # Nothing else is answered (the early message, replayed too, is a duplicate).
        await asyncio.sleep(0.5)
        assert len(fake.posts(bot.token)) == answered_before + 2
    finally:
        await second.stop()
        await asyncio.wait_for(running, 15)
    # No heartbeat thread outlives the adapters (one of the socket a resume replaced did).
    for _ in range(40):
        if not any(isinstance(t, KeepAliveHandler) for t in threading.enumerate()):
            break
        await asyncio.sleep(0.05)
    assert not any(isinstance(t, KeepAliveHandler) for t in threading.enumerate())


async def test_a_message_arriving_while_stopping_is_replayed_to_the_next_owner(
    fake: HeldResumeDiscord, make_agent, make_gateway
):
    agent = await make_agent(behaviour=behaviour)
    bot = fake.add_bot("acmebot")
    daemon = await make_gateway({"tenants": [tenant("acme", agent.url)]})

    async def send_late() -> tuple[str, str]:
        late = await fake.message_create(bot, "late question", author=ALICE)
        return late["id"], "late question"

    await left_while_stopping(fake, agent, daemon, bot, send_late)


async def test_a_click_arriving_while_stopping_is_replayed_to_the_next_owner(
    fake: HeldResumeDiscord, make_agent, make_gateway
):
    agent = await make_agent(behaviour=behaviour)
    bot = fake.add_bot("acmebot")
    daemon = await make_gateway({"tenants": [tenant("acme", agent.url)]})
    asked: list[Posted] = []

    async def send_late() -> tuple[str, str]:
        [post] = asked
        button = fake.buttons_of(post)[0]["custom_id"]
        await fake.click(bot, post, button, user=ALICE)
        return post.message["id"], "yes"

    async def ask_first() -> int:
        await fake.message_create(bot, "pick", author=ALICE)
        [post] = await fake.wait_posts(1, token=bot.token)
        await fake.wait_for(lambda: fake.buttons_of(post))
        asked.append(post)
        return 1

    await left_while_stopping(fake, agent, daemon, bot, send_late, ask_first)
