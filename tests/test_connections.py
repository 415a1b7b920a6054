"""Connection caps and read timeouts (issue 12): the real daemon under a slowloris.

The daemon runs with a file limit of 64, as in the issue. Attackers connect from 127.0.0.2 (any
127.0.0.0/8 address is this host), real clients from 127.0.0.1, so the per-address cap is what
keeps /healthz and the chat API answering.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.web.server import (
    LogBudget,
    address_key,
    canned_response,
    connection_ceiling,
)
from chatgateway.config import load_config
from chatgateway.errors import ConfigError
from tests.conftest import tenant, write_config
from tests.process import GatewayProcess

KEY = "acme-connections-key-0123456789"
FILE_LIMIT = 64
ATTACKER = "127.0.0.2"


def _low_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))


@pytest.fixture
def limited_gateway(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], GatewayProcess]]:
    """Start the real daemon with RLIMIT_NOFILE 64 and these `server` settings."""
    procs: list[GatewayProcess] = []

    def start(server: dict[str, Any]) -> GatewayProcess:
        config = {"server": server, "tenants": [tenant("acme", keys=[KEY])]}
        proc = GatewayProcess(write_config(tmp_path, config), preexec_fn=_low_file_limit)
        procs.append(proc)
        proc.wait_started()
        return proc

    yield start
    for proc in procs:
        if proc.proc.poll() is None:
            proc.kill()


async def fresh_get(gw: GatewayProcess, path: str) -> tuple[int, str, float]:
    """GET on a new connection from 127.0.0.1: status, body, seconds taken."""
    started = time.monotonic()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(gw.url + path, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status, await resp.text(), time.monotonic() - started


async def chat(gw: GatewayProcess, text: str) -> tuple[dict[str, Any], float]:
    """A real chat request on a new connection from 127.0.0.1: the answer and seconds taken."""
    started = time.monotonic()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(
            gw.url + "/api/chat",
            # A user per request: the per-user message rate is not what is tested here.
            json={"message": text, "userId": f"real-user-{text}"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json(), time.monotonic() - started


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def metrics(gw: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body, _ = await fresh_get(gw, "/metrics")
    assert status == 200
    return metric_values(body)


# A slowloris -------------------------------------------------------------------------------

#: What an attacking connection sends and then holds: half the headers; whole headers and half
#: the body; or one whole request, after which it stays idle on the kept-alive connection.
PAYLOADS = {
    "headers": b"POST /api/chat HTTP/1.1\r\nHost: gateway\r\nContent-Type: app",
    "body": (
        b"POST /api/chat HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 200\r\n\r\n"
        b'{"message": "hel'
    ),
    "idle": b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n",
}


@dataclass
class Held:
    """One attacking connection as its client saw it."""

    kind: str
    answer: bytes
    #: Seconds from the connection to the server's close.
    lasted: float


async def hold(port: int, kind: str) -> Held:
    """Connect from the attacker's address, send the kind's bytes, read until the server closes."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(ATTACKER, 0)
    )
    answer = b""
    try:
        writer.write(PAYLOADS[kind])
        await writer.drain()
        while chunk := await reader.read(4096):
            answer += chunk
    except ConnectionError:
        pass  # refused: closed with our request still unread
    finally:
        writer.close()
    return Held(kind, answer, time.monotonic() - started)


async def slowloris(port: int, stop: asyncio.Event, tasks: int, out: list[Held]) -> None:
    """`tasks` loops each holding one connection at a time, reconnecting as soon as it is closed."""

    async def loop(i: int) -> None:
        kind = list(PAYLOADS)[i % len(PAYLOADS)]
        while not stop.is_set():
            out.append(await hold(port, kind))
            await asyncio.sleep(0.02)  # a reconnect storm, not a busy loop on our own 2 cores

    await asyncio.gather(*(loop(i) for i in range(tasks)))


