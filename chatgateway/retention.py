"""Retention: every tenant's sessions idle longer than its `sessions.retention_days` go.

Pure arithmetic and one store call per tenant, with the time passed in: the daemon's prune loop
calls `prune_expired` every `storage.prune_interval` seconds with its clock, and tests move that
clock instead of waiting days.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import structlog

from chatgateway.models import TenantId
from chatgateway.store.base import SessionStore
from chatgateway.tenants import TenantRuntime

log = structlog.get_logger("chatgateway.retention")

#: Returns the current Unix time (time.time, or a test's moved clock).
Clock = Callable[[], float]

DAY = 86400.0


def idle_before(now: float, retention_days: float) -> float:
    """The last-activity time before which a session is past its retention."""
    return now - retention_days * DAY


async def prune_expired(
    store: SessionStore, tenants: Iterable[TenantRuntime], now: float
) -> dict[TenantId, int]:
    """Delete each tenant's sessions past its retention as of `now`; how many, by tenant.

    One tenant's failure is logged and the others are still pruned.
    """
    removed: dict[TenantId, int] = {}
    for tenant in tenants:
        cutoff = idle_before(now, tenant.config.sessions.retention_days)
        try:
            count = await store.prune(tenant.id, idle_before=cutoff)
        except Exception as exc:
            log.warning("prune_failed", tenant_id=tenant.id, error=str(exc))
            continue
        if count:
            log.info("sessions_pruned", tenant_id=tenant.id, count=count)
        removed[tenant.id] = count
    return removed
