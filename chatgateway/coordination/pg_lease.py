"""Leases on PostgreSQL: one row per leased name, with its owner and an expiry on the server clock.

Why rows with an expiry rather than session advisory locks: an advisory lock lives as long as
the holder's database connection, and when the holder's machine is lost that TCP connection is
never closed; the server notices only after its keepalive settings (two hours by default), so the
resource would stay unowned for that long. A row with `expires_at` is free `ttl` seconds after the
holder stopped renewing, whatever happened to its network, and the holder itself stops using the
resource before that moment because it cannot renew either (`PgLease.lost`).

A lease also carries a small JSON `data` object that survives a change of owner: the Discord
adapter keeps its gateway session there, so the next owner resumes it (and Discord replays what
the dead owner had not finished) instead of starting a new session.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

log = structlog.get_logger("chatgateway.coordination")

# The store's migration 4 creates the table (chatgateway/store/migrations/postgres.py); this
# copy serves a database the store has not migrated yet (the lease tests).
SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL,
    data JSONB
)
"""

# Take the row if it is free (missing or expired) or already ours; else report its owner. The
# CTE's SELECT sees the row as it was before the upsert, so a refused caller learns who holds it.
ACQUIRE = """
WITH taken AS (
    INSERT INTO leases AS l (name, owner, expires_at, acquired_at)
    VALUES (%(name)s, %(owner)s, clock_timestamp() + make_interval(secs => %(ttl)s),
            clock_timestamp())
    ON CONFLICT (name) DO UPDATE
        SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at,
            acquired_at = EXCLUDED.acquired_at
        WHERE l.expires_at < clock_timestamp() OR l.owner = EXCLUDED.owner
    RETURNING l.data
)
SELECT true, data, NULL FROM taken
UNION ALL
SELECT false, NULL, owner FROM leases
    WHERE name = %(name)s AND NOT EXISTS (SELECT 1 FROM taken)
"""

RENEW = """
UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => %(ttl)s),
                  data = COALESCE(%(data)s, data)
WHERE name = %(name)s AND owner = %(owner)s
RETURNING 1
"""

# Expired at once, so the next try_lease anywhere takes it; the row (and its data) stays.
RELEASE = """
UPDATE leases SET expires_at = '-infinity', data = COALESCE(%(data)s, data)
WHERE name = %(name)s AND owner = %(owner)s
"""

#: A holder gives its lease up (sets `lost`) this fraction of the ttl before it may expire on
#: the server, so it has stopped using the resource before anybody else can take it.
SAFETY_FRACTION = 0.25
#: Longest wait for one statement: a server that does not answer is treated as an error.
STATEMENT_TIMEOUT = 3.0


class PgLease:
    """One lease this instance holds; renewed in the background every ttl/3 until released."""

    def __init__(
        self, leases: PgLeases, name: str, ttl: float, data: dict[str, Any] | None
    ) -> None:
        self.name = name
        self.ttl = ttl
        self.lost = asyncio.Event()
        #: What the previous holder (or this one) saved with `save`; None for a new name.
        self.data = data
        self._leases = leases
        self._pending: dict[str, Any] | None = None
        self._wake = asyncio.Event()
        # Monotonic time until which the lease is certainly ours: measured from *before* the
        # statement that extended it, so it never exceeds the server's expires_at.
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None

    def save(self, data: dict[str, Any], *, now: bool = False) -> None:
        """Keep `data` with the lease (written at the next renewal, or at once if `now`)."""
        self.data = data
        self._pending = data
        if now:
            self._wake.set()

    async def release(self) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        self._wake.set()
        await self._leases._released(self)

    def _start(self, valid_until: float) -> None:
        self._valid_until = valid_until
        self._task = asyncio.create_task(self._renew_loop(), name=f"lease:{self.name}")

    def _lose(self, reason: str, **fields: Any) -> None:
        if not self.lost.is_set():
            self.lost.set()
            log.warning("lease_lost", lease=self.name, reason=reason, **fields)
            self._leases._forget(self)

    async def _renew_loop(self) -> None:
        every = self.ttl / 3
        margin = self.ttl * SAFETY_FRACTION
        while not self.lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), every)
            self._wake.clear()
            if self.lost.is_set():
                return
            started = time.monotonic()
            budget = self._valid_until - margin - started
            if budget <= 0:
                self._lose("not_renewed_in_time")
                return
            pending = self._pending
            try:
                async with asyncio.timeout(min(budget, STATEMENT_TIMEOUT)):
                    kept = await self._leases._renew(self, pending)
            except Exception as exc:
                if time.monotonic() >= self._valid_until - margin:
                    self._lose("renewal_failed", error=f"{type(exc).__name__}: {exc}")
                    return
                # Retry soon: the lease is still ours for a while.
                log.info("lease_renewal_retry", lease=self.name, error=type(exc).__name__)
                every = min(1.0, self.ttl / 10)
                continue
            every = self.ttl / 3
            if not kept:
                self._lose("taken_over")
                return
            if self._pending is pending:
                self._pending = None
            self._valid_until = started + self.ttl


