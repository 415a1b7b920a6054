"""The single-process coordinator: in-memory locks and leases, notices delivered in-process."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from typing import Any

import structlog

from chatgateway.coordination.base import ChangeListener
from chatgateway.pipeline import KeyedLocks

log = structlog.get_logger("chatgateway.coordination")


def new_instance_id() -> str:
    """host:pid:random, unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


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

    @asynccontextmanager
    async def session_lock(self, key: Hashable) -> AsyncIterator[None]:
        await self._locks.acquire(key)
        try:
            yield
        finally:
            self._locks.release(key)

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
