"""Several instances on PostgreSQL: web throughput and gateway CPU per request with one and two
`chatgateway run` processes on one database (`python -m bench --only cluster`).

On a 2-core machine the total cannot double; what must hold is that CPU per request does not grow
with the number of instances (no cross-instance contention on the hot path). Needs the local
PostgreSQL (CHATGATEWAY_BENCH_PG, default postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import os
import statistics
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.procs import Proc, start_gateway, start_server
from bench.web import KEY, UNLIMITED

PG_SERVER = os.environ.get("CHATGATEWAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
#: Connections in total, split evenly over the instances.
CONCURRENCY = 32

#: (label, instances, cluster.coordination)
SETUPS = [
    ("1 instance, coordination local", 1, "local"),
    ("1 instance, coordination postgres", 1, "postgres"),
    ("2 instances, coordination postgres", 2, "postgres"),
]


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A schema of its own on the server, dropped afterwards; yields a dsn that uses it."""
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_SERVER, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _config(dsn: str, agent_url: str, coordination: str) -> dict[str, Any]:
    return {
        "storage": {"backend": "postgres", "dsn": {"value": dsn}},
        "cluster": {"coordination": coordination},
        "tenants": [{"id": "bench", "agent": {"url": agent_url}, "limits": UNLIMITED,
                     "web": {"api_keys": [{"value": KEY}]}}],
    }


def _measure(urls: list[str], procs: list[Proc], seconds: float) -> tuple[float, float, int]:
    """Drive every instance at once; return (req/s in total, CPU us per request, errors)."""
    share = max(1, CONCURRENCY // len(urls))
    cpu0 = [p.cpu_seconds() for p in procs]
    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(lambda url: loadgen.run(url, share, seconds, KEY), urls))
    cpu = sum(p.cpu_seconds() - c for p, c in zip(procs, cpu0, strict=True))
    requests = sum(r.requests for r in results)
    rps = sum(r.rps for r in results)
    return rps, cpu / max(requests, 1) * 1e6, sum(r.errors for r in results)


def run(workdir: Path, rounds: int, seconds: float) -> list[list[str]]:
    agent, agent_port = start_server("agent")
    agent_url = f"http://127.0.0.1:{agent_port}/agent"
    rows = []
    try:
        for label, count, coordination in SETUPS:
            with fresh_schema() as dsn:
                gateways: list[Proc] = []
                urls: list[str] = []
                try:
                    for i in range(count):
                        proc, port, _ = start_gateway(
                            workdir, _config(dsn, agent_url, coordination),
                            name=f"cluster-{coordination}-{count}-{i}",
                        )
                        gateways.append(proc)
                        urls.append(f"http://127.0.0.1:{port}/api/chat")
                    for url in urls:  # warm up connections, caches, sessions
                        loadgen.run(url, 8, 1, KEY)
                    rps, cpu, errors = [], [], 0
                    for _ in range(rounds):
                        r, c, e = _measure(urls, gateways, seconds)
                        rps.append(r)
                        cpu.append(c)
                        errors += e
                finally:
                    for proc in gateways:
                        proc.stop()
            rows.append([label, f"{statistics.median(rps):,.0f}",
                         f"{statistics.median(cpu):.0f}", str(errors)])
    finally:
        agent.stop()
    return rows
