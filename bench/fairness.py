"""Fairness: tenant B's latency while tenant A floods the gateway, and while A's agent hangs.

Two tenants, each with its own key and its own fast agent. B sends 20 requests/s from an
open-loop paced client (a request leaves on schedule whether or not the last one was answered;
latency counts from the scheduled time, so a stall is not hidden). First B alone (the quiet
baseline), then B while A floods `POST /api/chat` as hard as the load generator can, then B while
A floods and A's agent never answers. When the tenant config has `limits:` and `breaker:`, A gets a
tenant rate (`A_RATE_PER_MINUTE`) and B's limits stay above its 20/s; without them A is unlimited.

`python -m bench.fairness agent` runs the agent (`POST /agent`; `POST /control?hang=1` makes it
stop answering); `paced URL KEY RATE SECONDS` and `flood URL KEY CONCURRENCY SECONDS` are the
Python clients; each prints one `RESULT` line.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from bench import loadgen
from bench.procs import Proc, start_gateway

KEY_A = "bench-fairness-key-a-0123456789"
KEY_B = "bench-fairness-key-b-0123456789"
ADMIN = "bench-fairness-admin-0123456789"
B_RATE = 20.0
#: Tenant A's configured rate when the config has `limits:` (100 messages/s, burst 100).
A_RATE_PER_MINUTE = 6000.0
A_BURST = 100
#: How long one of A's messages over its rate may wait for its token (paced, not refused), when
#: the config has `limits.tenant.max_wait`: 100 of A's requests can be waiting at once.
A_MAX_WAIT = 1.0
#: A's agent deadline: a hung agent turns into failures this fast (the breaker counts them).
A_AGENT_TIMEOUT = 1.0
FLOOD_CONNECTIONS = 64
B_USERS = 50
#: B's client connects from this loopback address (Linux routes all of 127/8 to lo).
B_ADDRESS = "127.0.0.2"
#: A's paced client (while its agent hangs) comes from a third one.
A_ADDRESS = "127.0.0.3"


@dataclass(frozen=True)
class Paced:
    sent: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    limited: int

    def traffic(self) -> Flood:
        """The same counts as a flood's, for A's table cells."""
        return Flood(self.sent, self.seconds, self.sent - self.errors, self.limited)


@dataclass(frozen=True)
class Flood:
    requests: int
    seconds: float
    ok: int
    limited: int

    @property
    def other(self) -> int:
        return self.requests - self.ok - self.limited


# The processes: a hangable agent, the paced client, the Python flood ---------------------------


def agent_app() -> web.Application:
    """A fast agent that can be told to stop answering (`POST /control?hang=1`)."""
    state = {"hang": False}

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        if state["hang"]:
            await asyncio.sleep(3600)  # never answers; the gateway's deadline ends the call
        return web.json_response({"response": f"ok: {body['message']['text']}"})

    async def control(request: web.Request) -> web.Response:
        state["hang"] = request.query.get("hang") == "1"
        return web.json_response(state)

    app = web.Application()
    app.router.add_post("/agent", answer)
    app.router.add_post("/control", control)
    return app


def percentile(sorted_values: list[float], q: float) -> float:
    """The `q` quantile (0-1) of already sorted values, nearest rank."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


async def paced(url: str, key: str, rate: float, seconds: float, address: str) -> Paced:
    """Send `rate` requests/s on schedule for `seconds`; latency from each scheduled time."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    latencies: list[float] = []
    errors = limited = 0
    loop = asyncio.get_running_loop()
    count = int(rate * seconds)

    async def one(session: ClientSession, i: int, start: float) -> None:
        nonlocal errors, limited
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        body = json.dumps({"message": f"b {i}", "userId": f"b{i % B_USERS}"})
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                errors += resp.status != 200
                limited += resp.status == 429
        except (ClientError, TimeoutError):
            errors += 1
        latencies.append((loop.time() - due) * 1000)

    # Each tenant's users are elsewhere on the internet: B's client comes from another address
    # than A's, so the per-address connection cap (server.max_connections_per_address) does
    # not pool them.
    connector = TCPConnector(limit=0, local_addr=(address, 0))
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=30)) as session:
        start = loop.time() + 0.05
        await asyncio.gather(*(one(session, i, start) for i in range(count)))
    latencies.sort()
    return Paced(count, seconds, percentile(latencies, 0.5), percentile(latencies, 0.99),
                 errors, limited)


async def flood_python(url: str, key: str, connections: int, seconds: float) -> Flood:
    """Keep `connections` requests in flight for `seconds`; count 200s and 429s."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    counts = {"requests": 0, "ok": 0, "limited": 0}
    deadline = time.perf_counter() + seconds

    async def worker(session: ClientSession) -> None:
        while time.perf_counter() < deadline:
            counts["requests"] += 1
            body = f'{{"message":"a","userId":"a{counts["requests"] % loadgen.USERS}"}}'
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    counts["ok"] += resp.status == 200
                    counts["limited"] += resp.status == 429
            except (ClientError, TimeoutError):
                pass

    started = time.perf_counter()
    connector = TCPConnector(limit=connections)
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=10)) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return Flood(counts["requests"], time.perf_counter() - started, counts["ok"],
                 counts["limited"])


