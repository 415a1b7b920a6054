"""structlog configured once: JSON lines off a terminal, console on one, secrets scrubbed.

Under systemd, stdout is a journald stream: each line then starts with its syslog priority
("<3>" for errors, see sd-daemon(3)), which journald strips and keeps as the entry's priority,
so `journalctl -u chatgateway -p warning` works while the line itself stays JSON.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import ahocorasick
import structlog
from pydantic import BaseModel, SecretStr

from chatgateway import codec

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_MASK = "[redacted]"
#: syslog priorities (sd-daemon(3) prefixes) by log level.
_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
#: Secrets shorter than this are not masked: they would mask innocent text; real tokens are long.
MIN_SECRET_LENGTH = 6


class SecretScrubber:
    """A processor that replaces every known secret value in a log event with a mask."""

    #: Up to this many secrets a substring search each is cheapest; past it (a gateway with
    #: many tenants) one Aho-Corasick pass finds them all, so a log line does not cost more
    #: with every tenant added (2,000 secrets: 0.8 ms a line searched one by one).
    LINEAR_LIMIT = 8

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()
        self._known: frozenset[str] = frozenset()
        self._automaton: Any = None

    def update(self, secrets: Iterable[str]) -> None:
        """Replace the masked values."""
        # Longest first, so a secret containing another is masked whole.
        unique = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}
        self._secrets = tuple(sorted(unique, key=len, reverse=True))
        self._known = frozenset(unique)
        self._automaton = None
        if len(self._secrets) > self.LINEAR_LIMIT:
            automaton = ahocorasick.Automaton()
            for secret in self._secrets:
                automaton.add_word(secret, secret)
            automaton.make_automaton()
            self._automaton = automaton

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these values too (a reload or a runtime tenant brought new secrets)."""
        new = [s for s in secrets if s not in self._known and len(s) >= MIN_SECRET_LENGTH]
        if new:  # each tenant of a 1,000-tenant file re-adds known secrets at start-up
            self.update([*self._secrets, *new])

    def scrub(self, text: str) -> str:
        candidates: Iterable[str] = self._secrets
        if self._automaton is not None:
            found = {secret for _, secret in self._automaton.iter(text)}
            if not found:
                return text
            candidates = sorted(found, key=len, reverse=True)
        for secret in candidates:
            if secret in text:
                text = text.replace(secret, _MASK)
        return text

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self._secrets:
            return event
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.scrub(value)
            elif not isinstance(value, int | float | bool | type(None)):
                rendered = str(value)
                scrubbed = self.scrub(rendered)
                if scrubbed != rendered:
                    event[key] = scrubbed
        return event

    def exception(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Scrub the traceback `format_exc_info` rendered (the other fields were scrubbed)."""
        text = event.get("exception")
        if self._secrets and isinstance(text, str):
            event["exception"] = self.scrub(text)
        return event


#: The one scrubber; `configure_logging` installs it and the daemon feeds it the config's secrets.
scrubber = SecretScrubber()


def secrets_in(model: Any) -> list[str]:
    """Every SecretStr value inside a (nested) pydantic model."""
    found: list[str] = []
    if isinstance(model, SecretStr):
        found.append(model.get_secret_value())
    elif isinstance(model, BaseModel):
        for name in type(model).model_fields:
            found += secrets_in(getattr(model, name))
    elif isinstance(model, list | tuple):
        for item in model:
            found += secrets_in(item)
    elif isinstance(model, dict):
        for item in model.values():
            found += secrets_in(item)
    return found


def is_journal_stream(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when `stream` is the journald stream systemd connected (JOURNAL_STREAM=dev:inode)."""
    expected = environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class _PriorityRenderer:
    """Wrap a renderer to prefix each line with its syslog priority for journald."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        level = str(event.get("level", method)).lower()
        return f"<{_PRIORITIES.get(level, 6)}>" + str(self._renderer(logger, method, event))


class _LineWriter:
    """Writes the gateway's own log lines to `stream`, one write per event-loop iteration.

    Instead of a write and flush per line, the lines logged during one loop iteration are
    joined into one write at its end (group commit for logs; docs/performance.md). Warnings
    and errors are written at once (with whatever is pending, in order), as are lines from
    outside the event loop, and what is pending at exit.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._pending: list[str] = []
        #: The loop a flush is scheduled on (a loop that ended with one scheduled is replaced).
        self._scheduled: asyncio.AbstractEventLoop | None = None
        atexit.register(self.flush)

    def later(self, line: str) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # not on the event loop (start-up, a thread, exit)
            loop = None
        with self._lock:
            self._pending.append(line)
            if loop is not None:
                if self._scheduled is loop:
                    return
                self._scheduled = loop
        if loop is None:
            self.flush()
        else:
            loop.call_soon(self.flush)

    def now(self, line: str) -> None:
        with self._lock:
            self._pending.append(line)
        self.flush()

    def flush(self) -> None:
        with self._lock:
            self._scheduled = None
            if not self._pending:
                return
            text = "\n".join(self._pending) + "\n"
            self._pending.clear()
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):  # a closed or broken stdout must not stop the gateway
                pass


class _LineLogger:
    """structlog's final logger for our own events: straight to the `_LineWriter`.

    Skipping the standard library's Logger/Handler/Formatter chain for the gateway's own events
    roughly halves the cost of the per-message log line; libraries still log through `logging`.
    """

    def __init__(self, name: str, writer: _LineWriter) -> None:
        self.name = name
        self._writer = writer
        self.debug = self.info = self.msg = writer.later
        self.warning = self.warn = self.error = self.critical = self.exception = writer.now


class _WriterHandler(logging.Handler):
    """The standard library's records (from libraries) through the same writer, in order."""

    def __init__(self, writer: _LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self._writer.now(line)
        else:
            self._writer.later(line)


class _LineLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self.writer = _LineWriter(stream)
        self._loggers: dict[str, _LineLogger] = {}

    def __call__(self, *args: Any) -> _LineLogger:
        # structlog asks for the logger at every call (loggers are not cached, so that a
        # reconfiguration reaches them): hand out one per name.
        name = str(args[0]) if args else "chatgateway"
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = _LineLogger(name, self.writer)
        return logger


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Configure structlog and route the standard library's logging through it.

    `fmt` "auto" writes JSON lines unless `stream` is a terminal (then readable console lines).
    """
    stream = stream or sys.stdout
    json_lines = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrubber,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=codec.log_line)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    if is_journal_stream(stream, environ or {}):
        renderer = _PriorityRenderer(renderer)
    factory = _LineLoggerFactory(stream)
    structlog.configure(
        processors=[
            structlog.stdlib.add_logger_name,
            *shared,
            structlog.processors.format_exc_info,
            scrubber.exception,  # a rendered traceback can carry a secret too
            renderer,
        ],
        logger_factory=factory,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=False,
    )
    handler = _WriterHandler(factory.writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                scrubber.exception,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # Libraries are chatty at INFO; their warnings still come through.
    for noisy in ("aiohttp.access", "slack_bolt", "slack_sdk", "discord"):
        logging.getLogger(noisy).setLevel(max(_LEVELS[level], logging.WARNING))
