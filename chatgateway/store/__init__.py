"""Tenant-scoped persistence: sessions, transcripts, processed events, runtime tenants, API keys."""

from chatgateway.store.base import ApiKeyRecord, SessionStore, TenantRecord

__all__ = ["ApiKeyRecord", "SessionStore", "TenantRecord", "open_store"]


async def open_store(config: object) -> SessionStore:
    """Open the backend named by a StorageConfig."""
    from chatgateway.config import StorageConfig

    assert isinstance(config, StorageConfig)
    if config.backend == "postgres":
        from chatgateway.store.postgres import PostgresStore

        assert config.dsn is not None
        pg: SessionStore = PostgresStore(config.dsn.get_secret_value())
        await pg.open()
        return pg
    from chatgateway.store.sqlite import SqliteStore

    store = SqliteStore(config.path)
    await store.open()
    return store
