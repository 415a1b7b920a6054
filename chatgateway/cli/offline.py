"""`--offline`: the commands that may act on the store directly, without the daemon."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from chatgateway.cli.client import EXIT_NOT_FOUND, CommandError
from chatgateway.cli.settings import ConfigFile
from chatgateway.store import SessionStore, open_store


@asynccontextmanager
async def existing_store(config: ConfigFile) -> AsyncIterator[SessionStore]:
    """Open the config's store; a SQLite file that does not exist is an error, never created.

    Creating it would hand out keys the running gateway, which uses another file, refuses.
    """
    storage = config.storage()
    exists = storage.backend != "sqlite" or await asyncio.to_thread(Path(storage.path).exists)
    if not exists:
        raise CommandError(
            EXIT_NOT_FOUND,
            f"no database at {storage.path} (storage.path of {config.label}; a relative path "
            "is taken from $STATE_DIRECTORY when set, else from the config file's directory: "
            "under systemd run with STATE_DIRECTORY=/var/lib/chatgateway)",
        )
    store = await open_store(storage, source=config.label)
    try:
        yield store
    finally:
        await store.close()
