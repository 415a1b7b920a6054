"""The notify protocol as systemd sees it: datagrams on a NOTIFY_SOCKET the test binds."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chatgateway import supervisor as supervisor_module
from chatgateway.models import Platform
from chatgateway.notify import Notifier
from tests.conftest import tenant


class NotifyListener:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append(fields)
                self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[list[dict[str, str]]], bool], timeout: float = 20.0
    ) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"notify messages so far: {self.messages}")
                self._cond.wait(remaining)
            return list(self.messages)

    def count(self, key: str) -> int:
        with self._cond:
            return sum(1 for m in self.messages if key in m)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # AF_UNIX paths are limited to 108 bytes
        path = Path("/tmp") / f"cgw-notify-{uuid.uuid4().hex[:8]}.sock"
    listener = NotifyListener(str(path))
    yield listener
    listener.close()
    path.unlink(missing_ok=True)


def index_of(messages: list[dict[str, str]], key: str, start: int = 0) -> int:
    return next(i for i in range(start, len(messages)) if key in messages[i])


def test_ready_status_watchdog_reloading_and_stopping(gateway_process, notify_socket):
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"}
    proc = gateway_process({"tenants": [tenant("acme"), tenant("globex")]}, env)

    messages = notify_socket.wait_for(lambda ms: any("READY" in m for m in ms))
    ready = messages[index_of(messages, "READY")]
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("2 tenant(s); adapters: 0 up, 0 parked"), ready
    # WATCHDOG_USEC=0.4 s: pings every 0.2 s from the health task.
    notify_socket.wait_for(lambda ms: sum("WATCHDOG" in m for m in ms) >= 3)
    assert all(m["WATCHDOG"] == "1" for m in notify_socket.messages if "WATCHDOG" in m)

    proc.signal(signal.SIGHUP)
    proc.wait_for_event("config_reloaded")
    messages = notify_socket.wait_for(
        lambda ms: any("RELOADING" in m for m in ms)
        and any("READY" in m for m in ms[index_of(ms, "RELOADING") :])
    )
    reloading = messages[index_of(messages, "RELOADING")]
    assert reloading["RELOADING"] == "1"
    # MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds (shared by every process on the host).
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now_usec - int(reloading["MONOTONIC_USEC"]) < 60_000_000

    proc.signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0
    stopping = notify_socket.wait_for(lambda ms: any("STOPPING" in m for m in ms))
    last = stopping[index_of(stopping, "STOPPING")]
    assert last["STOPPING"] == "1" and last["STATUS"].startswith("Draining")


def test_no_watchdog_pings_without_watchdog_usec(notify_socket):
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.enabled and notifier.watchdog_interval is None
    other_pid = Notifier(
        {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert other_pid.watchdog_interval is None, "WATCHDOG_PID names another process"
    mine = Notifier(
        {
            "NOTIFY_SOCKET": notify_socket.address,
            "WATCHDOG_USEC": "1000000",
            "WATCHDOG_PID": str(os.getpid()),
        }
    )
    assert mine.watchdog_interval == 0.5
    assert not Notifier({}).enabled and Notifier({}).send(READY=1) is False


def test_abstract_socket_address_and_multiline_status():
    name = f"@cgw-test-{uuid.uuid4().hex}"
    listener = NotifyListener(name)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": name})
        assert notifier.ready("line one\nline two")
        (message,) = listener.wait_for(lambda ms: len(ms) == 1)
        assert message == {"READY": "1", "STATUS": "line one line two"}
        notifier.close()
    finally:
        listener.close()


def test_a_vanished_socket_never_breaks_the_gateway(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.send(WATCHDOG=1) is False
    assert notifier.send(WATCHDOG=1) is False
    notifier.close()


async def test_watchdog_pings_stop_while_an_adapter_is_wedged(
    make_gateway, notify_socket, monkeypatch
):
    """A wedged adapter the supervisor cannot restart withholds WATCHDOG=1 (systemd restarts)."""
    from tests.test_lifecycle_supervisor import ScriptedAdapter, wait_until

    ScriptedAdapter.instances = []
    released = ScriptedAdapter.released = asyncio.Event()
    monkeypatch.setitem(
        supervisor_module.ADAPTERS,
        Platform.DISCORD,
        "tests.test_lifecycle_supervisor:ScriptedAdapter",
    )
    monkeypatch.setattr(supervisor_module, "ALIVE_GRACE", 0.05)
    monkeypatch.setattr(supervisor_module, "STOP_TIMEOUT", 0.05)
    wedged = tenant("acme", discord={"bots": [{"token": {"value": "wedge:token-123456"}}]})
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"}
    try:
        daemon = await make_gateway({"tenants": [wedged, tenant("globex")]}, env)

        await wait_until(lambda: bool(daemon._health_problems), within=20)
        assert "ignores cancellation" in daemon._health_problems[0]
        before = notify_socket.count("WATCHDOG")
        await asyncio.sleep(0.6)  # six ping intervals: none may arrive
        assert notify_socket.count("WATCHDOG") == before

        released.set()
        await asyncio.to_thread(
            notify_socket.wait_for, lambda ms: sum("WATCHDOG" in m for m in ms) > before + 1
        )
        assert not daemon._health_problems
    finally:
        released.set()
