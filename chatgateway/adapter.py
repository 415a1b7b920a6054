"""The seam between the core and a platform: what an adapter is and how it reports its state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, Protocol

from chatgateway.models import Platform, TenantId


class AdapterState(enum.StrEnum):
    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    PARKED = "parked"
    STOPPED = "stopped"
    #: Another instance owns this connection (a Discord bot is connected by one instance).
    STANDBY = "standby"


@dataclass(slots=True)
class AdapterStatus:
    """What the operator sees of one adapter (GET /admin/status)."""

    tenant_id: TenantId
    platform: Platform
    name: str
    state: AdapterState = AdapterState.STARTING
    last_error: str | None = None
    last_event_at: float | None = None
    connected_at: float | None = None
    reconnects: int = 0
    #: The instance that owns the connection, for an adapter that needs one owner (standby).
    owner: str | None = None

    def event_seen(self) -> None:
        self.last_event_at = time.time()

    def as_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform.value,
            "name": self.name,
            "state": self.state.value,
            "lastError": self.last_error,
            "lastEventAt": self.last_event_at,
            "connectedAt": self.connected_at,
            "reconnects": self.reconnects,
            "owner": self.owner,
        }


class Adapter(Protocol):
    """One platform connection of one tenant, run by the supervisor.

    `run` connects and serves until `stop` is called (then it returns) or the connection
    fails: it raises AdapterAuthError when the platform refused the credentials (the adapter
    is parked) and any other exception for a transient failure (retried with backoff).
    `alive` lets the watchdog ask whether a connected adapter still is.
    """

    status: AdapterStatus

    async def run(self) -> None: ...

    async def stop(self) -> None: ...

    def alive(self) -> bool: ...
