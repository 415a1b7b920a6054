"""Slack path: events through the fake Socket Mode server -> ack latency and the reply's arrival."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

from bench.platform import paced
from bench.procs import start_gateway, start_server
from bench.web import UNLIMITED
from tests.fakes.slack import FakeSlack, Posted


async def run(workdir: Path, rate: float, count: int) -> list[list[str]]:
    fake = await FakeSlack(echo_own_messages=False, max_retries=0).start()
    app = fake.add_app("benchapp")
    agent, agent_port = start_server("agent")
    gateway = None
    try:
        gateway, _, _ = start_gateway(workdir, {
            "storage": {"path": str(workdir / "slack.db")},
            "tenants": [{"id": "bench", "agent": {"url": f"http://127.0.0.1:{agent_port}/agent"},
                         "limits": UNLIMITED, "web": {"enabled": False},
                         "slack": {"apps": [app.config(fake)]}}],
        }, name="slack")
        await fake.wait_connected(app, within=60)
        event_of_channel: dict[str, str] = {}
        replies: dict[str, float] = {}
        unmatched: list[Posted] = []
        read = 0

        def answered() -> dict[str, float]:
            # Only the posts since the last call: it runs on every reply, on the fake's loop,
            # and a rescan of every post each time slowed the fake (and so its ack timing).
            nonlocal read, unmatched
            fresh, read = [*unmatched, *fake.posted[read:]], len(fake.posted)
            unmatched = [p for p in fresh if p.channel not in event_of_channel]
            for p in fresh:
                if p.channel in event_of_channel:
                    replies.setdefault(event_of_channel[p.channel], p.at)
            return replies

        async def changed() -> None:
            seen = len(fake.posted)
            await fake.wait_for(lambda: len(fake.posted) > seen, within=0.5)

        async def inject(i: int) -> str:
            # One user per event, so each reply's channel names its event.
            delivery = await fake.dm(app, f"U{i:07d}", f"hello {i}")
            event_id = str(delivery.envelope["payload"]["event_id"])
            event_of_channel[f"DU{i:07d}"] = event_id
            return event_id

        result = await paced(count, rate, inject, answered, changed)
        acks = sorted(d.ack_latency * 1000 for d in fake.deliveries if d.ack_latency is not None)
        p99 = acks[min(len(acks) - 1, int(len(acks) * 0.99))] if acks else float("nan")
        return [[
            f"slack {rate:.0f}/s", f"{len(acks)}/{len(fake.deliveries)} acked",
            f"ack p50 {statistics.median(acks):.1f} ms / p99 {p99:.1f} ms",
            f"{result.answered}/{result.sent} answered, {result.rate:,.0f} replies/s",
            f"reply p50 {result.p50:.1f} ms / p99 {result.pct(0.99):.1f} ms",
        ]]
    finally:
        if gateway is not None:
            gateway.stop()
        agent.stop()
        await fake.stop()


def run_sync(workdir: Path, rate: float, count: int) -> list[list[str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run(workdir, rate, count))
