"""Discord takeover: three instances on PostgreSQL, the bot's owner killed (kill -9) again and again
while users keep writing, then stopped (SIGTERM, as `systemctl stop`) a few times
(`python -m bench --only takeover`).

Measures the time from each kill until another instance has the bot connected again, the same
from each SIGTERM (the owner hands the bot over when its drain begins), and, over all kills and
stops, the messages never answered (lost) and answered more than once (duplicated); the targets
are at most 15 s, 0 and 0 (issue 13). A killed or stopped instance is replaced by a new process,
so three run at every kill. Needs the local PostgreSQL (CHATGATEWAY_BENCH_PG, as bench.cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.cluster import fresh_schema
from bench.procs import Proc, start_gateway
from bench.web import UNLIMITED
from chatgateway.testing.agent import FakeAgent
from tests.fakes.discord import Connection, FakeBot, FakeDiscord, user_object

INSTANCES = 3
#: Messages per second while the kills happen, spread over a few users and channels.
RATE = 5.0
#: The agent's think time: at every kill some messages are in the dead owner's hands.
AGENT_DELAY = 0.3
TARGET_TAKEOVER = 15.0
#: A stopped owner hands its bot over at once: another instance connects within its standby retry.
TARGET_HANDOVER = 3.0
LEASE = "discord:bench:takeoverbot"

HEADER = ["discord takeover", "value", "target"]


def _config(dsn: str, agent_url: str, bot: dict[str, Any]) -> dict[str, Any]:
    return {
        "storage": {"backend": "postgres", "dsn": {"value": dsn}},
        "cluster": {"coordination": "postgres"},
        "tenants": [{"id": "bench", "agent": {"url": agent_url}, "limits": UNLIMITED,
                     "web": {"enabled": False}, "discord": {"bots": [bot]}}],
    }


async def _owner_pid(dsn: str) -> int | None:
    """The pid of the instance holding the bot's lease (instance ids are host:pid:random)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT owner FROM leases WHERE name = %s AND expires_at > clock_timestamp()",
            (LEASE,),
        )
        row = await cur.fetchone()
    return int(str(row[0]).split(":")[1]) if row else None