async def test_slowloris_from_one_address_leaves_healthz_and_chat_answering(limited_gateway):
    timeouts = {"header_timeout": 1.0, "body_timeout": 1.5, "keepalive_timeout": 1.0}
    per_address = 8
    gw = limited_gateway({**timeouts, "max_connections_per_address": per_address})
    assert gw.port is not None
    lines_before = len(gw.lines)

    stop = asyncio.Event()
    held: list[Held] = []
    # More connections than the file limit allows at once: 45 + 14 in use > 64.
    attack = asyncio.create_task(slowloris(gw.port, stop, 45, held))
    open_seen: list[float] = []
    try:
        deadline = time.monotonic() + 5.0
        turn = 0
        while time.monotonic() < deadline:
            status, body, took = await fresh_get(gw, "/healthz")
            assert status == 200, body
            assert took < 2.0, f"/healthz took {took:.2f} s under the slowloris"
            answer, took = await chat(gw, f"hello {turn}")
            assert answer["response"] == f"echo: hello {turn}"
            assert took < 2.0, f"a chat request took {took:.2f} s under the slowloris"
            values = await metrics(gw)
            open_seen.append(values[("chatgateway_connections_open", ())])
            turn += 1
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(attack, 15)

    assert turn >= 5
    values = await metrics(gw)
    # The attacker's address never held more than its cap (plus our own metrics request).
    assert max(open_seen) <= per_address + 1
    assert values[("chatgateway_connections_max_per_address", ())] == per_address
    refused = values[
        ("chatgateway_connections_refused_total", (("reason", "max_connections_per_address"),))
    ]
    assert refused > 0
    assert values[("chatgateway_connections_timed_out_total", (("phase", "headers"),))] > 0
    assert values[("chatgateway_connections_timed_out_total", (("phase", "body"),))] > 0

    slack = 1.5  # scheduling on a loaded 2-core machine
    admitted = [h for h in held if not h.answer.startswith(b"HTTP/1.1 503")]
    refusals = [h for h in held if h.answer.startswith(b"HTTP/1.1 503")]
    assert refusals and all(b'"too_many_connections"' in h.answer for h in refusals)
    assert all(h.lasted < slack for h in refusals)
    by_kind = {kind: [h for h in admitted if h.kind == kind and h.answer] for kind in PAYLOADS}
    for kind, limit in (("headers", 1.0), ("body", 1.5)):
        assert by_kind[kind], f"no {kind} connection was admitted"
        for h in by_kind[kind]:
            assert h.answer.startswith(b"HTTP/1.1 408"), h.answer
            assert b'"request_timeout"' in h.answer
            assert limit - 0.1 <= h.lasted < limit + slack, (kind, h.lasted)
    assert by_kind["idle"], "no idle keep-alive connection was admitted"
    for h in by_kind["idle"]:
        # Answered, then closed by the keep-alive timeout.
        assert h.answer.startswith(b"HTTP/1.1 200"), h.answer
        assert 1.0 - 0.1 <= h.lasted < 1.0 + slack, h.lasted

    # The log stays small: a few rate-limited lines, not one (or 128) per connection. (Each
    # real chat request logs its message_handled line.)
    new_lines = [line for line in gw.lines[lines_before:] if "message_handled" not in line]
    written = sum(len(line) + 1 for line in new_lines)
    assert len(new_lines) <= 6, "\n".join(new_lines)
    assert written < 3000
    assert len(held) > 200  # it was a real storm
    assert gw.stop() == 0


async def test_idle_connections_from_many_addresses_give_way_to_new_clients(limited_gateway):
    """At the total cap, connections without a request in progress make room for new ones."""
    gw = limited_gateway(
        {"header_timeout": 60, "keepalive_timeout": 60, "max_connections_per_address": 0}
    )
    assert gw.port is not None
    values = await metrics(gw)
    cap = int(values[("chatgateway_connections_max", ())])
    assert 0 < cap <= FILE_LIMIT - 16  # lowered: at least 16 descriptors stay for the rest
    # Fill every slot from many addresses: half-sent headers, and idle kept-alive connections.
    attackers = []
    for i in range(cap):
        source = (f"127.0.2.{i + 1}", 0)
        sock = socket.create_connection(("127.0.0.1", gw.port), source_address=source)
        sock.sendall(PAYLOADS["headers" if i % 2 else "idle"])
        attackers.append(sock)
    try:
        for turn in range(5):
            status, _, took = await fresh_get(gw, "/healthz")
            assert status == 200
            assert took < 2.0
            answer, took = await chat(gw, f"room {turn}")
            assert answer["response"] == f"echo: room {turn}"
            assert took < 2.0
        values = await metrics(gw)
        # One slot was made and then reused: our clients close their connections after use.
        assert values[("chatgateway_connections_evicted_total", ())] >= 1
        assert values[("chatgateway_connections_refused_total", (("reason", "max_connections"),))] == 0
    finally:
        for sock in attackers:
            sock.close()
    assert gw.stop() == 0


async def test_per_address_cap_refuses_one_address_while_another_is_served(limited_gateway):
    gw = limited_gateway({"max_connections_per_address": 4, "header_timeout": 30})
    assert gw.port is not None
    held = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", gw.port), source_address=(ATTACKER, 0))
        held.append(sock)
    values = await _wait_for_open(gw, 4)
    assert values[("chatgateway_connections_max_per_address", ())] == 4

    extra = socket.create_connection(("127.0.0.1", gw.port), source_address=(ATTACKER, 0))
    extra.settimeout(5)
    answer = extra.recv(4096)
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable"), answer
    assert b'{"error":{"code":"too_many_connections"' in answer
    assert extra.recv(4096) == b""  # and closed
    extra.close()

    # Another address is served meanwhile.
    status, _, _ = await fresh_get(gw, "/healthz")
    assert status == 200

    # A slot freed is a slot given again.
    held.pop().close()
    await _wait_for_open(gw, 3)
    again = socket.create_connection(("127.0.0.1", gw.port), source_address=(ATTACKER, 0))
    again.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
    again.settimeout(5)
    assert again.recv(4096).startswith(b"HTTP/1.1 200")
    for sock in [*held, again]:
        sock.close()
    refusals = [e for e in gw.events() if e.get("event") == "connections_refused"]
    assert len(refusals) == 1
    assert refusals[0]["address"] == ATTACKER
    assert refusals[0]["reason"] == "max_connections_per_address"
    assert gw.stop() == 0


