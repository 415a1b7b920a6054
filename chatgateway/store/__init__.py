"""Tenant-scoped persistence: sessions, transcripts, processed events, runtime tenants, API keys."""

from chatgateway.config import StorageConfig
from chatgateway.errors import ConfigError, ConfigProblem
from chatgateway.store.base import ApiKeyRecord, SessionStore, TenantRecord
from chatgateway.store.migrations import SchemaError

__all__ = ["ApiKeyRecord", "SessionStore", "TenantRecord", "open_store"]


async def open_store(config: StorageConfig, *, source: str = "") -> SessionStore:
    """Open the backend a StorageConfig names, migrating its schema as `storage.migrate` says.

    A schema it may not use (behind in `check` mode, or newer than this code) is a ConfigError
    naming `source` (the config file) and `storage.migrate`, so the daemon exits 78.
    """
    store: SessionStore
    if config.backend == "postgres":
        # Imported only here: a gateway on SQLite needs no psycopg installed.
        from chatgateway.store.postgres import PostgresStore

        if config.dsn is None:  # the config validator requires it; this is for mypy
            raise ValueError("storage.dsn is required when backend is postgres")
        store = PostgresStore(config.dsn, owner_dsn=config.owner_dsn, migrate=config.migrate)
    else:
        from chatgateway.store.sqlite import SqliteStore

        store = SqliteStore(config.path, migrate=config.migrate)
    try:
        await store.open()
    except SchemaError as exc:
        raise ConfigError([ConfigProblem(source, "storage.migrate", str(exc))]) from None
    return store