async def _processed(dsn: str, ids: list[str]) -> set[str]:
    """Which of these Discord messages the store recorded as processed (answer committed)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT event_id FROM processed_events WHERE platform = 'discord' "
            "AND event_id = ANY(%s)",
            (ids,),
        )
        return {str(row[0]) for row in await cur.fetchall()}


def _posted_again(workdir: Path) -> int:
    """How many stored answers the instances posted again for a replayed message."""
    return sum(
        log.read_text().count('"message_answer_posted_again"')
        for log in workdir.glob("instance-*.log")
    )


def _live(fake: FakeDiscord, bot: FakeBot) -> Connection | None:
    session = fake.live_session(bot)
    return session.conn if session is not None else None


async def run(workdir: Path, kills: int, stops: int) -> list[list[str]]:
    fake = await FakeDiscord().start()
    bot = fake.add_bot("takeoverbot")
    agent = await FakeAgent(delay=AGENT_DELAY).start()
    procs: dict[int, Proc] = {}
    sent: list[str] = []
    stop_sending = asyncio.Event()

    async def users_write() -> None:
        i = 0
        while not stop_sending.is_set():
            user = i % 7
            message = await fake.message_create(
                bot, f"message {i}", channel_id=str(800000 + user),
                author=user_object(str(900000 + user), f"user{user}"),
            )
            sent.append(str(message["id"]))
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_sending.wait(), 1 / RATE)

    def replies() -> Counter[str]:
        return Counter(p.reference["message_id"] for p in fake.posted
                       if p.reference and p.reference.get("message_id"))

    with fresh_schema() as dsn:
        settings = fake.bot_settings(bot, typing_indicator=False)
        config = _config(dsn, agent.url, settings)
        started = 0

        def start() -> None:
            nonlocal started
            proc, _, _ = start_gateway(workdir, dict(config), name=f"instance-{started}")
            started += 1
            procs[proc.pid] = proc

        writer: asyncio.Task[None] | None = None
        takeovers: list[float] = []
        handovers: list[float] = []
        exits: list[int | None] = []

        async def take_down(sig: signal.Signals) -> float:
            """Kill or stop the bot's owner; seconds until another instance has it connected."""
            await asyncio.sleep(1.0)  # some traffic on the current owner
            pid = await _owner_pid(dsn)
            before = _live(fake, bot)
            if pid is None or pid not in procs or before is None:
                raise RuntimeError(f"no owner to take down (lease owner pid {pid})")
            proc = procs.pop(pid)
            os.kill(pid, sig)
            down = time.monotonic()

            def moved() -> bool:
                conn = _live(fake, bot)
                return conn is not None and conn is not before

            await fake.wait_for(moved, within=60)
            took = time.monotonic() - down
            # A stopped owner drains (its answers in flight) and exits on its own.
            exits.append(await asyncio.to_thread(proc.popen.wait, 60))
            await asyncio.to_thread(start)  # back to three instances
            return took

        try:
            for _ in range(INSTANCES):
                await asyncio.to_thread(start)
            await fake.wait_ready(bot, 60)
            writer = asyncio.create_task(users_write())
            for _ in range(kills):
                takeovers.append(await take_down(signal.SIGKILL))
            for _ in range(stops):
                handovers.append(await take_down(signal.SIGTERM))
            stop_sending.set()
            await writer
            with contextlib.suppress(TimeoutError):
                await fake.wait_for(lambda: all(replies()[m] for m in sent), within=60)
            unanswered = [m for m in sent if not replies()[m]]
            committed = await _processed(dsn, unanswered) if unanswered else set()
        finally:
            stop_sending.set()
            if writer is not None and not writer.done():
                writer.cancel()
            for proc in procs.values():
                await asyncio.to_thread(proc.stop)
            await agent.stop()
            await fake.stop()
    counts = replies()
    # Replays of messages whose answer was stored (by an owner killed or stopped before or while
    # posting it) that the next owner posted again, with the same nonces.
    again = _posted_again(workdir)
    lost = sum(1 for m in sent if counts[m] == 0)
    duplicated = sum(1 for m in sent if counts[m] > 1)
    # A lost message whose answer was committed died in the window between committing an answer
    # and posting it, and its replay did not post the stored answer (docs/deploy-cluster.md).
    in_window = sum(1 for m in sent if counts[m] == 0 and m in committed)
    stopped_ok = sum(1 for code in exits[len(takeovers):] if code == 0)
    return [
        ["kills (kill -9 of the bot's owner)", str(len(takeovers)), ""],
        ["takeover p50", f"{statistics.median(takeovers):.1f} s", ""],
        ["takeover max", f"{max(takeovers):.1f} s", f"<= {TARGET_TAKEOVER:.0f} s"],
        ["stops (SIGTERM of the bot's owner)", str(len(handovers)), ""],
        ["hand-over p50", f"{statistics.median(handovers):.1f} s" if handovers else "-", ""],
        ["hand-over max", f"{max(handovers):.1f} s" if handovers else "-",
         f"<= {TARGET_HANDOVER:.0f} s"],
        ["stopped owners that exited 0", f"{stopped_ok} of {len(handovers)}", "all"],
        ["messages sent", str(len(sent)), ""],
        ["lost (never answered)", str(lost), "0"],
        ["  of which answer committed, killed before the post", str(in_window), ""],
        ["duplicated (answered twice)", str(duplicated), "0"],
        ["stored answers posted again on a replay", str(again), ""],
        ["  posts Discord answered with the earlier message (nonce)", str(fake.nonce_hits), ""],
    ]


def run_sync(workdir: Path, kills: int, stops: int | None = None) -> list[list[str]]:
    """`stops`: SIGTERMs after the kills (default: a quarter as many, at least one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run(workdir, kills, max(1, kills // 4) if stops is None else stops))
