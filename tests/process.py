"""Run the real `chatgateway` daemon as a child process, the way systemd would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """`python -m chatgateway run --config PATH` with its stdout captured line by line."""

    def __init__(self, config: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None,
                 preexec_fn: Callable[[], Any] | None = None) -> None:
        self.config = config
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHATGATEWAY_")}
        full_env.pop("NOTIFY_SOCKET", None)
        full_env["PYTHONPATH"] = str(ROOT)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatgateway", *(args or ["run", "--config", str(config)])],
            cwd=config.parent,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=preexec_fn,  # e.g. a lower file limit (tests/test_connections.py)
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        self.proc.stdout.close()
        with self._cond:
            self._cond.notify_all()

    def events(self) -> list[dict[str, Any]]:
        out = []
        with self._cond:
            lines = list(self.lines)
        for line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                out.append(item)
        return out

    def wait_for_event(self, name: str, timeout: float = 20.0, **fields: Any) -> dict[str, Any]:
        """Wait for a log line with this event name (and fields); fail if the process exits."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events_unlocked():
                    if event.get("event") == name and all(
                        event.get(k) == v for k, v in fields.items()
                    ):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no {name!r} event; exit={self.proc.poll()}; output:\n" + self.output()
                    )
                self._cond.wait(min(remaining, 0.2))

    def events_unlocked(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                out.append(item)
        return out

    def wait_started(self, timeout: float = 30.0) -> int:
        event = self.wait_for_event("gateway_started", timeout)
        self.port = int(event["port"])
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
