"""Run every adapter of every tenant: retry transient failures, park on auth failure."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from chatgateway.adapter import Adapter, AdapterState, AdapterStatus
from chatgateway.config import TenantConfig
from chatgateway.errors import AdapterAuthError
from chatgateway.metrics import AdapterSample, Metrics
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
#: A connected adapter whose alive() stays False this long is restarted.
ALIVE_GRACE = 15.0
#: How long an adapter's stop() may take before its task is cancelled.
STOP_TIMEOUT = 10.0
#: A restart still unfinished after this long means the supervisor itself is stuck.
STUCK_AFTER = 30.0

AdapterKey = tuple[TenantId, Platform, str]
AdapterFactory = Callable[[TenantId, Platform, Any], Adapter]


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


@dataclass(frozen=True, slots=True)
class SupervisorHealth:
    """What the watchdog needs to know: is anything wedged beyond the supervisor's repair?"""

    ok: bool
    problems: list[str]


class _Supervised:
    def __init__(self, key: AdapterKey, settings: Any, reconnect_base: int = 0) -> None:
        self.key = key
        self.settings = settings
        self.adapter: Adapter | None = None
        # Until the adapter is constructed (or if construction fails) this status is shown.
        self.placeholder = AdapterStatus(key[0], key[1], key[2])
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        # Set by stop: ends a backoff pause at once instead of after the delay.
        self.stop_event = asyncio.Event()
        self.reconnect_base = reconnect_base
        self.not_alive_since: float | None = None

    @property
    def status(self) -> AdapterStatus:
        return self.adapter.status if self.adapter is not None else self.placeholder


