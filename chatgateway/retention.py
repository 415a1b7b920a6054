"""Retention: every tenant's sessions idle longer than its `sessions.retention_days` go, and
so do its web chat uploads made longer ago than that.

Pure arithmetic, one store call and one sweep of the upload directory per tenant, with the
time passed in: the daemon's prune loop calls `prune_expired` every `storage.prune_interval`
seconds with its clock, and tests move that clock instead of waiting days.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import structlog

from chatgateway.models import TenantId
from chatgateway.store.base import SessionStore
from chatgateway.tenants import TenantRuntime

if TYPE_CHECKING:
    from chatgateway.files import UploadStore

log = structlog.get_logger("chatgateway.retention")

#: Returns the current Unix time (time.time, or a test's moved clock).
Clock = Callable[[], float]

DAY = 86400.0


def idle_before(now: float, retention_days: float) -> float:
    """The last-activity time before which a session is past its retention."""
    return now - retention_days * DAY


async def prune_expired(
    store: SessionStore,
    tenants: Iterable[TenantRuntime],
    now: float,
    uploads: UploadStore | None = None,
) -> dict[TenantId, int]:
    """Delete each tenant's sessions past its retention as of `now`; how many, by tenant.

    With `uploads` (the web chat's), each tenant's uploads made before the same cutoff go too
    (in a thread: the sweep reads the tenant's upload directory). One tenant's failure is
    logged and the others are still pruned.
    """
    removed: dict[TenantId, int] = {}
    for tenant in tenants:
        cutoff = idle_before(now, tenant.config.sessions.retention_days)
        if uploads is not None:
            try:
                files = await asyncio.to_thread(uploads.prune, tenant.id, cutoff)
            except Exception as exc:
                log.warning("prune_failed", tenant_id=tenant.id, error=str(exc), what="uploads")
            else:
                if files:
                    log.info("uploads_pruned", tenant_id=tenant.id, count=files)
        try:
            count = await store.prune(tenant.id, idle_before=cutoff)
        except Exception as exc:
            log.warning("prune_failed", tenant_id=tenant.id, error=str(exc))
            continue
        if count:
            log.info("sessions_pruned", tenant_id=tenant.id, count=count)
        removed[tenant.id] = count
    return removed
