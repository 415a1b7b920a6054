"""The web server's connection guard: read timeouts, connection caps, quiet accept errors.

aiohttp's server has a keep-alive timeout but no deadline for a request's headers or body, and
no cap on open connections, so a slowloris of half-sent requests used to hold every file
descriptor until `accept()` failed with EMFILE. Here every connection is counted (in total and
per client address) when it is made and refused at once past a cap (at the total cap, the oldest
connection still waiting for a request is closed instead, to make room); one timer per
connection closes it when its first request's headers, or a request's body, are not complete in
time; and the event loop's accept errors are logged at most once per interval. The caps sit
below the process's file limit, so accept should not run out of descriptors in the first place.
docs/security.md ("Connections and timeouts") explains the defaults.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapters.web.app import JsonErrorRequestHandler
from chatgateway import codec
from chatgateway.config import ServerConfig

log = structlog.get_logger("chatgateway.web")

#: At most one `connections_refused` / `accept_failed` line per this many seconds.
LOG_INTERVAL = 10.0
#: Descriptors left for everything but client connections (store, agent pools, adapters):
#: a quarter of what is free at start-up, and never fewer than this.
MIN_RESERVED_FDS = 16
#: The soft file limit is raised to the hard one, but not past this (systemd's default hard
#: limit is 524288; a descriptor table that large is of no use to one event loop).
MAX_FILE_LIMIT = 1 << 20
#: accept() errors that mean "out of descriptors or memory" (asyncio retries after 1 s).
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Settings = Callable[[], ServerConfig]


# Pure helpers ------------------------------------------------------------------------------


def address_key(host: str) -> str:
    """The key a client address is counted under: the IPv4 address or the IPv6 /64."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:  # a dual-stack listener sees IPv4 clients like this
        return str(address.ipv4_mapped)
    # One IPv6 client usually holds a whole /64: counting single addresses would let it
    # open a connection from each of 2**64 of them.
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def connection_ceiling(file_limit: int, in_use: int) -> int:
    """The most client connections a process with this file limit can hold safely."""
    free = file_limit - in_use
    return max(1, free - max(MIN_RESERVED_FDS, free // 4))


def canned_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error answer with the JSON error body, closing the connection."""
    body = codec.dumps({"error": {"code": code, "message": message}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class LogBudget:
    """Allows one log line per interval and counts the ones it held back."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self.suppressed = 0
        self._next = 0.0

    def take(self, now: float) -> int | None:
        """Return the count held back since the last line if a line may go out now, else None."""
        if now < self._next:
            self.suppressed += 1
            return None
        self._next = now + self.interval
        held, self.suppressed = self.suppressed, 0
        return held


# File limit --------------------------------------------------------------------------------


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped); return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_FILE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, MAX_FILE_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # a sandbox may forbid it; the current limit then stands
    return MAX_FILE_LIMIT if soft == resource.RLIM_INFINITY else soft


def open_descriptors() -> int:
    """How many file descriptors this process has open now (0 where it cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself used
    except OSError:
        return 0


# The guard ---------------------------------------------------------------------------------


class Connection(Protocol):
    """What the guard needs of a connection: is it waiting for a request, and closing it."""

    def idle(self) -> bool: ...

    def evict(self) -> None: ...


class ConnectionGuard:
    """Counts open connections, decides admissions, and keeps the numbers /metrics shows."""

    def __init__(self, settings: Settings, ceiling: int) -> None:
        self.settings = settings
        #: Connections above this would eat into the descriptors reserved for the rest.
        self.ceiling = ceiling
        #: Every admitted connection with its address key, oldest first.
        self.connections: dict[Connection, str] = {}
        self.by_address: dict[str, int] = {}
        self.refused = {"max_connections": 0, "max_connections_per_address": 0}
        self.evicted = 0
        self.timed_out = {"headers": 0, "body": 0}
        self.accept_errors = 0
        self._refusal_log = LogBudget()

    @property
    def open(self) -> int:
        """Admitted connections not yet closed."""
        return len(self.connections)

    @property
    def max_connections(self) -> int:
        """The cap in force: the configured one, lowered to fit the file limit."""
        return min(self.settings().max_connections, self.ceiling)

    @property
    def max_per_address(self) -> int:
        """The per-address cap in force (0: none): at most half of max_connections."""
        configured = self.settings().max_connections_per_address
        return configured and min(configured, max(1, self.max_connections // 2))

    def admit(self, connection: Connection, key: str) -> bool:
        """Count a new connection from this address key, or refuse it (False) over a cap."""
        settings = self.settings()
        total = min(settings.max_connections, self.ceiling)
        # One address never gets more than half of the total, so it cannot lock out the rest
        # (/healthz and real clients) even where the file limit lowered the total.
        per_address = settings.max_connections_per_address and min(
            settings.max_connections_per_address, max(1, total // 2)
        )
        reason = None
        if per_address and self.by_address.get(key, 0) >= per_address:
            reason = "max_connections_per_address"
        elif self.open >= total and not self._evict_idle():
            reason = "max_connections"
        if reason is None:
            self.connections[connection] = key
            self.by_address[key] = self.by_address.get(key, 0) + 1
            return True
        self.refused[reason] += 1
        held = self._refusal_log.take(time.monotonic())
        if held is not None:
            # The address is the refused client's, which the operator needs to act on; the
            # line goes out at most once per LOG_INTERVAL whatever the attack's rate.
            log.warning(
                "connections_refused",
                reason=reason,
                address=key,
                open=self.open,
                limit=total if reason == "max_connections" else per_address,
                suppressed=held,
            )
        return False

    def _evict_idle(self) -> bool:
        """Close the oldest connection that waits for a request, to make room; False if none.

        At the cap, a connection that has not sent a whole request (or sits idle between two)
        gives way to a new one, so connections from many addresses that never finish a request
        cannot keep new clients out; one whose request is being read or answered is never
        closed. Scans only at the cap.
        """
        for connection in self.connections:
            if connection.idle():
                self.evicted += 1
                connection.evict()
                return True
        return False

    def release(self, connection: Connection) -> None:
        """Forget a closed connection (again: nothing)."""
        key = self.connections.pop(connection, None)
        if key is None:
            return
        left = self.by_address[key] - 1
        if left:
            self.by_address[key] = left
        else:
            del self.by_address[key]


class ConnectionCollector(Collector):
    """Exports the guard's numbers at scrape time (nothing is updated per request)."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        guard = self.guard
        yield GaugeMetricFamily(
            "chatgateway_connections_open", "Open client connections", value=guard.open
        )
        yield GaugeMetricFamily(
            "chatgateway_connections_max",
            "The connection cap in force (server.max_connections, lowered to fit the file limit)",
            value=guard.max_connections,
        )
        yield GaugeMetricFamily(
            "chatgateway_connections_max_per_address",
            "The per-address connection cap in force (0: none)",
            value=guard.max_per_address,
        )
        refused = CounterMetricFamily(
            "chatgateway_connections_refused",
            "Connections closed at once because a cap was reached",
            labels=["reason"],
        )
        for reason, count in guard.refused.items():
            refused.add_metric([reason], count)
        yield refused
        timed_out = CounterMetricFamily(
            "chatgateway_connections_timed_out",
            "Connections closed because a request's headers or body did not arrive in time",
            labels=["phase"],
        )
        for phase, count in guard.timed_out.items():
            timed_out.add_metric([phase], count)
        yield timed_out
        yield CounterMetricFamily(
            "chatgateway_connections_evicted",
            "Connections waiting for a request closed at the cap to make room for a new one",
            value=guard.evicted,
        )
        yield CounterMetricFamily(
            "chatgateway_accept_errors",
            "accept() failures for lack of file descriptors or memory",
            value=guard.accept_errors,
        )


# The protocol ------------------------------------------------------------------------------

_HEADERS, _BODY, _DONE = 0, 1, 2


class GuardedRequestHandler(JsonErrorRequestHandler):  # parser errors as JSON
    """aiohttp's protocol plus admission, a header deadline and a body deadline."""

    __slots__ = ("_deadline", "_guard", "_next_factory", "_payload", "_phase", "_timer")

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._phase = _HEADERS
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._payload: StreamReader | None = None
        # Wrapping the request factory gives one call per request, when its headers are
        # complete, instead of a check per received chunk.
        self._next_factory = self._request_factory
        self._request_factory = self._request_started

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        key = address_key(str(peer[0])) if isinstance(peer, tuple) and peer else "unknown"
        if not self._guard.admit(self, key):
            # Refused before aiohttp saw it: no request task, no parser work, descriptor
            # freed at once. The answer reaches clients that read it before the close.
            self._manager = None  # so connection_lost does nothing
            transport.write(  # type: ignore[attr-defined]
                canned_response(
                    503, "Service Unavailable", "too_many_connections",
                    "too many open connections; try again later",
                )
            )
            transport.close()
            return
        super().connection_made(transport)
        if self._keepalive_handle is not None:
            # aiohttp arms its keep-alive timer for the first request too; here header_timeout
            # governs the first request, keepalive_timeout the wait for each later one.
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        timeout = self._guard.settings().header_timeout
        self._deadline = self._loop.time() + timeout
        self._timer = self._loop.call_at(self._deadline, self._on_deadline)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if (
            self._phase == _BODY
            and self._payload is not None
            and not self._payload.is_eof()
            and self._task_handler is not None
        ):
            # The client left mid-body: no answer can reach it, so cancel the handler instead
            # of letting its read fail with ConnectionResetError (logged as a handler failure,
            # one traceback per abandoned request).
            self._task_handler.cancel()
        super().connection_lost(exc)

    def idle(self) -> bool:
        """Whether this connection waits for a request (its first, or the next kept-alive one)."""
        if self._phase == _HEADERS and self._request_count == 0:
            return True  # no whole request yet (aiohttp may not even have started reading)
        waiter = self._waiter  # aiohttp's future for the next complete request
        return waiter is not None and not waiter.done()

    def evict(self) -> None:
        """Close this connection now to make room for a new one."""
        self._guard.release(self)
        self.force_close()

    def _request_started(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> BaseRequest:
        if not payload.is_eof():
            # The body is still arriving: it has body_timeout from now.
            self._phase = _BODY
            self._payload = payload
            self._deadline = self._loop.time() + self._guard.settings().body_timeout
            if self._timer is None:
                self._timer = self._loop.call_at(self._deadline, self._on_deadline)
        elif self._phase != _DONE:
            # Headers and body are complete (the usual case): no deadline until the next
            # request, which aiohttp's keep-alive timeout covers.
            self._phase = _DONE
            self._payload = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        assert self._next_factory is not None
        return self._next_factory(message, payload, protocol, writer, task)

    def _on_deadline(self) -> None:
        self._timer = None
        if self._phase == _DONE or self.transport is None:
            return
        if self._phase == _BODY and (self._payload is None or self._payload.is_eof()):
            self._phase = _DONE
            self._payload = None
            return
        if self._phase == _HEADERS and self._request_count:
            return  # the headers are in; aiohttp has not handed the request over yet
        now = self._loop.time()
        if now < self._deadline:  # a later request moved the deadline
            self._timer = self._loop.call_at(self._deadline, self._on_deadline)
            return
        phase = "headers" if self._phase == _HEADERS else "body"
        self._guard.timed_out[phase] += 1
        waiting_for_body = phase == "body" and self._current_request is not None
        if phase == "headers" or waiting_for_body:
            settings = self._guard.settings()
            seconds = settings.header_timeout if phase == "headers" else settings.body_timeout
            self.transport.write(
                canned_response(
                    408, "Request Timeout", "request_timeout",
                    f"the request {phase} did not arrive within {seconds:g} s",
                )
            )
        if waiting_for_body and self._task_handler is not None:
            # Cancel rather than fail the read: see connection_lost.
            self._task_handler.cancel()
        self.force_close()


class GuardedServer(web.Server):
    """aiohttp's low-level server, making GuardedRequestHandlers."""

    def __init__(self, plain: web.Server, guard: ConnectionGuard) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            # What AppRunner gave the plain server (access log, debug, handler_args).
            **plain._kwargs,
        )
        self.guard = guard

    def __call__(self) -> GuardedRequestHandler:
        kwargs = dict(self._kwargs)
        # Read per connection, so a reload's new keep-alive timeout applies to new ones.
        kwargs["keepalive_timeout"] = self.guard.settings().keepalive_timeout
        return GuardedRequestHandler(self, self.guard, loop=self._loop, **kwargs)


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose connections go through a ConnectionGuard."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.guard)


# Accept errors -----------------------------------------------------------------------------


def install_accept_error_log(loop: asyncio.AbstractEventLoop, guard: ConnectionGuard) -> None:
    """Log the loop's accept() resource errors once per interval, with a count, no traceback.

    asyncio's accept loop reports EMFILE to the loop's exception handler for every pending
    connection of the backlog and again on every retry (about 11,700 lines a second under a
    slowloris, issue 12); everything else still goes to the previous handler.
    """
    previous = loop.get_exception_handler()
    budget = LogBudget()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS and "socket" in context:
            guard.accept_errors += 1
            held = budget.take(time.monotonic())
            if held is not None:
                log.error(
                    "accept_failed",
                    error=os.strerror(exc.errno or 0),
                    errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                    open=guard.open,
                    suppressed=held,
                )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def make_runner(
    app: web.Application,
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    **kwargs: Any,
) -> GuardedAppRunner:
    """An AppRunner with connection caps and read timeouts; `kwargs` go to aiohttp's AppRunner."""
    file_limit = raise_file_limit()
    guard = ConnectionGuard(settings, connection_ceiling(file_limit, open_descriptors()))
    configured = settings().max_connections
    if configured > guard.ceiling:
        log.warning(
            "max_connections_lowered",
            configured=configured,
            effective=guard.ceiling,
            file_limit=file_limit,
        )
    install_accept_error_log(asyncio.get_running_loop(), guard)
    if registry is not None:
        registry.register(ConnectionCollector(guard))
    return GuardedAppRunner(app, guard, **kwargs)
