"""One load generator for every target: wrk when installed (C, cheap), else an aiohttp client.

Either way it runs in its own process, sends `POST {"message", "userId"}` bodies spread over
1,000 users, and reports requests, duration, p50/p99 latency and errors.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

USERS = 1000

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%(auth)s
local counter = 0
request = function()
  counter = counter + 1
  local body = '{"message":"hello","userId":"u' .. (counter %% %(users)d) .. '"}'
  return wrk.format(nil, nil, nil, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status + e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


#: "auto" (wrk when installed), "wrk" or "python"; set by `python -m bench --loadgen`.
CHOICE = "auto"


def which() -> str:
    if CHOICE == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    return CHOICE


def run(url: str, concurrency: int, seconds: float, key: str | None = None) -> LoadResult:
    """Drive `url` with `concurrency` connections for `seconds`."""
    if which() == "wrk":
        return _run_wrk(url, concurrency, seconds, key)
    cmd = [sys.executable, "-m", "bench.loadgen", url, str(concurrency), str(seconds), key or ""]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return _parse(out, micro=False)


def _run_wrk(url: str, concurrency: int, seconds: float, key: str | None) -> LoadResult:
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_WRK_SCRIPT % {"auth": auth, "users": USERS})
        threads = 1 if concurrency < 4 else 2
        cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
               "--timeout", "10s", "-s", str(script), url]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return _parse(out, micro=True)


def _parse(out: str, *, micro: bool) -> LoadResult:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            requests, duration, p50, p99, errors = (float(x) for x in line.split()[1:])
            scale = 1000.0 if micro else 1.0
            seconds = duration / 1e6 if micro else duration
            return LoadResult(int(requests), seconds, p50 / scale, p99 / scale, int(errors))
    raise RuntimeError(f"load generator printed no result:\n{out}")


async def _python_load(url: str, concurrency: int, seconds: float, key: str) -> None:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, counter
        while time.perf_counter() < deadline:
            counter += 1
            body = f'{{"message":"hello","userId":"u{counter % USERS}"}}'
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append((time.perf_counter() - start) * 1000)

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2] if latencies else 0.0
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    print(f"RESULT {len(latencies)} {elapsed} {p50} {p99} {errors}")


if __name__ == "__main__":
    asyncio.run(_python_load(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]))
