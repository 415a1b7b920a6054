"""Streamed answers in Slack and Discord: how soon the first words are visible after the agent's
first delta, and how many platform calls an answer of 2,000 characters streamed over 10 s costs.

The agent runs in this process (so its first delta and the fake's record of the first visible
words are on one clock); the gateway is the real daemon in its own process.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from bench.procs import start_gateway
from bench.web import UNLIMITED
from tests.fakes.discord import FakeDiscord, user_object
from tests.fakes.slack import FakeSlack

HEADER = ["platform", "answers", "first words after first delta p50 / p95", "target",
          "calls per answer (max)", "target"]
ANSWER = 2000  # characters
DURATION = 10.0  # seconds the agent takes to stream them
DELTAS = 50


class StreamingAgent:
    """Answers every message with ANSWER characters in DELTAS deltas spread over `duration`,
    noting when it wrote the first one for each conversation."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.first_delta: dict[str, float] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    @staticmethod
    def answer() -> str:
        words = (f"word{n:03d}" for n in range(ANSWER))
        text = ""
        for word in words:
            if len(text) + len(word) + 1 > ANSWER:
                break
            text += word + " "
        return text.ljust(ANSWER, ".")

    async def start(self) -> StreamingAgent:
        app = web.Application()
        app.router.add_post("/agent", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/agent"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        conversation = str(body["conversation"]["id"])
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        text = self.answer()
        size = len(text) // DELTAS
        for n in range(DELTAS):
            piece = text[n * size:] if n == DELTAS - 1 else text[n * size:(n + 1) * size]
            await response.write(json.dumps({"delta": piece}).encode() + b"\n")
            if n == 0:
                self.first_delta[conversation] = time.monotonic()
            if n < DELTAS - 1:
                await asyncio.sleep(self.duration / (DELTAS - 1))
        await response.write_eof()
        return response


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


async def _watch(first_visible: Callable[[], dict[str, float]], conversations: list[str],
                 seen: dict[str, float], until: float) -> None:
    """Poll the fake (same loop) every 5 ms, noting when each conversation first showed words."""
    while time.monotonic() < until and len(seen) < len(conversations):
        now = time.monotonic()
        for conversation in first_visible():
            seen.setdefault(conversation, now)
        await asyncio.sleep(0.005)


def _row(platform: str, agent: StreamingAgent, seen: dict[str, float],
         calls: dict[str, int], conversations: list[str], finals_ok: int) -> list[str]:
    delays = [(seen[c] - agent.first_delta[c]) * 1000 for c in conversations
              if c in seen and c in agent.first_delta]
    return [
        platform, f"{finals_ok}/{len(conversations)} exact",
        f"{_pct(delays, 0.5):.0f} / {_pct(delays, 0.95):.0f} ms", "p95 <= 300 ms",
        str(max(calls.values(), default=0)), "<= 15",
    ]


async def run_discord(workdir: Path, answers: int, duration: float) -> list[str]:
    fake = await FakeDiscord(echo_own_messages=False).start()
    bot = fake.add_bot("streambot")
    agent = await StreamingAgent(duration).start()
    gateway = None
    try:
        gateway, _, _ = start_gateway(workdir, {
            "storage": {"path": str(workdir / "discord.db")},
            "tenants": [{"id": "bench", "agent": {"url": agent.url}, "limits": UNLIMITED,
                         "web": {"enabled": False},
                         "discord": {"bots": [fake.bot_settings(bot, typing_indicator=False)]}}],
        }, name="discord-stream")
        await fake.wait_ready(bot, 60)
        channels = [str(710000 + i) for i in range(answers)]
        seen: dict[str, float] = {}
        watcher = asyncio.create_task(_watch(
            lambda: {p.channel_id for p in fake.posted}, channels, seen,
            time.monotonic() + duration + 30))
        for i, channel in enumerate(channels):
            await fake.message_create(bot, f"tell me {i}", channel_id=channel,
                                      author=user_object(str(510000 + i), f"u{i}"))
        expected = agent.answer()
        deadline = time.monotonic() + duration + 30

        def final_ok(channel: str) -> bool:
            return "".join(p.text for p in fake.posted if p.channel_id == channel) == expected

        try:
            await fake.wait_for(lambda: all(final_ok(c) for c in channels),
                                within=deadline - time.monotonic())
        except TimeoutError:
            pass  # reported: fewer exact finals
        await watcher
        calls = {c: len([p for p in fake.posted if p.channel_id == c])
                 + len([e for e in fake.edits if e.channel_id == c]) for c in channels}
        return _row("discord", agent, seen, calls, channels, sum(map(final_ok, channels)))
    finally:
        if gateway is not None:
            gateway.stop()
        await agent.stop()
        await fake.stop()


SLACK_CALLS = ("chat.postMessage", "chat.update", "chat.startStream", "chat.appendStream",
               "chat.stopStream")


async def run_slack(workdir: Path, answers: int, duration: float, *, refuse: bool) -> list[str]:
    fake = await FakeSlack(echo_own_messages=False, max_retries=0).start()
    app = fake.add_app("streamapp")
    if refuse:  # the workspace refuses the streaming methods: posted, then chat.update'd
        app.refuse_streaming = "unknown_method"
    agent = await StreamingAgent(duration).start()
    gateway = None

    def shown(channel: str) -> str:
        streamed = [m.text for m in fake.streams_in(channel)]
        posted = [p.edits[-1][1] if p.edits else p.text for p in fake.posted
                  if p.channel == channel]
        return "".join(streamed + posted)

    try:
        gateway, _, _ = start_gateway(workdir, {
            "storage": {"path": str(workdir / f"slack-{refuse}.db")},
            "tenants": [{"id": "bench", "agent": {"url": agent.url}, "limits": UNLIMITED,
                         "web": {"enabled": False},
                         "slack": {"apps": [app.config(fake, working_indicator="none")]}}],
        }, name=f"slack-stream-{refuse}")
        await fake.wait_connected(app, within=60)
        users = [f"U{520000 + i}" for i in range(answers)]
        channels = [f"D{u}" for u in users]
        seen: dict[str, float] = {}
        watcher = asyncio.create_task(_watch(
            lambda: {c for c in channels if shown(c)}, channels, seen,
            time.monotonic() + duration + 30))
        for i, user in enumerate(users):
            await fake.dm(app, user, f"tell me {i}", channel=f"D{user}")
        expected = StreamingAgent.answer()
        deadline = time.monotonic() + duration + 30

        def final_ok(channel: str) -> bool:
            return shown(channel) == expected

        try:
            await fake.wait_for(lambda: all(final_ok(c) for c in channels),
                                within=deadline - time.monotonic())
        except TimeoutError:
            pass  # reported: fewer exact finals
        await watcher
        calls = {c: len([k for k in fake.calls if k.method in SLACK_CALLS
                         and k.params.get("channel") == c]) for c in channels}
        name = "slack (chat.update fallback)" if refuse else "slack (chat streaming)"
        return _row(name, agent, seen, calls, channels, sum(map(final_ok, channels)))
    finally:
        if gateway is not None:
            gateway.stop()
        await agent.stop()
        await fake.stop()


def run(workdir: Path, answers: int, duration: float = DURATION) -> list[list[str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    for name, work in (
        ("slack", lambda: run_slack(workdir, answers, duration, refuse=False)),
        ("slack-fallback", lambda: run_slack(workdir, answers, duration, refuse=True)),
        ("discord", lambda: run_discord(workdir, answers, duration)),
    ):
        try:
            rows.append(asyncio.run(work()))
        except Exception as exc:  # one platform's failure must not hide the others' figures
            rows.append([name, f"failed: {type(exc).__name__}: {exc}", "", "", "", ""])
    return rows
