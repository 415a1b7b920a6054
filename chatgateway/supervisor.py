"""Run every adapter of every tenant: retry transient failures, park on auth failure."""

from __future__ import annotations

import asyncio
import importlib
import random
import time
from collections.abc import Callable
from typing import Any

import structlog

from chatgateway.adapter import Adapter, AdapterState, AdapterStatus
from chatgateway.config import TenantConfig
from chatgateway.errors import AdapterAuthError
from chatgateway.metrics import Metrics
from chatgateway.models import Platform, TenantId

log = structlog.get_logger("chatgateway.supervisor")

#: Platform adapters by import string: a platform library is imported only when a tenant uses it.
ADAPTERS: dict[Platform, str] = {
    Platform.SLACK: "adapters.slack:SlackAdapter",
    Platform.DISCORD: "adapters.discord:DiscordAdapter",
}

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
#: A connection that lasted this long resets the backoff.
STABLE_AFTER = 30.0

AdapterKey = tuple[TenantId, Platform, str]


def load_adapter_class(platform: Platform) -> Callable[..., Adapter]:
    module_name, _, attr = ADAPTERS[platform].partition(":")
    cls: Callable[..., Adapter] = getattr(importlib.import_module(module_name), attr)
    return cls


def adapter_settings(config: TenantConfig) -> dict[AdapterKey, Any]:
    """Every platform connection a tenant's config asks for, by (tenant, platform, name)."""
    tenant_id = TenantId(config.id)
    found: dict[AdapterKey, Any] = {}
    for app in config.slack.apps:
        found[(tenant_id, Platform.SLACK, app.name)] = app
    for bot in config.discord.bots:
        found[(tenant_id, Platform.DISCORD, bot.name)] = bot
    return found


class _Supervised:
    def __init__(self, adapter: Adapter, settings: Any) -> None:
        self.adapter = adapter
        self.settings = settings
        self.task: asyncio.Task[None] | None = None
        self.stopping = False


class Supervisor:
    """Owns every adapter task; one adapter's crash never reaches another or the daemon."""

    def __init__(self, factory: Callable[[TenantId, Platform, Any], Adapter], metrics: Metrics):
        self._factory = factory
        self._metrics = metrics
        self._running: dict[AdapterKey, _Supervised] = {}

    def statuses(self, tenant_id: TenantId | None = None) -> list[AdapterStatus]:
        return [
            s.adapter.status
            for key, s in self._running.items()
            if tenant_id is None or key[0] == tenant_id
        ]

    def adapters(self) -> list[Adapter]:
        return [s.adapter for s in self._running.values()]

    async def tenant_changed(self, old: TenantConfig | None, new: TenantConfig | None) -> None:
        """Start, stop or restart exactly the adapters whose settings changed."""
        before = adapter_settings(old) if old else {}
        after = adapter_settings(new) if new else {}
        for key in before.keys() - after.keys():
            await self.stop_one(key)
        for key, settings in after.items():
            current = self._running.get(key)
            if current is not None and current.settings == settings:
                continue
            if current is not None:
                await self.stop_one(key)
            self.start_one(key, settings)

    def start_one(self, key: AdapterKey, settings: Any) -> None:
        tenant_id, platform, name = key
        adapter = self._factory(tenant_id, platform, settings)
        supervised = _Supervised(adapter, settings)
        supervised.task = asyncio.create_task(
            self._supervise(key, supervised), name=f"adapter:{tenant_id}:{platform.value}:{name}"
        )
        self._running[key] = supervised

    async def stop_one(self, key: AdapterKey) -> None:
        supervised = self._running.pop(key, None)
        if supervised is None:
            return
        supervised.stopping = True
        try:
            await asyncio.wait_for(supervised.adapter.stop(), timeout=10)
        except Exception as exc:
            log.warning("adapter_stop_failed", adapter=key[2], error=str(exc))
        if supervised.task is not None:
            supervised.task.cancel()
            await asyncio.gather(supervised.task, return_exceptions=True)
        supervised.adapter.status.state = AdapterState.STOPPED
        self._set_gauges(key, supervised.adapter.status)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop_one(key) for key in list(self._running)))

    def _set_gauges(self, key: AdapterKey, status: AdapterStatus) -> None:
        labels = (key[0], key[1].value, key[2])
        self._metrics.adapter_up.labels(*labels).set(status.state == AdapterState.CONNECTED)
        self._metrics.adapter_parked.labels(*labels).set(status.state == AdapterState.PARKED)

    async def _supervise(self, key: AdapterKey, supervised: _Supervised) -> None:
        tenant_id, platform, name = key
        adapter = supervised.adapter
        bound = log.bind(tenant_id=tenant_id, platform=platform.value, adapter=name)
        failures = 0
        while not supervised.stopping:
            started = time.monotonic()
            try:
                await adapter.run()
                if supervised.stopping:
                    return
                raise ConnectionError("adapter stopped on its own")
            except asyncio.CancelledError:
                raise
            except AdapterAuthError as exc:
                adapter.status.state = AdapterState.PARKED
                adapter.status.last_error = str(exc)
                self._set_gauges(key, adapter.status)
                bound.error(
                    "adapter_parked",
                    reason=str(exc),
                    hint="fix the credentials in the config and reload",
                )
                return
            except Exception as exc:
                if supervised.stopping:
                    return
                if time.monotonic() - started > STABLE_AFTER:
                    failures = 0
                failures += 1
                delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (failures - 1))
                delay *= random.uniform(0.5, 1.0)
                adapter.status.state = AdapterState.BACKOFF
                adapter.status.last_error = f"{type(exc).__name__}: {exc}"
                adapter.status.reconnects += 1
                self._metrics.reconnects.labels(tenant_id, platform.value, name).inc()
                self._set_gauges(key, adapter.status)
                bound.warning(
                    "adapter_failed", error=adapter.status.last_error, retry_in=round(delay, 2)
                )
                await asyncio.sleep(delay)
