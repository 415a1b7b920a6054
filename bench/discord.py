"""Discord path: MESSAGE_CREATE through the fake gateway -> the reply POSTed to the fake REST."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.platform import paced
from bench.procs import start_gateway, start_server
from bench.web import UNLIMITED
from tests.fakes.discord import FakeDiscord, user_object


async def run(workdir: Path, rate: float, count: int) -> list[list[str]]:
    fake = await FakeDiscord(echo_own_messages=False).start()
    bot = fake.add_bot("benchbot")
    agent, agent_port = start_server("agent")
    gateway = None
    try:
        gateway, _, _ = start_gateway(workdir, {
            "storage": {"path": str(workdir / "discord.db")},
            "tenants": [{"id": "bench", "agent": {"url": f"http://127.0.0.1:{agent_port}/agent"},
                         "limits": UNLIMITED, "web": {"enabled": False},
                         "discord": {"bots": [fake.bot_settings(bot, typing_indicator=False)]}}],
        }, name="discord")
        await fake.wait_ready(bot, 60)
        answered: dict[str, float] = {}
        seen = 0

        def collect() -> dict[str, float]:
            nonlocal seen
            now = time.monotonic()
            for post in fake.posted[seen:]:
                ref = post.reference
                if ref and ref.get("message_id"):
                    answered.setdefault(ref["message_id"], now)
            seen = len(fake.posted)
            return answered

        async def changed() -> None:
            await fake.wait_for(lambda: len(fake.posted) > seen, within=0.5)

        async def inject(i: int) -> str:
            user = i % 500
            msg = await fake.message_create(bot, f"hello {i}", channel_id=str(700000 + user),
                                            author=user_object(str(500000 + user), f"u{user}"))
            return str(msg["id"])

        result = await paced(count, rate, inject, collect, changed)
        collect()
        return [[
            f"discord {rate:.0f}/s", f"{result.answered}/{result.sent} answered",
            f"{result.rate:,.0f} replies/s", f"p50 {result.p50:.1f} ms",
            f"p99 {result.pct(0.99):.1f} ms", f"dropped {result.sent - result.answered}",
        ]]
    finally:
        if gateway is not None:
            gateway.stop()
        agent.stop()
        await fake.stop()


def run_sync(workdir: Path, rate: float, count: int) -> list[list[str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run(workdir, rate, count))