class Supervisor:
    """Owns every adapter task; one adapter's crash never reaches another or the daemon."""

    def __init__(
        self,
        factory: AdapterFactory,
        metrics: Metrics,
        *,
        backoff_initial: float | None = None,
        backoff_max: float | None = None,
        alive_grace: float | None = None,
        stop_timeout: float | None = None,
        stuck_after: float | None = None,
    ) -> None:
        self._factory = factory
        self._metrics = metrics
        # Module defaults are read here (not bound in the signature) so tests can shorten them.
        self.backoff_initial = BACKOFF_INITIAL if backoff_initial is None else backoff_initial
        self.backoff_max = BACKOFF_MAX if backoff_max is None else backoff_max
        self.alive_grace = ALIVE_GRACE if alive_grace is None else alive_grace
        self.stop_timeout = STOP_TIMEOUT if stop_timeout is None else stop_timeout
        self.stuck_after = STUCK_AFTER if stuck_after is None else stuck_after
        self._running: dict[AdapterKey, _Supervised] = {}
        self._restarts: dict[AdapterKey, tuple[asyncio.Task[None], float]] = {}
        self._leaked: dict[asyncio.Task[None], str] = {}
        self._lock = asyncio.Lock()
        metrics.watch_adapters(self.samples)

    # Reading -------------------------------------------------------------------------------

    def statuses(self, tenant_id: TenantId | None = None) -> list[AdapterStatus]:
        return [
            s.status for key, s in self._running.items() if tenant_id is None or key[0] == tenant_id
        ]

    def samples(self) -> list[AdapterSample]:
        """The live state of every adapter, for /metrics."""
        return [
            AdapterSample(s.status, s.reconnect_base + s.status.reconnects)
            for s in self._running.values()
        ]

    def adapters(self) -> list[Adapter]:
        return [s.adapter for s in self._running.values() if s.adapter is not None]

    def counts(self) -> dict[AdapterState, int]:
        """How many adapters are in each state."""
        out: dict[AdapterState, int] = {}
        for status in self.statuses():
            out[status.state] = out.get(status.state, 0) + 1
        return out

    def settled(self) -> bool:
        """True once every adapter finished its first attempt (connected, retrying or parked)."""
        return all(
            s.status.state not in (AdapterState.STARTING, AdapterState.CONNECTING)
            for s in self._running.values()
        )

    # Changes -------------------------------------------------------------------------------

    async def tenant_changed(self, old: TenantConfig | None, new: TenantConfig | None) -> None:
        """Start, stop or restart exactly the adapters whose settings changed."""
        before = adapter_settings(old) if old else {}
        after = adapter_settings(new) if new else {}
        async with self._lock:
            for key in before.keys() - after.keys():
                await self.stop_one(key)
            for key, settings in after.items():
                current = self._running.get(key)
                # Equal settings (secrets compare by value) keep the adapter running; a
                # parked adapter stays parked until its settings change.
                if current is not None and current.settings == settings:
                    continue
                base = 0
                if current is not None:
                    base = current.reconnect_base + current.status.reconnects
                    await self.stop_one(key)
                    log.info(
                        "adapter_settings_changed",
                        tenant_id=key[0],
                        platform=key[1].value,
                        adapter=key[2],
                    )
                self.start_one(key, settings, reconnect_base=base)

    def start_one(self, key: AdapterKey, settings: Any, *, reconnect_base: int = 0) -> None:
        tenant_id, platform, name = key
        supervised = _Supervised(key, settings, reconnect_base)
        supervised.task = asyncio.create_task(
            self._supervise(supervised), name=f"adapter:{tenant_id}:{platform.value}:{name}"
        )
        self._running[key] = supervised

    async def stop_one(self, key: AdapterKey) -> None:
        supervised = self._running.pop(key, None)
        if supervised is None:
            return
        await self._stop(supervised)

    async def _stop(self, supervised: _Supervised) -> None:
        supervised.stopping = True
        supervised.stop_event.set()
        tenant_id, platform, name = supervised.key
        adapter = supervised.adapter
        if adapter is not None:
            try:
                await asyncio.wait_for(adapter.stop(), timeout=self.stop_timeout)
            except Exception as exc:
                log.warning(
                    "adapter_stop_failed",
                    tenant_id=tenant_id,
                    platform=platform.value,
                    adapter=name,
                    error=f"{type(exc).__name__}: {exc}",
                )
        task = supervised.task
        if task is not None and not task.done():
            # run() should have returned after stop(); if not, cancel it with a bound.
            done, _ = await asyncio.wait({task}, timeout=self.stop_timeout)
            if not done:
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=self.stop_timeout)
            if not done:
                # It ignores cancellation: the process is no longer in a state we trust.
                # check() reports it, so the systemd watchdog restarts the whole service.
                log.error(
                    "adapter_task_stuck", tenant_id=tenant_id, platform=platform.value, adapter=name
                )
                self._leaked[task] = _label(supervised.key)
        supervised.status.state = AdapterState.STOPPED

    async def stop_all(self) -> None:
        for task, _ in list(self._restarts.values()):
            task.cancel()
        await asyncio.gather(*(t for t, _ in self._restarts.values()), return_exceptions=True)
        self._restarts.clear()
        running = list(self._running)
        await asyncio.gather(*(self.stop_one(key) for key in running))

    # Health --------------------------------------------------------------------------------

    def check(self) -> SupervisorHealth:
        """Restart connected adapters that stopped being alive; report what is beyond repair.

        Called by the daemon's health loop (which also feeds the systemd watchdog).
        """
        now = time.monotonic()
        problems: list[str] = []
        for key, (task, started) in list(self._restarts.items()):
            if task.done():
                del self._restarts[key]
            elif now - started > self.stuck_after:
                problems.append(f"restart of {_label(key)} stuck for {now - started:.0f}s")
        for task, label in list(self._leaked.items()):
            if task.done():
                del self._leaked[task]
            else:
                problems.append(f"adapter task {label} ignores cancellation")
        for key, supervised in list(self._running.items()):
            adapter = supervised.adapter
            if adapter is None or supervised.stopping or key in self._restarts:
                continue
            if adapter.status.state != AdapterState.CONNECTED or _alive(adapter):
                supervised.not_alive_since = None
                continue
            if supervised.not_alive_since is None:
                supervised.not_alive_since = now
            elif now - supervised.not_alive_since >= self.alive_grace:
                log.warning(
                    "adapter_not_alive",
                    tenant_id=key[0],
                    platform=key[1].value,
                    adapter=key[2],
                    seconds=round(now - supervised.not_alive_since, 1),
                    action="restart",
                )
                task = asyncio.create_task(
                    self._restart(key, supervised), name=f"restart:{_label(key)}"
                )
                self._restarts[key] = (task, now)
        return SupervisorHealth(not problems, problems)

    async def _restart(self, key: AdapterKey, supervised: _Supervised) -> None:
        async with self._lock:
            if self._running.get(key) is not supervised:
                return  # replaced or removed meanwhile
            base = supervised.reconnect_base + supervised.status.reconnects + 1
            await self.stop_one(key)
            self.start_one(key, supervised.settings, reconnect_base=base)

    # The supervised task -------------------------------------------------------------------

    async def _supervise(self, supervised: _Supervised) -> None:
        tenant_id, platform, name = supervised.key
        bound = log.bind(tenant_id=tenant_id, platform=platform.value, adapter=name)
        try:
            adapter = self._factory(tenant_id, platform, supervised.settings)
        except Exception as exc:
            # A missing platform library or a constructor bug: retrying would not help.
            status = supervised.placeholder
            status.state = AdapterState.PARKED
            status.last_error = f"cannot create the adapter: {type(exc).__name__}: {exc}"
            bound.error("adapter_parked", reason=status.last_error)
            return
        supervised.adapter = adapter
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
                bound.error(
                    "adapter_parked",
                    reason=str(exc),
                    hint="fix the credentials in the config and reload",
                )
                return
            except (Exception, SystemExit) as exc:
                if supervised.stopping:
                    return
                if time.monotonic() - started > STABLE_AFTER:
                    failures = 0
                failures += 1
                delay = min(self.backoff_max, self.backoff_initial * 2 ** (failures - 1))
                delay *= random.uniform(0.5, 1.0)
                adapter.status.state = AdapterState.BACKOFF
                adapter.status.last_error = f"{type(exc).__name__}: {exc}"
                adapter.status.reconnects += 1
                bound.warning(
                    "adapter_failed",
                    error=adapter.status.last_error,
                    attempt=failures,
                    retry_in=round(delay, 3),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(supervised.stop_event.wait(), delay)


def _alive(adapter: Adapter) -> bool:
    try:
        return bool(adapter.alive())
    except Exception:
        return False


def _label(key: AdapterKey) -> str:
    return f"{key[0]}/{key[1].value}/{key[2]}"
