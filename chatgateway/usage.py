"""Agent usage per tenant: metrics, daily buckets persisted in the store, the token budget.

A call is counted in memory and written to the store in batches (every `FLUSH_SECONDS` and when
the gateway stops), so the web path pays a dict update, not a database write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from chatgateway.invoker import Usage
from chatgateway.metrics import Metrics
from chatgateway.models import TenantId
from chatgateway.store.base import SessionStore

log = structlog.get_logger("chatgateway.usage")

#: Seconds between writes of the counted usage to the store.
FLUSH_SECONDS = 2.0
#: Seconds a budget check trusts the day's total it read from the store (other instances' usage
#: arrives with their flushes).
BUDGET_REFRESH_SECONDS = 10.0


def utc_day(timestamp: float) -> str:
    """The UTC day (YYYY-MM-DD) of a Unix timestamp."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


@dataclass(slots=True)
class _Bucket:
    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


@dataclass(slots=True)
class _Entry:
    """A tenant's counts of the current day (not yet in the store) and since the start."""

    day: _Bucket
    total: _Bucket


@dataclass(slots=True)
class _Spent:
    """A tenant's tokens of one day: the store's total when read, plus ours since."""

    day: str
    read_at: float
    stored: int
    since: int = 0


class UsageRecorder:
    """Counts each tenant's agent calls and tokens; persists them by day; checks budgets."""

    def __init__(self, store: SessionStore, metrics: Metrics) -> None:
        self.store = store
        self._pending: dict[tuple[str, str], _Bucket] = {}
        #: tenant -> its entry for the current day (a view on `_pending` and `_totals`).
        self._entries: dict[str, _Entry] = {}
        self._totals: dict[str, _Bucket] = {}
        self._spent: dict[str, _Spent] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._day = ""
        self._day_ends = 0.0
        # Read at scrape time: a call costs integer additions, no metric object.
        metrics.registry.register(_UsageCollector(self._totals))

    def record(self, tenant_id: str, usage: Usage | None) -> None:
        """Count one agent call of `tenant_id` and the tokens it used, if reported."""
        now = time.time()
        if now >= self._day_ends:
            self._day = utc_day(now)
            self._day_ends = (now // 86400 + 1) * 86400  # Unix time has no leap seconds
            self._entries = {}
        entry = self._entries.get(tenant_id)
        if entry is None:
            entry = self._enter(tenant_id)
        day, total = entry.day, entry.total
        day.calls += 1
        total.calls += 1
        if usage is not None:
            day.tokens_in += usage.tokens_in
            day.tokens_out += usage.tokens_out
            total.tokens_in += usage.tokens_in
            total.tokens_out += usage.tokens_out
            spent = self._spent.get(tenant_id)
            if spent is not None and spent.day == self._day:
                spent.since += usage.tokens_in + usage.tokens_out
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_later(), name="usage-flush"
            )

    def _enter(self, tenant_id: str) -> _Entry:
        day = self._pending.get((tenant_id, self._day))
        if day is None:
            day = self._pending[(tenant_id, self._day)] = _Bucket()
        total = self._totals.get(tenant_id)
        if total is None:
            total = self._totals[tenant_id] = _Bucket()
        entry = self._entries[tenant_id] = _Entry(day, total)
        return entry

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(FLUSH_SECONDS)
        finally:
            self._flusher = None
        await self.flush()

    async def flush(self) -> None:
        """Write the usage counted so far to the store (kept for the next try if it fails)."""
        async with self._flushing:
            pending, self._pending = self._pending, {}
            self._entries = {}
            for (tenant_id, day), bucket in pending.items():
                try:
                    await self.store.add_usage(
                        TenantId(tenant_id),
                        day,
                        calls=bucket.calls,
                        tokens_in=bucket.tokens_in,
                        tokens_out=bucket.tokens_out,
                    )
                except Exception as exc:
                    # Nothing is lost: the counts go back for the next flush.
                    log.warning("usage_flush_failed", error=f"{type(exc).__name__}: {exc}")
                    back = self._pending.setdefault((tenant_id, day), _Bucket())
                    back.calls += bucket.calls
                    back.tokens_in += bucket.tokens_in
                    back.tokens_out += bucket.tokens_out

    async def close(self) -> None:
        """Stop the timer and write what is left; call before the store closes."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
        await self.flush()

    async def spent_today(self, tenant_id: str) -> int:
        """Tokens `tenant_id` used today (UTC), across instances within BUDGET_REFRESH_SECONDS."""
        now = time.time()
        today = utc_day(now)
        spent = self._spent.get(tenant_id)
        if spent is None or spent.day != today or now - spent.read_at > BUDGET_REFRESH_SECONDS:
            await self.flush()
            rows = await self.store.usage(TenantId(tenant_id), today, today)
            stored = sum(r.tokens_in + r.tokens_out for r in rows)
            spent = self._spent[tenant_id] = _Spent(today, now, stored)
        return spent.stored + spent.since


class _UsageCollector(Collector):
    """chatgateway_agent_calls_total and chatgateway_agent_tokens_total, read when scraped."""

    def __init__(self, totals: dict[str, _Bucket]) -> None:
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "chatgateway_agent_calls",
            "Agent calls by tenant (every protocol; the breaker's and the budget's refusals are "
            "not calls)",
            labels=["tenant"],
        )
        tokens = CounterMetricFamily(
            "chatgateway_agent_tokens",
            "Tokens the agents reported by tenant and direction (in: prompt, out: completion)",
            labels=["tenant", "direction"],
        )
        for tenant_id, total in list(self._totals.items()):
            calls.add_metric([tenant_id], total.calls)
            tokens.add_metric([tenant_id, "in"], total.tokens_in)
            tokens.add_metric([tenant_id, "out"], total.tokens_out)
        yield calls
        yield tokens
