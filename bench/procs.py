"""Start and stop the processes a benchmark needs; read their CPU time and memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")


class Proc:
    def __init__(self, cmd: list[str], *, log: Path | None = None, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self._log: IO[str] | None = log.open("w") if log else None
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        self.popen = subprocess.Popen(
            cmd, cwd=cwd or ROOT, env=full_env, text=True,
            stdout=self._log or subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.pid = self.popen.pid

    def read_port(self, timeout: float = 30) -> int:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.popen.args} exited: {self.popen.wait()}")
            if line.startswith("PORT "):
                return int(line.split()[1])
        raise TimeoutError("no port")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if self._log is not None:
            self._log.close()


def start_server(kind: str, *args: str) -> tuple[Proc, int]:
    proc = Proc([sys.executable, "-m", "bench.servers", kind, *args])
    return proc, proc.read_port()


def start_gateway(workdir: Path, config: dict[str, Any], name: str = "gateway",
                  timeout: float = 120) -> tuple[Proc, int, float]:
    """Start `chatgateway run`; return the process, its port and seconds until it was serving."""
    workdir.mkdir(parents=True, exist_ok=True)
    config.setdefault("listen", {"host": "127.0.0.1", "port": 0})
    config.setdefault("logging", {"level": "info", "format": "json"})
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / f"{name}.log"
    started = time.perf_counter()
    proc = Proc([sys.executable, "-m", "chatgateway", "run", "--config", str(path)], log=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "gateway_started":
                return proc, int(event["port"]), time.perf_counter() - started
        if proc.popen.poll() is not None:
            raise RuntimeError(f"gateway exited {proc.popen.returncode}:\n{log.read_text()}")
        time.sleep(0.01)
    proc.stop()
    raise TimeoutError(f"gateway did not start:\n{log.read_text()}")
