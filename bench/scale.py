"""Scale: start-up time and memory by tenant count and stored sessions; session lookup latency."""

from __future__ import annotations

import asyncio
import random
import secrets
import sqlite3
import statistics
import time
from pathlib import Path

from bench.procs import start_gateway
from chatgateway.models import Platform, SessionId, SessionKey, TenantId
from chatgateway.store.migrations import sqlite as migrations
from chatgateway.store.sqlite import SqliteStore


def tenants_config(n: int) -> list[dict[str, object]]:
    return [{"id": f"t{i:05d}", "agent": {"url": f"http://127.0.0.1:9/agents/{i}"},
             "web": {"api_keys": [{"value": f"key-{i:05d}-{'x' * 24}"}]}} for i in range(n)]


def populate(path: Path, sessions: int, tenants: int = 10) -> list[str]:
    """Write `sessions` sessions (two turns each) straight into a fresh database."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrations.migrate(conn)
    conn.isolation_level = ""  # the inserts below: one transaction per batch
    ids: list[str] = []
    now = time.time()
    batch_s, batch_t = [], []
    for i in range(sessions):
        sid = "s_" + secrets.token_urlsafe(18)
        ids.append(sid)
        tenant = f"t{i % tenants:05d}"
        batch_s.append((sid, tenant, "web", f"u{i}", "", f"u{i}", None, "web", now, now, 2))
        batch_t.append((tenant, sid, 1, "user", "hello", now))
        batch_t.append((tenant, sid, 2, "agent", "hi there", now))
        if len(batch_s) >= 50_000:
            _flush(conn, batch_s, batch_t)
    _flush(conn, batch_s, batch_t)
    conn.close()
    return ids


def _flush(conn: sqlite3.Connection, batch_s: list[tuple[object, ...]],
           batch_t: list[tuple[object, ...]]) -> None:
    with conn:
        conn.executemany("INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?)", batch_s)
        conn.executemany(
            "INSERT INTO turns (tenant_id, session_id, seq, role, text, ts) VALUES (?,?,?,?,?,?)",
            batch_t,
        )
    batch_s.clear()
    batch_t.clear()


def startup(
    workdir: Path, name: str, config: dict[str, object], repeat: int
) -> tuple[float, float]:
    """Median seconds to `gateway_started` and RSS (MB) once started."""
    times, rss = [], []
    for r in range(repeat):
        proc, _, seconds = start_gateway(workdir, dict(config), name=f"{name}-{r}")
        time.sleep(0.2)
        rss.append(proc.rss_mb())
        times.append(seconds)
        proc.stop()
    return statistics.median(times), statistics.median(rss)


async def lookups(path: Path, ids: list[str], count: int) -> tuple[float, float, float, float]:
    """p50/p99 (us) of get_session by id and of find_active_session by key, cold cache."""
    store = SqliteStore(path, cache_size=1000)
    await store.open()
    try:
        by_id, by_key = [], []
        for _ in range(count):
            i = random.randrange(len(ids))
            tenant = TenantId(f"t{i % 10:05d}")
            t0 = time.perf_counter()
            session = await store.get_session(tenant, SessionId(ids[i]))
            by_id.append((time.perf_counter() - t0) * 1e6)
            assert session is not None
            j = random.randrange(len(ids))
            key = SessionKey(TenantId(f"t{j % 10:05d}"), Platform.WEB, f"u{j}", "", f"u{j}")
            t0 = time.perf_counter()
            found = await store.find_active_session(key, idle_since=0)
            by_key.append((time.perf_counter() - t0) * 1e6)
            assert found is not None
        by_id.sort()
        by_key.sort()
        return (statistics.median(by_id), by_id[int(len(by_id) * 0.99)],
                statistics.median(by_key), by_key[int(len(by_key) * 0.99)])
    finally:
        await store.close()


def run(workdir: Path, *, smoke: bool) -> list[list[str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    repeat = 1 if smoke else 3
    tenant_counts = [1, 100] if smoke else [1, 100, 1000]
    base_rss = 0.0
    for n in tenant_counts:
        config = {"storage": {"path": str(workdir / f"tenants-{n}.db")},
                  "tenants": tenants_config(n)}
        seconds, rss = startup(workdir, f"tenants-{n}", config, repeat)
        if n == 1:
            base_rss = rss
        extra = f"+{rss - base_rss:.1f} MB over 1 tenant" if n > 1 else ""
        target = "< 3 s, < +50 MB" if n == 1000 else ""
        rows.append([f"{n} web-only tenants", "start-up / RSS",
                     f"{seconds:.2f} s / {rss:.1f} MB {extra}", target])
    stored = 10_000 if smoke else 100_000
    db = workdir / "stored.db"
    populate(db, stored)
    seconds, rss = startup(workdir, "stored", {"storage": {"path": str(db)},
                                                "tenants": tenants_config(10)}, repeat)
    rows.append([f"{stored:,} stored sessions", "start-up / RSS",
                 f"{seconds:.2f} s / {rss:.1f} MB", ""])
    for size in ([10_000, 100_000] if smoke else [100_000, 1_000_000]):
        path = workdir / f"lookup-{size}.db"
        ids = populate(path, size)
        p50, p99, k50, k99 = asyncio.run(lookups(path, ids, 2_000 if smoke else 20_000))
        target = "p99 < 1 ms" if size == 1_000_000 else ""
        rows.append([f"{size:,} stored sessions", "lookup by id p50/p99",
                     f"{p50:.0f} / {p99:.0f} us", target])
        rows.append([f"{size:,} stored sessions", "lookup by key p50/p99",
                     f"{k50:.0f} / {k99:.0f} us", target])
    return rows