_WRK_FLOOD = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; limited = 0; counter = 0 end
function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, '{"message":"a","userId":"a' .. (counter %% %(users)d) .. '"}')
end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 elseif status == 429 then limited = limited + 1 end
end
function done(summary, latency, requests)
  local o, l = 0, 0
  for _, t in ipairs(threads) do o = o + t:get("ok"); l = l + t:get("limited") end
  io.write(string.format("RESULT %%d %%f %%d %%d\\n", summary.requests, summary.duration / 1e6,
    o, l))
end
"""


def _parse_flood(out: str) -> Flood:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            requests, seconds, ok, limited = line.split()[1:]
            return Flood(int(requests), float(seconds), int(ok), int(limited))
    raise RuntimeError(f"the flood printed no result:\n{out}")


def _parse_paced(out: str) -> Paced:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            sent, secs, p50, p99, errors, limited = line.split()[1:]
            return Paced(int(sent), float(secs), float(p50), float(p99), int(errors),
                         int(limited))
    raise RuntimeError(f"the paced client printed no result:\n{out}")


def start_flood(url: str, key: str, seconds: float) -> subprocess.Popen[str]:
    """A's flood in its own process: wrk when installed, else the Python client."""
    if loadgen.which() == "wrk" and shutil.which("wrk"):
        script = Path(tempfile.mkdtemp(prefix="fairness-")) / "flood.lua"
        script.write_text(_WRK_FLOOD % {"key": key, "users": loadgen.USERS})
        cmd = ["wrk", "-t1", f"-c{FLOOD_CONNECTIONS}", f"-d{max(1, round(seconds))}s",
               "--timeout", "10s", "-s", str(script), url]
    else:
        cmd = [sys.executable, "-m", "bench.fairness", "flood", url, key,
               str(FLOOD_CONNECTIONS), str(seconds)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_paced(url: str, key: str, seconds: float, address: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench.fairness", "paced", url, key, str(B_RATE), str(seconds),
           address]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# The measurement ----------------------------------------------------------------------------


def _has_limits() -> bool:
    from chatgateway.config import TenantConfig

    return {"limits", "breaker"} <= set(TenantConfig.model_fields)


def _has_pacing() -> bool:
    from chatgateway import config

    rate = getattr(config, "TenantRateConfig", None)
    return rate is not None and "max_wait" in rate.model_fields


def gateway_config(workdir: Path, agent_a: str, agent_b: str) -> dict[str, Any]:
    """Two tenants; with `limits:` in the config, A held to its rate and B's limits above 20/s."""
    a: dict[str, Any] = {"id": "tenant-a", "agent": {"url": agent_a, "timeout": A_AGENT_TIMEOUT,
                                                     "retry": {"attempts": 1}},
                         "web": {"api_keys": [{"value": KEY_A}]}}
    b: dict[str, Any] = {"id": "tenant-b", "agent": {"url": agent_b},
                         "web": {"api_keys": [{"value": KEY_B}]}}
    if _has_limits():
        # Per-user and per-address limits are not what this measures: A's flood comes from one
        # address, and B's 20/s over 50 users would meet the defaults.
        a["limits"] = {"tenant": {"per_minute": A_RATE_PER_MINUTE, "burst": A_BURST},
                       "user": None, "address": None}
        if _has_pacing():
            a["limits"]["tenant"]["max_wait"] = A_MAX_WAIT
        b["limits"] = {"tenant": {"per_minute": B_RATE * 60 * 10, "burst": 200},
                       "user": None, "address": None}
        a["breaker"] = {"failures": 5, "window": 60, "cooldown": 30}
    return {
        "storage": {"path": str(workdir / "fairness.db")},
        "admin": {"token": {"value": ADMIN}},
        "tenants": [a, b],
    }


def _post(url: str, data: bytes = b"", key: str | None = None) -> Any:
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def _get(url: str, key: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def breaker_state(status: dict[str, Any], tenant_id: str) -> str:
    """Tenant's breaker state from `/admin/status`, or `-` when this build has no breaker."""
    for tenant in status.get("tenants", []):
        if tenant.get("id") == tenant_id:
            breaker = tenant.get("breaker")
            if isinstance(breaker, dict):
                return str(breaker.get("state", "-"))
            return str(breaker) if breaker else "-"
    return "-"


def _phase(chat: str, seconds: float, a: str) -> tuple[Paced, Flood | None]:
    """B paced for `seconds` while A does nothing, floods, or sends 20/s too (`a`)."""
    other: subprocess.Popen[str] | None = None
    if a == "flood":
        # The flood outlasts B's window: B's client needs a moment to start.
        other = start_flood(chat, KEY_A, seconds + 3)
        time.sleep(0.3)  # let the flood reach full speed before B's window opens
    elif a == "paced":
        other = start_paced(chat, KEY_A, seconds, A_ADDRESS)
    b = _parse_paced(start_paced(chat, KEY_B, seconds, B_ADDRESS).communicate()[0])
    if other is None:
        return b, None
    out = other.communicate()[0]
    return b, _parse_flood(out) if a == "flood" else _parse_paced(out).traffic()


def run(workdir: Path, rounds: int, seconds: float) -> list[list[str]]:
    """Measure B alone vs B under A's flood (median of rounds), then with A's agent hung."""
    # Every process shares the machine's cores: a busy machine shows up as B's latency.
    print(f"fairness: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    agent_a, port_a = _start_agent()
    agent_b, port_b = _start_agent()
    url_a, url_b = (f"http://127.0.0.1:{p}/agent" for p in (port_a, port_b))
    gateway, port, _ = start_gateway(workdir, gateway_config(workdir, url_a, url_b),
                                     name="fairness")
    base = f"http://127.0.0.1:{port}"
    chat = f"{base}/api/chat"
    alone: list[Paced] = []
    flooded: list[tuple[Paced, Flood]] = []
    hung: list[tuple[str, Paced, Flood, str]] = []
    try:
        for key in (KEY_A, KEY_B):  # warm up: connections, sessions, caches
            _post(chat, b'{"message":"hi","userId":"warm"}', key)
        for _ in range(rounds):
            alone.append(_phase(chat, seconds, "none")[0])
            b, a = _phase(chat, seconds, "flood")
            assert a is not None
            flooded.append((b, a))
        _post(f"http://127.0.0.1:{port_a}/control?hang=1")
        for mode, label in (("paced", "A's agent hung, A at 20/s"),
                            ("flood", "A's agent hung, A floods")):
            b, a = _phase(chat, seconds, mode)
            assert a is not None
            state = breaker_state(_get(f"{base}/admin/status", ADMIN), "tenant-a")
            hung.append((label, b, a, state))
    finally:
        for proc in (gateway, agent_a, agent_b):
            proc.stop()
    return rows(alone, flooded, hung)


def rows(alone: list[Paced], flooded: list[tuple[Paced, Flood]],
         hung: list[tuple[str, Paced, Flood, str]]) -> list[list[str]]:
    """The printed table: B's figures per phase; A's answered rate, refusals, breaker."""
    q99 = statistics.median(p.p99_ms for p in alone)
    configured = (f"{A_RATE_PER_MINUTE / 60:.0f}/s, burst {A_BURST}" if _has_limits()
                  else "unlimited")
    if _has_pacing():
        configured += f", max_wait {A_MAX_WAIT:g} s"

    def a_cells(a: Flood, state: str) -> list[str]:
        return [f"{a.ok / a.seconds:,.0f}/s", configured, f"{a.limited:,}", f"{a.other:,}",
                state]

    def b_cells(b: list[Paced]) -> list[str]:
        p99 = statistics.median(p.p99_ms for p in b)
        return [f"{statistics.median(p.p50_ms for p in b):.1f}", f"{p99:.1f}",
                f"{p99 / max(q99, 1e-6):.2f}x", str(sum(p.errors for p in b))]

    a_all = Flood(sum(a.requests for _, a in flooded), sum(a.seconds for _, a in flooded),
                  sum(a.ok for _, a in flooded), sum(a.limited for _, a in flooded))
    return [
        ["B alone", *b_cells(alone), "-", "-", "-", "-", "-"],
        ["A floods", *b_cells([b for b, _ in flooded]), *a_cells(a_all, "-")],
        *([label, *b_cells([b]), *a_cells(a, state)] for label, b, a, state in hung),
    ]


HEADER = ["phase (B at 20/s)", "B p50 ms", "B p99 ms", "B p99 vs alone", "B errors",
          "A 200s", "A configured", "A 429s", "A other", "A breaker"]


def _start_agent() -> tuple[Proc, int]:
    proc = Proc([sys.executable, "-m", "bench.fairness", "agent"])
    return proc, proc.read_port()


def main() -> None:
    kind = sys.argv[1]
    if kind == "agent":
        from bench.servers import serve

        try:
            asyncio.run(serve(agent_app()))
        except KeyboardInterrupt:
            pass
    elif kind == "paced":
        url, key, rate, seconds, address = sys.argv[2:7]
        r = asyncio.run(paced(url, key, float(rate), float(seconds), address))
        print(f"RESULT {r.sent} {r.seconds} {r.p50_ms} {r.p99_ms} {r.errors} {r.limited}")
    elif kind == "flood":
        url, key, connections, seconds = sys.argv[2:6]
        flood = asyncio.run(flood_python(url, key, int(connections), float(seconds)))
        print(f"RESULT {flood.requests} {flood.seconds} {flood.ok} {flood.limited}")
    else:
        raise SystemExit(f"unknown part {kind!r}")


if __name__ == "__main__":
    main()
