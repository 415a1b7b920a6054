"""Instructions per web request under callgrind: a figure that the machine's noise does not move.

The req/s of the web part vary by about ±15% between identical runs on a shared machine, so
they cannot tell a 3% change from noise. Instruction counts can: valgrind's callgrind counts
every instruction the target process executes (all its threads), the same for the same code
and load whatever else the machine does. Each target runs under callgrind, gets a warm-up,
has its counters zeroed, serves a fixed number of `POST /api/chat` requests and is dumped.

The gateway variants show what a part of the per-message work costs: the log line (logging at
`warning`) and the history sent to the agent (`history_turns: 0`). Needs valgrind
(`apt-get install valgrind`); without it this part prints one row saying so.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.procs import Proc, start_server
from bench.web import KEY, UNLIMITED

WARMUP = 300
CONCURRENCY = 8

#: (name, tenant agent settings, logging settings) of each gateway variant.
VARIANTS: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    ("gateway", {}, {"level": "info", "format": "json"}),
    ("gateway, logging at warning", {}, {"level": "warning", "format": "json"}),
    ("gateway, history_turns 0", {"history_turns": 0}, {"level": "info", "format": "json"}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: Proc, port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.popen.args!r} exited {proc.popen.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listening on port {port}")


async def _load(url: str, requests: int, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    numbers = iter(range(requests))
    async with aiohttp.ClientSession(headers=headers) as http:

        async def worker() -> None:
            for i in numbers:
                body = {"message": "hello", "userId": f"u{i % 50}"}
                async with http.post(url, json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: HTTP {resp.status}: {await resp.text()}")
                    await resp.read()

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def _measure(workdir: Path, args: list[str], url: str, port: int, key: str | None,
             requests: int) -> float:
    """Instructions per request of `python ARGS` listening on `port`, under callgrind."""
    out = workdir / "callgrind.out"
    proc = Proc(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                 sys.executable, *args], log=workdir / "valgrind.log")
    try:
        _wait_listening(proc, port)
        asyncio.run(_load(url, WARMUP, key))
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True,
                       capture_output=True)
        asyncio.run(_load(url, requests, key))
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True,
                       capture_output=True)
    finally:
        proc.stop()
    dumps = sorted(workdir.glob("callgrind.out.*"))  # the explicit dump; the final one is bare
    if not dumps:
        raise RuntimeError(f"no callgrind dump in {workdir}")
    for line in dumps[0].read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]) / requests
    raise RuntimeError(f"no totals in {dumps[0]}")


def run(workdir: Path, requests: int) -> list[list[str]]:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return [["-", "skipped: valgrind is not installed", "-", "-"]]
    agent, agent_port = start_server("agent")
    agent_url = f"http://127.0.0.1:{agent_port}/agent"
    results: list[tuple[str, float]] = []
    try:
        port = _free_port()
        fwd_dir = workdir / "forwarder"
        fwd_dir.mkdir(parents=True)
        fwd_args = ["-m", "bench.servers", "forwarder", agent_url, str(port)]
        results.append(("forwarder", _measure(
            fwd_dir, fwd_args, f"http://127.0.0.1:{port}/api/chat", port, None, requests)))
        for index, (name, agent_settings, logging) in enumerate(VARIANTS):
            run_dir = workdir / f"gateway-{index}"
            run_dir.mkdir(parents=True)
            port = _free_port()
            config = {
                "listen": {"host": "127.0.0.1", "port": port},
                "logging": logging,
                "storage": {"path": str(run_dir / "web.db")},
                "tenants": [{"id": "bench", "agent": {"url": agent_url, **agent_settings},
                             "limits": UNLIMITED, "web": {"api_keys": [{"value": KEY}]}}],
            }
            path = run_dir / "gateway.yaml"
            path.write_text(yaml.safe_dump(config))
            gw_args = ["-m", "chatgateway", "run", "--config", str(path)]
            results.append((name, _measure(
                run_dir, gw_args, f"http://127.0.0.1:{port}/api/chat", port, KEY, requests)))
    finally:
        agent.stop()
    base = results[0][1]
    return [[f"web c={CONCURRENCY}", name, f"{count:,.0f}", f"{count / base:.2f}x"]
            for name, count in results]


