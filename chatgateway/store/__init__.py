"""Tenant-scoped persistence: sessions, transcripts, processed events, runtime tenants, API keys."""

from chatgateway.config import StorageConfig
from chatgateway.store.base import ApiKeyRecord, SessionStore, TenantRecord

__all__ = ["ApiKeyRecord", "SessionStore", "TenantRecord", "open_store"]


async def open_store(config: StorageConfig) -> SessionStore:
    """Open the backend a StorageConfig names."""
    store: SessionStore
    if config.backend == "postgres":
        # Imported only here: a gateway on SQLite needs no psycopg installed.
        from chatgateway.store.postgres import PostgresStore

        if config.dsn is None:  # the config validator requires it; this is for mypy
            raise ValueError("storage.dsn is required when backend is postgres")
        store = PostgresStore(config.dsn)
    else:
        from chatgateway.store.sqlite import SqliteStore

        store = SqliteStore(config.path)
    await store.open()
    return store
