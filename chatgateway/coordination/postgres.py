"""Coordination of several gateway instances on one PostgreSQL database.

Session locks are PostgreSQL advisory locks, change notices go through LISTEN/NOTIFY, and leases
(e.g. one Discord bot's connection) are rows with an expiry (see `try_lease`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from typing import Any

from pydantic import SecretStr

from chatgateway.coordination.base import ChangeListener, Lease
from chatgateway.coordination.local import new_instance_id


class PostgresCoordinator:
    """Coordination across every instance that shares one PostgreSQL database."""

    def __init__(self, dsn: SecretStr, *, instance_id: str | None = None) -> None:
        self.instance_id = instance_id or new_instance_id()
        self.dsn = dsn
        self._listeners: list[ChangeListener] = []

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    @asynccontextmanager
    async def session_lock(self, key: Hashable) -> AsyncIterator[None]:
        raise NotImplementedError
        yield

    # Leases ---------------------------------------------------------------------------------
    # Implemented by the Discord-ownership work (F2): delegate to their lease implementation.

    async def try_lease(self, name: str, *, ttl: float) -> Lease | None:
        raise NotImplementedError("leases on PostgreSQL: see the lease implementation")

    # Change notices -------------------------------------------------------------------------

    async def publish(self, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
