"""Discord answers shown as the agent writes them: real discord.py in an in-process daemon
against the fake Discord, with a loopback agent streaming NDJSON deltas slowly."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from adapters.discord import adapter as discord_adapter
from adapters.discord.adapter import DiscordAdapter
from adapters.discord.convert import MAX_MESSAGE_LENGTH, reply_nonce, split_message
from chatgateway.daemon import Daemon
from chatgateway.models import Platform
from chatgateway.outbound import Address
from tests.conftest import tenant
from tests.fakes.discord import FakeBot, FakeDiscord

CHANNEL = "2001"


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = await FakeDiscord().start()
    yield server
    await server.stop()


class StreamingAgent:
    """A loopback agent on 127.0.0.1:0 answering every call with NDJSON deltas: it waits
    `before`, writes `deltas` one every `pause` seconds, then holds the stream open until
    `release` is set (at once unless `hold`)."""

    def __init__(self, deltas: list[str], *, pause: float, before: float = 0.0,
                 hold: bool = False) -> None:
        self.deltas = deltas
        self.pause = pause
        self.before = before
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.written = asyncio.Event()
        self.finished = False
        #: When the first delta was written (time.monotonic()).
        self.first_delta_at: float | None = None
        self.calls: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    @property
    def answer(self) -> str:
        return "".join(self.deltas)

    async def start(self) -> StreamingAgent:
        app = web.Application()
        app.router.add_post("/agent", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/agent"
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(await request.json())
        assert "application/x-ndjson" in request.headers.get("Accept", "")
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await asyncio.sleep(self.before)
        self.first_delta_at = time.monotonic()
        for delta in self.deltas:
            await resp.write(json.dumps({"delta": delta}).encode() + b"\n")
            await asyncio.sleep(self.pause)
        self.written.set()
        await self.release.wait()
        self.finished = True
        await resp.write_eof()
        return resp


@pytest.fixture
async def make_streamer() -> AsyncIterator[Any]:
    agents: list[StreamingAgent] = []

    async def make(deltas: list[str], **kwargs: Any) -> StreamingAgent:
        agent = await StreamingAgent(deltas, **kwargs).start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.stop()


async def gateway_with_bot(fake: FakeDiscord, make_gateway: Any, agent_url: str) -> tuple[
        Daemon, FakeBot]:
    bot = fake.add_bot("acmebot")
    gw = await make_gateway({"tenants": [tenant("acme", agent_url,
                                                discord={"bots": [fake.bot_settings(bot)]})]})
    await fake.wait_ready(bot)
    return gw, bot


def the_adapter(gw: Daemon) -> DiscordAdapter:
    assert gw.supervisor is not None
    [found] = [a for a in gw.supervisor.adapters() if isinstance(a, DiscordAdapter)]
    return found


def words_of(text: str) -> list[str]:
    """The words of a text, with code fences (which splitting may add) left out."""
    return re.sub(r"```\w*", " ", text).split()


async def shows(fake: FakeDiscord, bot: FakeBot, texts: list[str], within: float = 20) -> None:
    await fake.wait_for(lambda: [p.text for p in fake.posts(bot.token)] == texts, within)


# End to end --------------------------------------------------------------------------------


async def test_words_appear_as_the_agent_writes_them_typing_until_then_edits_paced(
    fake, make_streamer, make_gateway, monkeypatch
):
    monkeypatch.setattr(discord_adapter, "TYPING_EVERY", 0.2)  # Discord's is 10 s; ours 8 s
    words = ["Refunds"] + [f" word{n}" for n in range(30)] + [" done."]
    streamer = await make_streamer(words, pause=0.1, before=1.0, hold=True)
    _, bot = await gateway_with_bot(fake, make_gateway, streamer.url)
    sent = await fake.message_create(bot, "refunds?", channel_id=CHANNEL)

    [first] = await fake.wait_posts(1, token=bot.token)
    assert not streamer.finished  # visible while the agent is still writing
    assert first.content.startswith("Refunds") and len(first.content) < len(streamer.answer)
    assert first.reference is not None and first.reference["message_id"] == sent["id"]
    assert first.nonce == reply_nonce(int(bot.user_id), sent["id"], 0)
    # Typing was shown (renewed) while the agent thought, and stopped with the first words.
    typing = [t for t in fake.typing if t.token == bot.token]
    assert len(typing) >= 3 and all(t.order < first.order for t in typing)

    await streamer.written.wait()
    await fake.wait_for(lambda: fake.edits_of(first.message["id"]))
    assert not streamer.finished
    streamer.release.set()
    await shows(fake, bot, [streamer.answer])
    assert [t for t in fake.typing if t.token == bot.token] == typing
    edits = fake.edits_of(first.message["id"])
    # At most about one edit a second while streaming (the final one is not paced): 3.2 s of
    # words make at most 4 paced edits, plus the final one.
    times = [e.at for e in edits[:-1]]
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(times)), times
    assert 2 <= len(edits) <= 5
    assert edits[-1].content == streamer.answer
    assert len(fake.posts(bot.token)) == 1
    assert streamer.calls[0]["message"]["text"] == "refunds?"


async def test_long_streamed_answer_continues_in_new_messages_without_cutting_words_or_code(
    fake, make_streamer, make_gateway
):
    prose = "".join(f"Paragraph line {i} explains one more detail of the answer.\n"
                    for i in range(28))
    code = "```python\n" + "".join(f"print('value number {i}')\n" for i in range(50)) + "```\n"
    tail = "".join(f"After the code, remark {i} follows here.\n" for i in range(30))
    answer = prose + code + tail
    # The code block straddles the 2,000-character limit: a plain cut would split it.
    assert answer.index("```") < MAX_MESSAGE_LENGTH < answer.rindex("```")
    assert len(code) < MAX_MESSAGE_LENGTH
    deltas = [answer[i:i + 45] for i in range(0, len(answer), 45)]  # cuts words and fences
    streamer = await make_streamer(deltas, pause=0.02)
    _, bot = await gateway_with_bot(fake, make_gateway, streamer.url)
    sent = await fake.message_create(bot, "explain", channel_id=CHANNEL)

    await shows(fake, bot, split_message(answer))
    posts = fake.posts(bot.token)
    assert len(posts) >= 2
    texts = [p.text for p in posts]
    assert all(len(t) <= MAX_MESSAGE_LENGTH for t in texts)
    assert all(t.count("```") % 2 == 0 for t in texts)
    assert any(code.strip() in t for t in texts)  # the block ended up whole in one message
    assert words_of("\n".join(texts)) == words_of(answer)  # no word cut, none lost
    # Every message, also those shown while the answer grew, rendered: fences balanced.
    shown = [p.content for p in posts] + [e.content for e in fake.edits]
    assert all(s.count("```") % 2 == 0 and len(s) <= MAX_MESSAGE_LENGTH for s in shown)
    assert posts[0].reference["message_id"] == sent["id"]
    assert all(p.reference is None for p in posts[1:])
    assert [p.nonce for p in posts] == [
        reply_nonce(int(bot.user_id), sent["id"], i) for i in range(len(posts))
    ]


async def test_a_2000_character_answer_streamed_over_10_seconds_costs_few_calls(
    fake, make_streamer, make_gateway
):
    sentence = "The quick brown fox jumps over the lazy dog again. "  # 51 characters
    answer = (sentence * 40)[:2000].rstrip()
    deltas = [answer[i:i + 20] for i in range(0, len(answer), 20)]  # 100 deltas, 0.1 s apart
    streamer = await make_streamer(deltas, pause=0.1)
    _, bot = await gateway_with_bot(fake, make_gateway, streamer.url)
    await fake.message_create(bot, "tell me", channel_id=CHANNEL)
    await shows(fake, bot, split_message(answer), within=30)
    calls = fake.calls(bot.token)
    assert streamer.first_delta_at is not None
    first_words = fake.posts(bot.token)[0].at - streamer.first_delta_at
    print(f"\ndiscord calls for 2,000 characters over 10 s: {calls} "
          f"({len(fake.posts(bot.token))} posts, {len(fake.edits)} edits); "
          f"first words visible {first_words * 1000:.0f} ms after the first delta")
    assert calls <= 15
    assert first_words < 1.0  # posted at once, not after the first edit interval
    assert len(streamer.calls) == 1


async def test_rate_limited_edits_are_waited_out_and_end_with_the_full_answer(
    fake, make_streamer, make_gateway
):
    streamer = await make_streamer(["First words", " and then", " some more", " at the end."], pause=0.4)
    _, bot = await gateway_with_bot(fake, make_gateway, streamer.url)
    fake.rate_limit_edits = 2
    await fake.message_create(bot, "go", channel_id=CHANNEL)
    await shows(fake, bot, [streamer.answer])
    assert fake.rate_limited_edits == 2  # discord.py waited retry_after and edited again
    assert len(fake.posts(bot.token)) == 1


async def test_a_non_streaming_agent_is_one_post(fake, make_agent, make_gateway):
    agent = await make_agent()
    _, bot = await gateway_with_bot(fake, make_gateway, agent.url)
    await fake.message_create(bot, "plain", channel_id=CHANNEL)
    await shows(fake, bot, ["agent: plain"])
    await agent.wait_calls(1)
    assert fake.edits == [] and len(fake.posts(bot.token)) == 1


# The outbound for answers that arrive later, and posting again ------------------------------


async def test_a_repeated_post_with_the_same_nonce_shows_the_answer_once(
    fake, make_agent, make_gateway
):
    agent = await make_agent()
    gw, bot = await gateway_with_bot(fake, make_gateway, agent.url)
    adapter = the_adapter(gw)
    asked = "1300000000000000001"
    address = Address(Platform.DISCORD, "acmebot",
                      {"channel_id": CHANNEL, "message_id": asked})
    answer = " ".join(f"word{n}" for n in range(700))  # 3 messages
    parts = split_message(answer)
    assert len(parts) == 3

    # A crash after the first words were posted ...
    first = adapter.outbound(address)
    assert first is not None and first.idempotent and first.address == address
    await first.append("word0 word1 wo")
    [post] = await fake.wait_posts(1, token=bot.token)
    assert post.text == "word0 word1 wo"
    assert post.reference is not None
    assert (post.reference["message_id"], post.reference["channel_id"]) == (asked, CHANNEL)
    assert post.nonce == reply_nonce(int(bot.user_id), asked, 0)
    # ... then the stored answer is posted again, possibly twice: the messages show it once.
    for _ in range(2):
        again = adapter.outbound(address)
        assert again is not None
        await again.post(answer)
        await shows(fake, bot, parts)
    assert len(fake.posts(bot.token)) == 3
    assert fake.nonce_hits == 4  # part 0 twice (edited the first time), parts 1 and 2 once
    assert [e.content for e in fake.edits] == [parts[0]]


async def test_outbound_only_for_its_own_bot_while_it_runs(fake, make_agent, make_gateway):
    agent = await make_agent()
    gw, bot = await gateway_with_bot(fake, make_gateway, agent.url)
    adapter = the_adapter(gw)
    target = {"channel_id": CHANNEL, "message_id": "1300000000000000002"}
    assert adapter.outbound(Address(Platform.DISCORD, "otherbot", target)) is None
    assert adapter.outbound(Address(Platform.SLACK, "acmebot", target)) is None
    assert adapter.outbound(Address(Platform.DISCORD, "acmebot", {"channel_id": "x"})) is None
    # Without a message to reply to: a plain message; discord.py gives it a random nonce, so
    # posting it again would post it twice (not idempotent).
    plain = adapter.outbound(Address(Platform.DISCORD, "acmebot", {"channel_id": CHANNEL}))
    assert plain is not None and not plain.idempotent
    await plain.post("later answer")
    [post] = await fake.wait_posts(1, token=bot.token)
    assert (post.text, post.reference) == ("later answer", None)
    await gw.stop()
    assert adapter.outbound(Address(Platform.DISCORD, "acmebot", target)) is None


# Splitting (pure) --------------------------------------------------------------------------


def test_split_every_prefix_renders_within_the_limit_with_balanced_fences() -> None:
    prose = "".join(f"Some words on line {i}, then a few more.\n" for i in range(40))
    code = "```js\n" + "".join(f"console.log({i});\n" for i in range(200)) + "```\n"
    text = prose + code + "The end."
    for end in range(1, len(text) + 1, 7):
        parts = split_message(text[:end])
        assert all(0 < len(p) <= MAX_MESSAGE_LENGTH for p in parts), end
        assert all(p.count("```") % 2 == 0 for p in parts), end
    parts = split_message(text)
    # The block longer than a message is closed and reopened with its language.
    code_parts = [p for p in parts if "console.log" in p]
    assert len(code_parts) >= 2
    assert all(p[p.index("```"):].startswith("```js\n") for p in code_parts)
    assert words_of("\n".join(parts)) == words_of(text)


def test_split_shows_a_code_block_still_open_as_closed() -> None:
    assert split_message("Look:\n```python\nprint(1)") == ["Look:\n```python\nprint(1)\n```"]
    assert split_message("Look:\n```python\nprint(1)\n") == ["Look:\n```python\nprint(1)\n```"]
    assert split_message("no code") == ["no code"]
    long_open = "x " * 900 + "\n```python\n" + "print(2)\n" * 30
    parts = split_message(long_open)
    assert all(len(p) <= MAX_MESSAGE_LENGTH and p.count("```") % 2 == 0 for p in parts)
    assert parts[-1].endswith("```")


def test_split_moves_a_code_block_that_fits_to_the_next_message_whole() -> None:
    code = "```\n" + "line of code\n" * 100 + "```"
    text = "a" * 1500 + "\n" + code + "\nafter"
    parts = split_message(text)
    assert parts == ["a" * 1500, code + "\nafter"]
    # While streaming, before its closing fence arrives, it is moved as well (shown closed).
    assert split_message(text[: text.rindex("```")]) == [
        "a" * 1500, code.removesuffix("```") + "```"
    ]


def test_split_never_cuts_a_word_of_a_long_paragraph() -> None:
    text = " ".join(f"w{n:04d}" for n in range(990))  # one line of 5,939 characters
    parts = split_message(text)
    assert len(parts) == 3
    assert all(len(p) <= MAX_MESSAGE_LENGTH for p in parts)
    assert words_of(" ".join(parts)) == text.split()
    assert all(re.fullmatch(r"w\d{4}", w) for p in parts for w in p.split())