async def _wait_for_open(gw: GatewayProcess, count: int) -> dict[Any, float]:
    """Wait until the daemon counts `count` open connections besides the metrics request."""
    deadline = time.monotonic() + 10
    while True:
        values = await metrics(gw)
        if values[("chatgateway_connections_open", ())] == count + 1:
            return values
        assert time.monotonic() < deadline, values[("chatgateway_connections_open", ())]
        await asyncio.sleep(0.05)


def test_accept_errors_are_logged_once_per_interval(limited_gateway):
    """A backlog past the file limit makes accept() fail with EMFILE: one log line, not hundreds."""
    gw = limited_gateway({"max_connections_per_address": 0})
    assert gw.port is not None
    # While the daemon is stopped the kernel completes these handshakes on its own; on
    # SIGCONT asyncio accepts the whole backlog in one go, past the 64 descriptors.
    gw.signal(signal.SIGSTOP)
    socks = []
    try:
        for _ in range(70):
            socks.append(socket.create_connection(("127.0.0.1", gw.port)))
    finally:
        gw.signal(signal.SIGCONT)
    try:
        first = gw.wait_for_event("accept_failed", timeout=10)
        assert first["errno"] == "EMFILE"
    finally:
        for sock in socks:
            sock.close()
    # Once the held connections are gone, /metrics is answered again.
    deadline = time.monotonic() + 10
    while True:
        status, body, _ = asyncio.run(fresh_get(gw, "/metrics"))
        if status == 200:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    # asyncio reports every connection left in the backlog: each was counted, one was logged.
    assert metric_values(body)[("chatgateway_accept_errors_total", ())] > 20
    assert len([line for line in gw.lines if "accept_failed" in line]) == 1
    assert not [line for line in gw.lines if "out of system resource" in line]
    assert gw.stop() == 0


async def test_clients_leaving_mid_body_leave_no_log_lines(limited_gateway):
    """An abandoned half-sent body is cancelled quietly, not one traceback per connection."""
    gw = limited_gateway({})
    assert gw.port is not None
    lines_before = len(gw.lines)
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(PAYLOADS["body"])
        await _wait_for_open(gw, 1)  # the request is being read
        sock.close()
    await _wait_for_open(gw, 0)
    answer, _ = await chat(gw, "still here")
    assert answer["response"] == "echo: still here"
    assert [line for line in gw.lines[lines_before:] if "message_handled" not in line] == []
    assert gw.stop() == 0


async def test_a_reload_applies_new_caps_and_timeouts_to_new_connections(make_gateway, tmp_path):
    config = {"server": {"max_connections_per_address": 2}, "tenants": [tenant("acme")]}
    gw = await make_gateway(config)
    port = gw.port
    assert port is not None

    async def refused() -> bool:
        """Open one more idle connection from the attacker's address: was it refused?"""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(ATTACKER, 0)
        )
        held.append(writer)
        try:
            answer = await asyncio.wait_for(reader.read(4096), 0.5)
        except TimeoutError:
            return False
        return answer.startswith(b"HTTP/1.1 503")

    held: list[asyncio.StreamWriter] = []
    try:
        assert not await refused()
        assert not await refused()
        assert await refused()
        write_config(
            tmp_path,
            {**config, "server": {"max_connections_per_address": 4, "header_timeout": 0.3}},
            "gateway-0.yaml",
        )
        await gw.reload()
        assert not await refused()
        # The new header timeout closes the connection made after the reload.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(ATTACKER, 0)
        )
        held.append(writer)
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(4096), 5)
        assert answer.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 2
    finally:
        for writer in held:
            writer.close()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("header_timeout", 0),
        ("body_timeout", -1),
        ("keepalive_timeout", "soon"),
        ("max_connections", 0),
        ("max_connections_per_address", -1),
    ],
)
def test_bad_connection_settings_name_their_key(tmp_path: Path, key: str, value: Any) -> None:
    path = write_config(tmp_path, {"server": {key: value}, "tenants": [tenant("acme")]})
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert [(p.file, p.path) for p in info.value.problems] == [(str(path), f"server.{key}")]


# Pure parts --------------------------------------------------------------------------------


def test_address_key_counts_ipv4_addresses_and_ipv6_networks() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"


def test_connection_ceiling_leaves_descriptors_for_the_rest() -> None:
    assert connection_ceiling(64, 14) == 34  # 50 free, 16 kept back
    assert connection_ceiling(1024, 24) == 750  # a quarter of 1000 kept back
    assert connection_ceiling(20, 19) == 1


def test_log_budget_allows_one_line_per_interval_and_counts_the_rest() -> None:
    budget = LogBudget(10.0)
    assert budget.take(100.0) == 0
    assert budget.take(101.0) is None
    assert budget.take(109.9) is None
    assert budget.take(110.0) == 2
    assert budget.take(110.5) is None


def test_canned_response_is_a_complete_json_error() -> None:
    raw = canned_response(408, "Request Timeout", "request_timeout", "too slow")
    head, body = raw.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert body == b'{"error":{"code":"request_timeout","message":"too slow"}}'
