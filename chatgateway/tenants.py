"""The tenant registry: tenants from the config file plus those registered at runtime, and keys."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog

from chatgateway.config import TenantConfig, parse_tenant
from chatgateway.errors import ConflictError, NotFoundError
from chatgateway.invoker import AgentInvoker, make_invoker
from chatgateway.models import TenantId
from chatgateway.store.base import ApiKeyRecord, SessionStore, TenantRecord

if TYPE_CHECKING:  # coordination imports the pipeline, which imports this module
    from chatgateway.coordination.base import Coordinator

log = structlog.get_logger("chatgateway.tenants")

KEY_PREFIX = "cgw_"
#: How long a key looked up in the store is trusted before it is looked up again.
KEY_CACHE_SECONDS = 10.0

Source = Literal["config", "runtime"]
#: Called after a tenant was added, changed or removed (old, new); adapters restart on it.
ChangeListener = Callable[[TenantConfig | None, TenantConfig | None], Awaitable[None]]


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def new_api_key() -> tuple[str, str]:
    """Return (key_id, full key). Only the key's hash is ever stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


@dataclass(slots=True)
class TenantRuntime:
    """A live tenant: its validated config, its own agent invoker and its config-file keys."""

    config: TenantConfig
    source: Source
    invoker: AgentInvoker
    config_key_hashes: frozenset[str] = field(default_factory=frozenset)

    @property
    def id(self) -> TenantId:
        return TenantId(self.config.id)


def _runtime(
    config: TenantConfig,
    source: Source,
    previous: TenantRuntime | None = None,
    refused: frozenset[str] = frozenset(),
) -> TenantRuntime:
    """A runtime for `config`; keeps `previous`'s agent client when the agent settings match,
    so a change elsewhere (a Slack token, a web title) does not disturb calls in flight.

    Keys whose hash is in `refused` (generated keys of another tenant) are not indexed.
    """
    hashes = frozenset(hash_key(k.get_secret_value()) for k in config.web.api_keys) - refused
    if previous is not None and previous.config.agent == config.agent:
        invoker = previous.invoker
    else:
        invoker = make_invoker(config.agent)
    return TenantRuntime(config, source, invoker, hashes)


