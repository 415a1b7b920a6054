"""The single-process coordinator: in-memory locks and leases, notices delivered in-process."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Hashable
from types import TracebackType
from typing import Any

import structlog

from chatgateway.coordination.base import ChangeListener
from chatgateway.pipeline import KeyedLocks

log = structlog.get_logger("chatgateway.coordination")


def new_instance_id() -> str:
    """host:pid:random, unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class LocalSessionLock:
    """`session_lock`'s context manager: a slotted class, cheaper per message than a generator."""

    __slots__ = ("_key", "_locks")

    def __init__(self, locks: KeyedLocks, key: Hashable) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        await self._locks.acquire(self._key)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._locks.release(self._key)


class LocalLease:
    """A lease nobody else can contend for: held until released."""

    def __init__(self, owner: LocalCoordinator, name: str) -> None:
        self.name = name
        self.lost = asyncio.Event()
        self._owner = owner

    async def release(self) -> None:
        if not self.lost.is_set():
            self.lost.set()
            self._owner._leases.pop(self.name, None)


class LocalCoordinator:
    """Coordination inside one process (the default)."""

    def __init__(self, instance_id: str | None = None) -> None:
        self.instance_id = instance_id or new_instance_id()
        self._locks = KeyedLocks()
        self._leases: dict[str, LocalLease] = {}
        self._listeners: list[ChangeListener] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for lease in list(self._leases.values()):
            await lease.release()

    def session_lock(self, key: Hashable) -> LocalSessionLock:
        return LocalSessionLock(self._locks, key)

    async def try_lease(self, name: str, *, ttl: float) -> LocalLease | None:
        if name in self._leases:
            return None
        lease = self._leases[name] = LocalLease(self, name)
        return lease

    async def publish(self, payload: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                await listener(payload)
            except Exception:
                log.exception("change_listener_failed", kind=payload.get("kind"))

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
