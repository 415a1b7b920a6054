"""Web path: the gateway's POST /api/chat against a bare forwarder and the agent called directly."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen
from bench.procs import Proc, start_gateway, start_server

KEY = "bench-key-0123456789abcdef"
#: Limits on, never refusing: the benchmarks measure the checks' cost, not refusals.
UNLIMITED = {name: {"per_minute": 1e9, "burst": 1_000_000_000} for name in ("tenant", "user")}


@dataclass
class Sample:
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    errors: int = 0


def run(workdir: Path, concurrencies: list[int], rounds: int, seconds: float) -> list[list[str]]:
    agent, agent_port = start_server("agent")
    agent_url = f"http://127.0.0.1:{agent_port}/agent"
    forwarder, fwd_port = start_server("forwarder", agent_url)
    gateway, gw_port, _ = start_gateway(workdir, {
        "storage": {"path": str(workdir / "web.db")},
        "tenants": [{"id": "bench", "agent": {"url": agent_url}, "limits": UNLIMITED,
                     "web": {"api_keys": [{"value": KEY}]}}],
    }, name="web")
    targets: dict[str, tuple[str, str | None, Proc | None]] = {
        "agent": (agent_url, None, None),
        "forwarder": (f"http://127.0.0.1:{fwd_port}/api/chat", None, forwarder),
        "gateway": (f"http://127.0.0.1:{gw_port}/api/chat", KEY, gateway),
    }
    rows = []
    try:
        for url, key, _ in targets.values():  # warm up connections, caches, sessions
            loadgen.run(url, 16, 1, key)
        for conc in concurrencies:
            samples = {name: Sample() for name in targets}
            ratios: list[float] = []
            p99_ratios: list[float] = []
            for _ in range(rounds):
                order = list(targets)
                random.shuffle(order)
                got = {}
                for name in order:
                    url, key, proc = targets[name]
                    cpu0 = proc.cpu_seconds() if proc else 0.0
                    result = loadgen.run(url, conc, seconds, key)
                    cpu = (proc.cpu_seconds() - cpu0) if proc else 0.0
                    s = samples[name]
                    s.rps.append(result.rps)
                    s.p50.append(result.p50_ms)
                    s.p99.append(result.p99_ms)
                    s.errors += result.errors
                    if proc and result.requests:
                        s.cpu_us.append(cpu / result.requests * 1e6)
                    got[name] = result
                ratios.append(got["gateway"].rps / got["forwarder"].rps)
                p99_ratios.append(got["gateway"].p99_ms / max(got["forwarder"].p99_ms, 1e-6))
            for name, s in samples.items():
                ratio = ""
                if name == "gateway":
                    ratio = (f"{statistics.median(ratios):.2f}x fwd rps, "
                             f"{statistics.median(p99_ratios):.2f}x fwd p99")
                rows.append([
                    f"web c={conc}", name, f"{statistics.median(s.rps):,.0f}",
                    f"{statistics.median(s.p50):.1f}", f"{statistics.median(s.p99):.1f}",
                    f"{statistics.median(s.cpu_us):.0f}" if s.cpu_us else "-",
                    str(s.errors), ratio,
                ])
    finally:
        for proc in (gateway, forwarder, agent):
            proc.stop()
    return rows
