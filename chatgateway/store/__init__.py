"""Tenant-scoped persistence: sessions, transcripts, processed events, runtime tenants, API keys."""

from chatgateway.config import StorageConfig
from chatgateway.store.base import ApiKeyRecord, SessionStore, TenantRecord

__all__ = ["ApiKeyRecord", "SessionStore", "TenantRecord", "open_store"]


async def open_store(config: StorageConfig) -> SessionStore:
    """Open the backend a StorageConfig names (SQLite is the only one so far)."""
    from chatgateway.store.sqlite import SqliteStore

    store = SqliteStore(config.path)
    await store.open()
    return store
