"""Run every adapter of every tenant: retry transient failures, park on auth failure."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import structlog

from chatgateway.adapter import Adapter, AdapterState, AdapterStatus
from chatgateway.config import TenantConfig
from chatgateway.coordination import Coordinator, Lease
from chatgateway.errors import AdapterAuthError
from chatgateway.metrics import AdapterSample, Metrics
from chatgateway.models import Platform, TenantId
from chatgateway.outbound import Address, Outbound

# Platforms whose connection one instance owns at a time. Slack is not one: Slack spreads an
# app's events over every open Socket Mode connection, so every instance connects (docs/slack.md).
from chatgateway.pipeline import LEASED_PLATFORMS

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
#: A Discord bot's lease: its owner renews it every ttl/3; another instance takes it over at
#: most LEASE_TTL + STANDBY_RETRY seconds after the owner died (docs/deploy-cluster.md).
LEASE_TTL = 10.0
#: How often an instance in standby tries to take a bot's lease.
STANDBY_RETRY = 2.0
#: How often a hand-over (drain start) looks whether the adapter has left its connection.
HAND_OVER_POLL = 0.02

AdapterKey = tuple[TenantId, Platform, str]
AdapterFactory = Callable[[TenantId, Platform, Any], Adapter]


@runtime_checkable
class HandoverLease(Protocol):
    """A lease that carries a small JSON object from one owner to the next."""

    data: dict[str, Any] | None

    def save(self, data: dict[str, Any], *, now: bool = False) -> None: ...


@runtime_checkable
class HandsOver(Protocol):
    """An adapter that can continue its predecessor's connection (a Discord gateway session)."""

    def hand_over(
        self, data: dict[str, Any] | None, save: Callable[[dict[str, Any], bool], None]
    ) -> None:
        """Resume from `data` (the last owner's, or None); report new state with `save`."""


@runtime_checkable
class KnowsHolders(Protocol):
    """A coordinator that can tell which instance holds a lease it could not take."""

    def lease_holder(self, name: str) -> str | None: ...


def lease_name(key: AdapterKey) -> str:
    """The lease of one platform connection: `discord:<tenant>:<bot name>`."""
    return f"{key[1].value}:{key[0]}:{key[2]}"


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
        self.lease: Lease | None = None
        #: The adapter's stop() begun by a hand-over at the start of a drain.
        self.leaving: asyncio.Future[None] | None = None

    @property
    def status(self) -> AdapterStatus:
        return self.adapter.status if self.adapter is not None else self.placeholder


