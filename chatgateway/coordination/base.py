"""The coordination interface every implementation provides."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

#: Called with a change notice's payload (a small JSON-able dict) on every instance.
ChangeListener = Callable[[dict[str, Any]], Awaitable[None]]


class Lease(Protocol):
    """Exclusive ownership of a named resource (e.g. one Discord bot's connection).

    Held until `release()`, or until the holder stops renewing it (its process died): then
    `lost` is set here, and another instance may acquire it once `ttl` has passed.
    """

    name: str
    #: Set when this instance no longer holds the lease (released, expired or taken over).
    lost: asyncio.Event

    async def release(self) -> None:
        """Give the lease up at once, so another instance can take it without waiting."""


class Coordinator(Protocol):
    """Locks, leases and change notices, shared by every instance of one deployment."""

    #: A unique id of this process (host, pid and a random part), shown in /admin/status.
    instance_id: str

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Release every lease and lock this instance holds; idempotent."""

    def session_lock(self, key: Hashable) -> AbstractAsyncContextManager[None]:
        """Hold `key` (tenant, session) exclusively across instances, FIFO within one."""

    async def try_lease(self, name: str, *, ttl: float) -> Lease | None:
        """Take the lease `name` if nobody holds it (or its holder stopped renewing); else None."""

    async def publish(self, payload: dict[str, Any]) -> None:
        """Send a change notice to every instance, this one included."""

    def subscribe(self, listener: ChangeListener) -> None:
        """Call `listener` for every change notice, published here or on another instance."""
