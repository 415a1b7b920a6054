"""Shared pieces of the Slack and Discord benchmarks: pacing injections and timing replies."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass
class PacedRun:
    sent: int
    answered: int
    seconds: float
    latencies_ms: list[float]
    inject_lag_ms: float

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")


async def paced(
    count: int,
    rate: float,
    inject: Callable[[int], Awaitable[str]],
    answered: Callable[[], dict[str, float]],
    changed: Callable[[], Awaitable[object]],
    settle: float = 30.0,
) -> PacedRun:
    """Inject `count` events at `rate`/s; `inject(i)` returns the event's id, `answered()` maps
    ids to the perf_counter time their reply arrived. Wait up to `settle` s for the stragglers."""
    sent_at: dict[str, float] = {}
    finished = asyncio.Event()
    all_answered = asyncio.Event()

    async def watch() -> None:
        # Timestamp replies as they arrive, concurrently with the injection.
        while not finished.is_set():
            try:
                await changed()
            except TimeoutError:
                pass
            if len(answered()) >= count:
                all_answered.set()

    watcher = asyncio.create_task(watch())
    start = time.monotonic()
    lag = 0.0
    try:
        for i in range(count):
            target = start + i / rate
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            sent_at[await inject(i)] = time.monotonic()
        try:
            async with asyncio.timeout(settle):
                await all_answered.wait()
        except TimeoutError:
            pass
    finally:
        finished.set()
        await watcher
    done = answered()
    last = max(done.values(), default=start)
    latencies = [(done[e] - sent_at[e]) * 1000 for e in sent_at if e in done]
    return PacedRun(count, len(done), last - start, latencies, lag * 1000)