class Supervisor:
    """Owns every adapter task; one adapter's crash never reaches another or the daemon."""

    def __init__(
        self,
        factory: AdapterFactory,
        metrics: Metrics,
        coordinator: Coordinator | None = None,
        *,
        lease_ttl: float | None = None,
        standby_retry: float | None = None,
        backoff_initial: float | None = None,
        backoff_max: float | None = None,
        alive_grace: float | None = None,
        stop_timeout: float | None = None,
        stuck_after: float | None = None,
    ) -> None:
        self._factory = factory
        self._metrics = metrics
        # None: this process is the only instance, so no connection is leased.
        self._coordinator = coordinator
        self.lease_ttl = LEASE_TTL if lease_ttl is None else lease_ttl
        self.standby_retry = STANDBY_RETRY if standby_retry is None else standby_retry
        # Module defaults are read here (not bound in the signature) so tests can shorten them.
        self.backoff_initial = BACKOFF_INITIAL if backoff_initial is None else backoff_initial
        self.backoff_max = BACKOFF_MAX if backoff_max is None else backoff_max
        self.alive_grace = ALIVE_GRACE if alive_grace is None else alive_grace
        self.stop_timeout = STOP_TIMEOUT if stop_timeout is None else stop_timeout
        self.stuck_after = STUCK_AFTER if stuck_after is None else stuck_after
        self._running: dict[AdapterKey, _Supervised] = {}
        self._restarts: dict[AdapterKey, tuple[asyncio.Task[None], float]] = {}
        self._leaked: dict[asyncio.Task[None], str] = {}
        #: Lease releases waiting for an adapter task that ignored cancellation to end.
        self._releases: set[asyncio.Task[None]] = set()
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

    def outbound(
        self, tenant_id: TenantId, address: Address
    ) -> Outbound | Literal["elsewhere", "nowhere"]:
        """Where an answer that arrives later (an agent's callback) is shown from here: the
        running adapter's outbound; "elsewhere" when another instance owns the connection or
        it is (re)connecting; "nowhere" when no adapter can show it."""
        supervised = self._running.get((tenant_id, address.platform, address.adapter))
        if supervised is None:
            return "nowhere"
        adapter = supervised.adapter
        state = supervised.status.state
        if state == AdapterState.PARKED:
            return "nowhere"
        if adapter is None or state != AdapterState.CONNECTED:
            return "elsewhere"
        factory = getattr(adapter, "outbound", None)
        found = factory(address) if callable(factory) else None
        return found if found is not None else "nowhere"

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
                # A hand-over (drain) began stopping it already: wait for that stop.
                stopping = supervised.leaving or adapter.stop()
                await asyncio.wait_for(stopping, timeout=self.stop_timeout)
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
        lease, supervised.lease = supervised.lease, None
        if lease is not None:
            if task is not None and not task.done():
                # It may still be connected: the lease goes when the task ends (or expires
                # once the watchdog restarted the process), never while it may overlap.
                self._release_after(task, lease)
            else:
                # After the adapter disconnected, so the next owner never overlaps with it.
                await lease.release()
        supervised.status.state = AdapterState.STOPPED

    def _release_after(self, task: asyncio.Task[None], lease: Lease) -> None:
        def release(_: asyncio.Task[None]) -> None:
            releasing = asyncio.ensure_future(lease.release())
            self._releases.add(releasing)
            releasing.add_done_callback(self._releases.discard)

        task.add_done_callback(release)

    async def hand_over(self) -> None:
        """At the start of a drain (SIGTERM): hand every leased connection to another instance
        now rather than after the drain. Each such adapter stops taking messages and leaves the
        platform (a Discord bot's gateway session stays resumable) while its answers in flight
        go on; its lease is released as soon as it has left, with the resume point the adapter
        saved, so a standby instance takes the bot over (Discord replays there what is still
        unanswered here; the shared store's processed events and session locks keep it from
        being answered twice). Adapters in standby stop waiting: a draining instance takes
        nothing over. Without a coordinator (one instance) this does nothing; `stop_all`
        stops everything after the drain, as before."""
        if self._coordinator is None:
            return
        leased = [s for s in self._running.values() if s.key[1] in LEASED_PLATFORMS]
        for supervised in leased:
            supervised.stopping = True
            supervised.stop_event.set()
        await asyncio.gather(*(self._hand_over_one(s) for s in leased))

    async def _hand_over_one(self, supervised: _Supervised) -> None:
        lease, adapter = supervised.lease, supervised.adapter
        if lease is None or lease.lost.is_set():
            return  # in standby, or the lease is gone already
        tenant_id, platform, name = supervised.key
        started = time.monotonic()
        left = True
        if adapter is not None:
            was_connected = adapter.status.state == AdapterState.CONNECTED
            leaving = supervised.leaving = asyncio.ensure_future(adapter.stop())
            # The adapter has left once it no longer reports a connection (its stop() may go on
            # for the answers in flight), or once stop() returned.
            deadline = started + self.stop_timeout
            while not leaving.done() and time.monotonic() < deadline:
                if was_connected and adapter.status.state != AdapterState.CONNECTED:
                    break
                await asyncio.sleep(HAND_OVER_POLL)
            left = leaving.done() or (
                was_connected and adapter.status.state != AdapterState.CONNECTED
            )
        if not left or supervised.lease is not lease:
            return  # still connected: the lease goes with the adapter's stop (_stop)
        supervised.lease = None
        await lease.release()
        log.info(
            "adapter_handed_over",
            tenant_id=tenant_id,
            platform=platform.value,
            adapter=name,
            lease=lease.name,
            seconds=round(time.monotonic() - started, 3),
        )

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
        leased = self._coordinator is not None and platform in LEASED_PLATFORMS
        while not supervised.stopping:
            lease: Lease | None = None
            if leased:
                lease = await self._take_lease(supervised, bound)
                if lease is None:
                    return  # stopped while in standby
            try:
                adapter = self._factory(tenant_id, platform, supervised.settings)
            except Exception as exc:
                # A missing platform library or a constructor bug: retrying would not help.
                status = supervised.placeholder
                status.state = AdapterState.PARKED
                status.last_error = f"cannot create the adapter: {type(exc).__name__}: {exc}"
                bound.error("adapter_parked", reason=status.last_error)
                return
            if lease is not None and isinstance(lease, HandoverLease):
                if isinstance(adapter, HandsOver):
                    adapter.hand_over(lease.data, _saver(lease))
            supervised.adapter = adapter
            await self._serve(supervised, adapter, lease, bound)
            if supervised.stopping or lease is None or not lease.lost.is_set():
                return
            # Another instance may own the bot now: back to standby with a fresh adapter.
            supervised.lease = None
            supervised.reconnect_base += adapter.status.reconnects
            supervised.adapter = None

    async def _take_lease(self, supervised: _Supervised, bound: Any) -> Lease | None:
        """Wait in standby until this instance holds the adapter's lease (None once stopping)."""
        assert self._coordinator is not None
        name = lease_name(supervised.key)
        status = supervised.placeholder
        waiting = False
        while not supervised.stopping:
            try:
                lease = await self._coordinator.try_lease(name, ttl=self.lease_ttl)
            except Exception as exc:
                lease = None
                status.last_error = f"cannot take the lease: {type(exc).__name__}: {exc}"
                bound.warning("lease_failed", lease=name, error=status.last_error)
            if lease is not None:
                if supervised.stopping:
                    await lease.release()
                    return None
                supervised.lease = lease
                status.owner = getattr(self._coordinator, "instance_id", None)
                if waiting:
                    bound.info("adapter_taking_over", lease=name)
                return lease
            owner = None
            if isinstance(self._coordinator, KnowsHolders):
                owner = self._coordinator.lease_holder(name)
            if status.state != AdapterState.STANDBY or status.owner != owner:
                bound.info("adapter_standby", lease=name, owner=owner)
            status.state = AdapterState.STANDBY
            status.owner = owner
            waiting = True
            with contextlib.suppress(TimeoutError):
                # Jittered so standby instances do not all ask at the same moment.
                delay = self.standby_retry * random.uniform(0.75, 1.0)
                await asyncio.wait_for(supervised.stop_event.wait(), delay)
        return None

    async def _serve(
        self, supervised: _Supervised, adapter: Adapter, lease: Lease | None, bound: Any
    ) -> None:
        """Run the adapter, retrying transient failures, until stopped, parked or lease lost."""
        if lease is not None:
            adapter.status.owner = supervised.placeholder.owner
        failures = 0
        while not supervised.stopping:
            if lease is not None and lease.lost.is_set():
                await self._give_up(supervised, adapter, bound)
                return
            started = time.monotonic()
            try:
                if lease is None:
                    await adapter.run()
                elif not await self._run_leased(supervised, adapter, lease):
                    await self._give_up(supervised, adapter, bound)
                    return
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
                waits = [supervised.stop_event.wait()]
                if lease is not None:
                    waits.append(lease.lost.wait())
                await _first_of(waits, delay)

    async def _run_leased(self, supervised: _Supervised, adapter: Adapter, lease: Lease) -> bool:
        """Run the adapter while the lease holds: True if run() returned, False if lease lost."""
        run = asyncio.ensure_future(adapter.run())
        try:
            lost = asyncio.ensure_future(lease.lost.wait())
            try:
                await asyncio.wait({run, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
            if not run.done() and supervised.stopping:
                # Released by the hand-over at the start of a drain, which is stopping the
                # adapter: run() returns once it has.
                await asyncio.wait({run})
        except asyncio.CancelledError:
            run.cancel()
            # As if run() were awaited directly (single-instance mode): this task ends only
            # when run() has, so a run() that ignores cancellation keeps it pending and _stop
            # reports the adapter stuck (log, health check) instead of it going unnoticed.
            await asyncio.wait({run})
            if not run.cancelled():
                run.exception()
            raise
        if run.done():
            run.result()
            return True
        # Stop at once: another instance may take the bot over in a moment.
        try:
            await asyncio.wait_for(adapter.stop(), timeout=self.stop_timeout)
        except Exception:
            pass
        done, _ = await asyncio.wait({run}, timeout=self.stop_timeout)
        if not done:
            run.cancel()
            done, _ = await asyncio.wait({run}, timeout=self.stop_timeout)
        if not done:
            # It ignores cancellation: reported as _stop reports it (the health check withholds
            # the watchdog's pings, so systemd restarts the process).
            tenant_id, platform, name = supervised.key
            log.error(
                "adapter_task_stuck", tenant_id=tenant_id, platform=platform.value, adapter=name
            )
            self._leaked[run] = _label(supervised.key)
        elif not run.cancelled():
            run.exception()  # its failure is moot: the adapter is stopped either way
        return False

    async def _give_up(self, supervised: _Supervised, adapter: Adapter, bound: Any) -> None:
        """The lease is lost: make sure the adapter is disconnected, and say so."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(adapter.stop(), timeout=self.stop_timeout)
        adapter.status.state = AdapterState.STANDBY
        supervised.placeholder.state = AdapterState.STANDBY
        supervised.placeholder.owner = None
        bound.warning("adapter_lease_lost", lease=lease_name(supervised.key))


def _saver(lease: HandoverLease) -> Callable[[dict[str, Any], bool], None]:
    def save(data: dict[str, Any], now: bool) -> None:
        lease.save(data, now=now)

    return save


async def _first_of(waits: list[Any], within: float) -> None:
    """Wait until one of the awaitables finishes or `within` seconds pass; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _alive(adapter: Adapter) -> bool:
    try:
        return bool(adapter.alive())
    except Exception:
        return False


def _label(key: AdapterKey) -> str:
    return f"{key[0]}/{key[1].value}/{key[2]}"