class TenantRegistry:
    """Owns every TenantRuntime; the only place tenants are added, changed or removed."""

    def __init__(self, store: SessionStore, environ: Mapping[str, str]) -> None:
        self._store = store
        self._environ = environ
        self._tenants: dict[TenantId, TenantRuntime] = {}
        self._config_keys: dict[str, TenantId] = {}
        self._key_cache: dict[str, tuple[ApiKeyRecord, float]] = {}
        self._listeners: list[ChangeListener] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self._coordinator: Coordinator | None = None

    # Reading -------------------------------------------------------------------------------

    def get(self, tenant_id: str) -> TenantRuntime | None:
        return self._tenants.get(TenantId(tenant_id))

    def all(self) -> list[TenantRuntime]:
        return list(self._tenants.values())

    def __len__(self) -> int:
        return len(self._tenants)

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    # Loading and reloading -----------------------------------------------------------------

    async def load(self, configured: list[TenantConfig]) -> None:
        """Start with the config file's tenants plus the runtime tenants in the store."""
        await self.apply_config(configured)
        for record in await self._store.list_tenants():
            if record.tenant_id in self._tenants:
                log.warning("runtime_tenant_shadowed", tenant_id=record.tenant_id)
                continue
            try:
                config = parse_tenant(record.spec, environ=self._environ, source="store")
                await self._check_keys(config)
            except Exception as exc:
                log.error("runtime_tenant_invalid", tenant_id=record.tenant_id, error=str(exc))
                continue
            await self._put(config, "runtime")

    async def apply_config(self, configured: list[TenantConfig]) -> list[str]:
        """Make the config-file tenants match `configured`; return a summary of the changes."""
        changes: list[str] = []
        wanted = {TenantId(t.id): t for t in configured}
        for tenant_id, current in list(self._tenants.items()):
            if current.source == "config" and tenant_id not in wanted:
                await self._remove(tenant_id)
                changes.append(f"removed {tenant_id}")
        for tenant_id, config in wanted.items():
            existing = self._tenants.get(tenant_id)
            if existing is not None and existing.source == "config" and existing.config == config:
                continue
            if existing is not None and existing.source == "runtime":
                log.warning("runtime_tenant_shadowed", tenant_id=tenant_id)
            refused = await self._generated_conflicts(config)
            await self._put(config, "config", refused)
            changes.append(f"{'changed' if existing else 'added'} {tenant_id}")
        return changes

    async def _generated_conflicts(self, config: TenantConfig) -> frozenset[str]:
        """Hashes of `config`'s keys that are another tenant's generated key, each logged.

        A config file cannot be refused as a whole for this at start-up or reload (the store is
        not known to `check-config`), so the key is refused: it keeps authenticating the tenant
        it was generated for, never this one.
        """
        refused: set[str] = set()
        for index, key in enumerate(config.web.api_keys):
            owner = await self._generated_owner(key.get_secret_value())
            if owner is not None and owner != config.id:
                log.error(
                    "api_key_conflict",
                    tenant_id=config.id,
                    path=f"web.api_keys[{index}]",
                    other_tenant_id=owner,
                    problem="the key is a generated key of another tenant; refused",
                )
                refused.add(hash_key(key.get_secret_value()))
        return frozenset(refused)

    async def _generated_owner(self, raw_key: str) -> TenantId | None:
        """The tenant `raw_key` was generated for (a key in the store), or None."""
        if not raw_key.startswith(KEY_PREFIX):
            return None  # every generated key has the prefix: no store lookup for the others
        key_id = raw_key[len(KEY_PREFIX) :].split("_", 1)[0]
        record = await self._store.find_api_key(key_id)
        if record is None or not hmac.compare_digest(record.key_hash, hash_key(raw_key)):
            return None
        return record.tenant_id

    async def _put(
        self, config: TenantConfig, source: Source, refused: frozenset[str] = frozenset()
    ) -> TenantRuntime:
        old = self._tenants.get(TenantId(config.id))
        runtime = _runtime(config, source, old, refused)
        self._tenants[runtime.id] = runtime
        self._index_keys(old, runtime)
        if old is not None and old.invoker is not runtime.invoker:
            self._retire(old.invoker)
        for listener in self._listeners:
            await listener(old.config if old else None, runtime.config)
        return runtime

    def _retire(self, invoker: AgentInvoker) -> None:
        """Close a replaced agent client in the background, after its calls in flight."""
        task = asyncio.create_task(invoker.close(), name="retire-agent-client")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _remove(self, tenant_id: TenantId) -> None:
        old = self._tenants.pop(tenant_id, None)
        if old is None:
            return
        self._index_keys(old, None)
        self._key_cache = {k: v for k, v in self._key_cache.items() if v[0].tenant_id != tenant_id}
        self._retire(old.invoker)
        for listener in self._listeners:
            await listener(old.config, None)

    def _index_keys(self, old: TenantRuntime | None, new: TenantRuntime | None) -> None:
        """Keep the config-key index current for one tenant (O(its keys), not O(all tenants))."""
        if old is not None:
            for digest in old.config_key_hashes:
                if self._config_keys.get(digest) == old.id:
                    del self._config_keys[digest]
        if new is not None:
            for digest in new.config_key_hashes:
                owner = self._config_keys.get(digest)
                if owner is not None and owner != new.id:
                    # Never silently: a key authenticates one tenant, and the config file's
                    # tenant keeps it over a runtime one (create and update refuse such keys).
                    log.error("api_key_conflict", tenant_id=new.id, other_tenant_id=owner)
                    other = self._tenants.get(owner)
                    if new.source == "runtime" or (other is not None and other.source == "config"):
                        continue
                self._config_keys[digest] = new.id

    async def _check_keys(self, config: TenantConfig) -> None:
        """Raise ConflictError if one of `config`'s API keys authenticates another tenant.

        Another tenant's key is one of its config or runtime keys, or one generated for it.
        """
        taken = []
        for index, key in enumerate(config.web.api_keys):
            raw = key.get_secret_value()
            owner = self._config_keys.get(hash_key(raw)) or await self._generated_owner(raw)
            if owner is not None and owner != config.id:
                taken.append(f"web.api_keys[{index}]")
        if taken:
            raise ConflictError(f"{', '.join(taken)}: this API key belongs to another tenant")

    async def close(self) -> None:
        for runtime in self._tenants.values():
            self._retire(runtime.invoker)
        await asyncio.gather(*self._retiring, return_exceptions=True)

    # Runtime tenants (admin API) -----------------------------------------------------------

    async def create(self, spec: dict[str, Any]) -> TenantRuntime:
        config = parse_tenant(spec, environ=self._environ)
        if TenantId(config.id) in self._tenants:
            raise ConflictError(f"tenant {config.id!r} already exists")
        await self._check_keys(config)
        now = time.time()
        await self._store.save_tenant(TenantRecord(TenantId(config.id), spec, now, now))
        runtime = await self._put(config, "runtime")
        log.info("tenant_created", tenant_id=config.id)
        await self._notify("tenant", tenant_id=config.id)
        return runtime

    async def update(self, tenant_id: str, spec: dict[str, Any]) -> TenantRuntime:
        current = self._runtime_tenant(tenant_id)
        spec = {**spec, "id": tenant_id}
        config = parse_tenant(spec, environ=self._environ)
        await self._check_keys(config)
        now = time.time()
        await self._store.save_tenant(TenantRecord(current.id, spec, now, now))
        runtime = await self._put(config, "runtime")
        log.info("tenant_updated", tenant_id=tenant_id)
        await self._notify("tenant", tenant_id=tenant_id)
        return runtime

    async def delete(self, tenant_id: str) -> None:
        current = self._runtime_tenant(tenant_id)
        await self._store.delete_tenant(current.id)
        await self._remove(current.id)
        log.info("tenant_deleted", tenant_id=tenant_id)
        await self._notify("tenant", tenant_id=tenant_id)

    async def purge(self, tenant_id: str) -> dict[str, int]:
        """Delete every row of a runtime or former config tenant; the count per table."""
        current = self._tenants.get(TenantId(tenant_id))
        if current is not None and current.source == "config":
            raise ConflictError(
                f"tenant {tenant_id!r} is defined in the config file; remove it there and "
                "reload before purging its data"
            )
        if current is not None:
            # Out of the registry first: its adapters stop taking messages that would write.
            await self._remove(current.id)
        deleted = await self._store.purge_tenant(TenantId(tenant_id))
        log.info("tenant_purged", tenant_id=tenant_id, rows=sum(deleted.values()))
        if current is not None or deleted.get("tenants"):
            await self._notify("tenant", tenant_id=tenant_id)
        return deleted

    def _runtime_tenant(self, tenant_id: str) -> TenantRuntime:
        current = self._tenants.get(TenantId(tenant_id))
        if current is None:
            raise NotFoundError(f"no tenant {tenant_id!r}")
        if current.source != "runtime":
            raise ConflictError(
                f"tenant {tenant_id!r} is defined in the config file; change it there and reload"
            )
        return current

    # API keys ------------------------------------------------------------------------------

    async def create_key(self, tenant_id: str, label: str = "") -> tuple[ApiKeyRecord, str]:
        """Create a key for a tenant; the full key is returned once and never stored."""
        if TenantId(tenant_id) not in self._tenants:
            raise NotFoundError(f"no tenant {tenant_id!r}")
        created = await create_api_key(self._store, TenantId(tenant_id), label)
        await self._notify("key", tenant_id=tenant_id, key_id=created[0].key_id)
        return created

    async def delete_key(self, tenant_id: str, key_id: str) -> None:
        if not await self._store.delete_api_key(TenantId(tenant_id), key_id):
            raise NotFoundError(f"no key {key_id!r} for tenant {tenant_id!r}")
        self._key_cache.pop(key_id, None)
        await self._notify("key", tenant_id=tenant_id, key_id=key_id)

    # Other instances (cluster.coordination) ------------------------------------------------

    def attach(self, coordinator: Coordinator) -> None:
        """Announce runtime tenant and key changes made here; apply those made elsewhere."""
        self._coordinator = coordinator
        coordinator.subscribe(self._on_notice)

    async def _notify(self, kind: str, **fields: str) -> None:
        if self._coordinator is None:
            return
        notice = {"kind": kind, "origin": self._coordinator.instance_id, **fields}
        try:
            await self._coordinator.publish(notice)
        except Exception as exc:
            # The change is stored; other instances see it when their listener resyncs.
            log.error("change_notice_failed", kind=kind, error=f"{type(exc).__name__}: {exc}")

    async def _on_notice(self, notice: dict[str, Any]) -> None:
        assert self._coordinator is not None
        if notice.get("origin") == self._coordinator.instance_id:
            return  # applied when it was made
        kind = notice.get("kind")
        if kind == "tenant" and isinstance(notice.get("tenant_id"), str):
            await self.sync_runtime(notice["tenant_id"])
        elif kind == "key":
            self._key_cache.pop(str(notice.get("key_id")), None)
        elif kind == "resync":
            self._key_cache.clear()
            await self.sync_runtime()

    async def sync_runtime(self, only: str | None = None) -> None:
        """Make the runtime tenants (all, or just `only`) match the store."""
        records = {r.tenant_id: r for r in await self._store.list_tenants()}
        ids = set(records) | {t.id for t in self._tenants.values() if t.source == "runtime"}
        if only is not None:
            ids &= {TenantId(only)}
        for tenant_id in sorted(ids):
            current = self._tenants.get(tenant_id)
            record = records.get(tenant_id)
            if current is not None and current.source == "config":
                continue  # the config file's tenant shadows a runtime one
            if record is None:
                if current is not None:
                    await self._remove(tenant_id)
                    log.info("tenant_synced", tenant_id=tenant_id, change="removed")
                continue
            try:
                config = parse_tenant(record.spec, environ=self._environ, source="store")
                await self._check_keys(config)
            except Exception as exc:
                log.error("runtime_tenant_invalid", tenant_id=tenant_id, error=str(exc))
                continue
            if current is None or current.config != config:
                await self._put(config, "runtime")
                change = "added" if current is None else "changed"
                log.info("tenant_synced", tenant_id=tenant_id, change=change)

    async def authenticate(self, raw_key: str) -> TenantRuntime | None:
        """Return the tenant a presented API key belongs to, or None. Constant-time compare."""
        digest = hash_key(raw_key)
        tenant_id = self._config_keys.get(digest)
        if tenant_id is not None:
            return self._tenants.get(tenant_id)
        if not raw_key.startswith(KEY_PREFIX):
            return None
        key_id = raw_key[len(KEY_PREFIX) :].split("_", 1)[0]
        now = time.monotonic()
        cached = self._key_cache.get(key_id)
        if cached is not None and cached[1] > now:
            record = cached[0]
        else:
            found = await self._store.find_api_key(key_id)
            if found is None:
                self._key_cache.pop(key_id, None)
                return None
            record = found
            self._key_cache[key_id] = (record, now + KEY_CACHE_SECONDS)
        if not hmac.compare_digest(record.key_hash, digest):
            return None
        return self._tenants.get(record.tenant_id)


async def create_api_key(
    store: SessionStore, tenant_id: TenantId, label: str = ""
) -> tuple[ApiKeyRecord, str]:
    """Store a new key's hash for a tenant and return the record and the key itself."""
    key_id, key = new_api_key()
    record = ApiKeyRecord(key_id, tenant_id, hash_key(key), label, time.time())
    await store.add_api_key(record)
    return record, key
