"""Agent usage per tenant: metrics, daily buckets persisted in the store, the token budget.

A call is counted in memory and written to the store in batches (every `FLUSH_SECONDS` and when
the gateway stops), so the web path pays a dict update, not a database write.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import Counter

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
class _Spent:
    """A tenant's tokens of one day: the store's total when read, plus ours since."""

    read_at: float
    stored: int
    since: int = 0


class UsageRecorder:
    """Counts each tenant's agent calls and tokens; persists them by day; checks budgets."""

    def __init__(self, store: SessionStore, metrics: Metrics) -> None:
        self.store = store
        self._calls = Counter(
            "chatgateway_agent_calls",
            "Agent calls by tenant (every protocol; the breaker's and the budget's refusals are "
            "not calls)",
            ["tenant"],
            registry=metrics.registry,
        )
        self._tokens = Counter(
            "chatgateway_agent_tokens",
            "Tokens the agents reported by tenant and direction (in: prompt, out: completion)",
            ["tenant", "direction"],
            registry=metrics.registry,
        )
        self._series: dict[str, tuple[Any, Any, Any]] = {}
        self._pending: dict[tuple[str, str], _Bucket] = {}
        self._spent: dict[tuple[str, str], _Spent] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._day = ""
        self._day_ends = 0.0

    def record(self, tenant_id: str, usage: Usage | None) -> None:
        """Count one agent call of `tenant_id` and the tokens it used, if reported."""
        series = self._series.get(tenant_id)
        if series is None:
            series = self._series[tenant_id] = (
                self._calls.labels(tenant_id),
                self._tokens.labels(tenant_id, "in"),
                self._tokens.labels(tenant_id, "out"),
            )
        series[0].inc()
        now = time.time()
        if now >= self._day_ends:
            self._day = utc_day(now)
            self._day_ends = (now // 86400 + 1) * 86400  # Unix time has no leap seconds
        key = (tenant_id, self._day)
        bucket = self._pending.get(key)
        if bucket is None:
            bucket = self._pending[key] = _Bucket()
        bucket.calls += 1
        if usage is not None:
            series[1].inc(usage.tokens_in)
            series[2].inc(usage.tokens_out)
            bucket.tokens_in += usage.tokens_in
            bucket.tokens_out += usage.tokens_out
            spent = self._spent.get(key)
            if spent is not None:
                spent.since += usage.tokens_in + usage.tokens_out
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_later(), name="usage-flush"
            )

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
        key = (tenant_id, utc_day(now))
        spent = self._spent.get(key)
        if spent is None or now - spent.read_at > BUDGET_REFRESH_SECONDS:
            await self.flush()
            rows = await self.store.usage(TenantId(tenant_id), key[1], key[1])
            stored = sum(r.tokens_in + r.tokens_out for r in rows)
            # Yesterday's entries are of no more use.
            self._spent = {k: v for k, v in self._spent.items() if k[1] == key[1]}
            spent = self._spent[key] = _Spent(now, stored)
        return spent.stored + spent.since