class PgLeases:
    """Every lease of one instance, on one dedicated autocommit connection."""

    def __init__(self, conninfo: str, owner: str) -> None:
        self._conninfo = conninfo
        self.owner = owner
        self._conn: AsyncConnection[Any] | None = None
        self._connecting = asyncio.Lock()
        self._held: dict[str, PgLease] = {}
        #: Who held each name when this instance last failed to take it.
        self.holders: dict[str, str] = {}

    async def start(self) -> None:
        """Connect, and create the table if no migration did (the role may not be allowed to)."""
        conn = await self._connection()
        cur = await conn.execute("SELECT to_regclass('leases') IS NULL")
        row = await cur.fetchone()
        if row is not None and row[0]:
            await conn.execute(SCHEMA)

    async def close(self) -> None:
        """Release every lease this instance holds, then disconnect; idempotent."""
        await asyncio.gather(
            *(lease.release() for lease in list(self._held.values())), return_exceptions=True
        )
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def holder(self, name: str) -> str | None:
        """The instance that held `name` when this one last tried to take it, if known."""
        return self.holders.get(name)

    async def try_lease(self, name: str, *, ttl: float) -> PgLease | None:
        """Take `name` for `ttl` seconds (renewed until released) if it is free; else None."""
        if name in self._held:
            return None
        started = time.monotonic()
        rows = await self._execute(ACQUIRE, {"name": name, "owner": self.owner, "ttl": ttl})
        if not rows or not rows[0][0]:
            if rows:
                self.holders[name] = rows[0][2]
            return None
        self.holders.pop(name, None)
        lease = PgLease(self, name, ttl, rows[0][1])
        self._held[name] = lease
        lease._start(started + ttl)
        log.info("lease_acquired", lease=name, owner=self.owner)
        return lease

    # Used by PgLease -----------------------------------------------------------------------

    async def _renew(self, lease: PgLease, data: dict[str, Any] | None) -> bool:
        rows = await self._execute(
            RENEW,
            {
                "name": lease.name,
                "owner": self.owner,
                "ttl": lease.ttl,
                "data": Jsonb(data) if data is not None else None,
            },
        )
        return bool(rows)

    async def _released(self, lease: PgLease) -> None:
        self._forget(lease)
        data = lease._pending
        try:
            async with asyncio.timeout(STATEMENT_TIMEOUT):
                await self._execute(
                    RELEASE,
                    {
                        "name": lease.name,
                        "owner": self.owner,
                        "data": Jsonb(data) if data is not None else None,
                    },
                )
            log.info("lease_released", lease=lease.name)
        except Exception as exc:
            # It expires on its own after the ttl.
            log.warning(
                "lease_release_failed", lease=lease.name, error=f"{type(exc).__name__}: {exc}"
            )

    def _forget(self, lease: PgLease) -> None:
        if self._held.get(lease.name) is lease:
            del self._held[lease.name]

    async def _connection(self) -> AsyncConnection[Any]:
        async with self._connecting:
            if self._conn is None or self._conn.closed:
                self._conn = await AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=int(STATEMENT_TIMEOUT) + 1
                )
            return self._conn

    async def _execute(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        conn = await self._connection()
        try:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall() if cursor.description else []
        except BaseException:
            # Its state is unknown (a timeout may have cut a statement short): start afresh.
            if self._conn is conn:
                self._conn = None
            with contextlib.suppress(Exception):
                await conn.close()
            raise
