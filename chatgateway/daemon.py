"""The composition root: config, store, tenants, pipeline, web server and adapters in one loop.

Lifecycle (docs/operations.md): start -> READY=1; SIGHUP or POST /admin/reload -> apply the
config's difference; SIGTERM/SIGINT -> stop intake, drain within server.drain_seconds, close.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog
from aiohttp import web

from chatgateway import __version__
from chatgateway.adapter import Adapter, AdapterState
from chatgateway.admission import Admission, open_shared_limiter
from chatgateway.config import (
    GatewayConfig,
    ListenConfig,
    ServerConfig,
    StorageConfig,
    is_loopback,
    load_config,
)
from chatgateway.coordination import Coordinator, LocalCoordinator
from chatgateway.errors import ConfigError, UnavailableError
from chatgateway.logging import configure_logging, scrubber, secrets_in
from chatgateway.metrics import GatewaySample, Metrics
from chatgateway.models import Platform, TenantId
from chatgateway.notify import Notifier
from chatgateway.pipeline import Pipeline
from chatgateway.retention import prune_expired
from chatgateway.signing import gateway_secret
from chatgateway.store import SessionStore, open_store
from chatgateway.supervisor import Supervisor, load_adapter_class
from chatgateway.tenants import TenantRegistry

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from adapters.web import WebContext
    from chatgateway.callbacks import Callbacks
    from chatgateway.tracing import MessageTracer

log = structlog.get_logger("chatgateway.daemon")

#: Exit code of `run` when the gateway could not start for a reason other than its config
#: (port in use, unreadable database); systemd's Restart=on-failure retries it.
EXIT_FAILURE = 1
#: How often idle sessions past their tenant's retention are deleted (storage.prune_interval).
PRUNE_INTERVAL = 3600.0
#: Longest pause between health checks (adapter liveness, STATUS=); the systemd watchdog
#: interval is used when it is shorter.
HEALTH_INTERVAL = 5.0
#: How long start() waits for every adapter's first connection attempt before READY=1.
STARTUP_SETTLE = 10.0
#: After the drain, how long the web server waits for responses still being written.
HTTP_SHUTDOWN_GRACE = 3.0
#: Config keys a reload cannot change in a running process (a restart applies them).
RESTART_KEYS = (
    "storage",
    "cluster",
    "limits.storage",
    "server.max_body_bytes",
    "server.visitor_secret",
)

State = Literal["starting", "ready", "reloading", "draining", "stopped"]


#: The embedded default configuration (package data), used by `run` without --config.
EMBEDDED_CONFIG = Path(__file__).resolve().parent / "cli" / "default.yaml"


def user_state_dir(environ: Mapping[str, str]) -> Path:
    """The per-user state directory: $XDG_STATE_HOME/chatgateway or ~/.local/state/chatgateway."""
    base = environ.get("XDG_STATE_HOME") or ""
    if not Path(base).is_absolute():  # the XDG spec says to ignore a relative value
        home = environ.get("HOME") or str(Path.home())
        base = str(Path(home) / ".local" / "state")
    return Path(base) / "chatgateway"


def resolve_storage(
    storage: StorageConfig, environ: Mapping[str, str], config_file: str | Path | None = None
) -> StorageConfig:
    """Make a relative SQLite `storage.path` absolute (docs/configuration.md#storage).

    Precedence: $STATE_DIRECTORY (systemd's StateDirectory=; the file name only), else the
    directory of the config file, else (the embedded default, or no file) the user's state
    directory. Without a config file the working directory is never used: a command run from
    another directory must find the same database as the daemon.
    """
    if storage.backend != "sqlite" or storage.path == ":memory:":
        return storage
    path = Path(storage.path)
    if path.is_absolute():
        return storage
    state_dir = environ.get("STATE_DIRECTORY")
    if state_dir:
        path = Path(state_dir.split(":")[0]) / path.name
    elif config_file is not None and Path(config_file).resolve() != EMBEDDED_CONFIG:
        path = Path(config_file).resolve().parent / path
    else:
        path = user_state_dir(environ) / path
    return storage.model_copy(update={"path": str(path)})


@dataclass(slots=True)
class ReloadResult:
    """What a reload did: tenants changed, and keys that only a restart applies."""

    ok: bool
    at: float
    changes: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "at": self.at,
            "changes": self.changes,
            "restartNeeded": self.restart_needed,
            "errors": self.errors,
        }


async def start_coordinator(config: GatewayConfig) -> Coordinator:
    """The coordinator `cluster.coordination` names, started."""
    coordinator: Coordinator
    if config.cluster.coordination == "postgres":
        # Imported only here: a single instance needs no psycopg.
        from chatgateway.coordination.postgres import PostgresCoordinator

        assert config.storage.dsn is not None  # the config check requires it
        coordinator = PostgresCoordinator(config.storage.dsn)
    else:
        coordinator = LocalCoordinator()
    await coordinator.start()
    return coordinator


def restart_needed(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The RESTART_KEYS whose value differs between two configs."""
    found = []
    if old.storage != new.storage:
        found.append("storage")
    if old.cluster != new.cluster:
        found.append("cluster")
    if old.limits != new.limits:
        found.append("limits.storage")
    if old.tracing != new.tracing:
        found.append("tracing")
    if old.server.max_body_bytes != new.server.max_body_bytes:
        found.append("server.max_body_bytes")
    if old.server.visitor_secret != new.server.visitor_secret:
        found.append("server.visitor_secret")
    return found


#: Allocations between young-generation collections (CPython's default is 700).
GC_THRESHOLD = (50_000, 50, 50)


def tune_gc() -> None:
    """Keep the collector off the hot path once everything long-lived exists.

    Everything allocated at start-up (config, tenants, adapters, imported modules) is moved to
    the permanent generation so collections never rescan it, and young collections run less
    often: this took the web path's p99 latency from ~45 ms to ~11 ms (docs/performance.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


class Daemon:
    """One gateway process. `start` then `stop`, or `run` to serve until a signal."""

    #: Where spans go instead of `tracing.endpoint` (tests set an in-memory exporter).
    span_exporter: SpanExporter | None = None

    #: The time retention is measured against (tests move it instead of waiting days).
    clock: Callable[[], float] = staticmethod(time.time)

    def __init__(self, config_path: str | Path, environ: Mapping[str, str]) -> None:
        self.config_path = Path(config_path)
        self.environ = environ
        self.config: GatewayConfig | None = None
        self.metrics = Metrics()
        self.notifier = Notifier(environ)
        self.store: SessionStore | None = None
        self.coordinator: Coordinator | None = None
        self.tenants: TenantRegistry | None = None
        self.pipeline: Pipeline | None = None
        self.supervisor: Supervisor | None = None
        self.runner: web.AppRunner | None = None
        self.web_context: WebContext | None = None
        self.port: int | None = None
        #: The gateway secret (chatgateway.signing.gateway_secret), resolved at start.
        self.secret = ""
        self.state: State = "starting"
        self.started = False
        self.started_at = time.time()
        self.last_reload: ReloadResult | None = None
        self._site: web.TCPSite | None = None
        self._listen: ListenConfig | None = None
        self._storage: StorageConfig | None = None
        self._stop_requested = asyncio.Event()
        self._hurry = asyncio.Event()
        self._stopped = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self._health_problems: list[str] = []
        #: Unix time of the last health check that found nothing wedged (the watchdog's ping).
        self._healthy_at: float | None = None
        #: Spans of every message when `tracing.enabled` (chatgateway.tracing).
        self.tracer: MessageTracer | None = None
        #: Answers agents send later (agent callbacks).
        self.callbacks: Callbacks | None = None
        self.metrics.watch_gateway(self._gateway_sample)

    # Start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the config (ConfigError if invalid), open the store, start serving."""
        config = load_config(self.config_path, self.environ)
        self.config = config
        configure_logging(config.logging.level, config.logging.format, environ=self.environ)
        scrubber.update(secrets_in(config))
        self._storage = resolve_storage(config.storage, self.environ, self.config_path)
        self.store = await open_store(self._storage, source=str(self.config_path))
        self.secret = await gateway_secret(config.server.visitor_secret, self.store)
        self.coordinator = await start_coordinator(config)
        self.tenants = TenantRegistry(self.store, self.environ)
        # First listener: mask a tenant's secrets before its adapters can log anything.
        self.tenants.on_change(self._tenant_secrets)
        clustered = config.cluster.coordination != "local"
        self.pipeline = Pipeline(
            self.store,
            self.tenants,
            self.metrics,
            self.coordinator,
            # One instance keeps the cheaper in-process dedup; several claim events in the store.
            claim_timeout=config.cluster.claim_timeout if clustered else None,
        )
        # Limits and quotas count in this process, or in the store `limits.storage` names.
        if config.tracing.enabled:
            # Imported only now: OpenTelemetry is an optional extra that costs nothing when off.
            from chatgateway.tracing import MessageTracer

            self.tracer = MessageTracer(config.tracing, self.span_exporter)
            self.pipeline.tracer = self.tracer
            self.pipeline.store = self.tracer.traced_store(self.store, config.storage.backend)
        self.pipeline.admission = Admission(
            self.metrics, open_shared_limiter(config.limits.storage_uri())
        )
        # Leases only when there can be other instances: one process runs every adapter itself.
        clustered = config.cluster.coordination != "local"
        self.supervisor = Supervisor(
            self._make_adapter, self.metrics, self.coordinator if clustered else None
        )
        self.tenants.on_change(self.supervisor.tenant_changed)
        await self.tenants.load(config.tenants)
        self.tenants.attach(self.coordinator)
        if clustered:
            # A change another instance made between our load and attach sent its notice to
            # nobody here: look again now that notices arrive.
            await self.tenants.sync_runtime()
        await self._start_callbacks(config, clustered)
        await self._start_web(config)
        await self._settle_adapters()
        self._spawn(self._prune_loop(), "maintenance:prune")
        self._spawn(self._health_loop(), "maintenance:health")
        tune_gc()
        self.started = True
        self.state = "ready"
        log.info(
            "gateway_started",
            tenants=len(self.tenants),
            host=config.listen.host,
            port=self.port,
            storage=config.storage.backend,
            coordination=config.cluster.coordination,
            instance_id=self.coordinator.instance_id,
            version=__version__,
            watchdog_seconds=self.notifier.watchdog_interval
            and self.notifier.watchdog_interval * 2,
        )
        self.notifier.ready(self.status_line())

    async def _start_callbacks(self, config: GatewayConfig, clustered: bool) -> None:
        """Answers agents send later: tickets in every request, the sweep, delivery through
        the adapters (chatgateway/callbacks.py)."""
        from chatgateway.callbacks import Callbacks

        assert self.store is not None and self.tenants is not None and self.pipeline is not None
        assert self.supervisor is not None and self.coordinator is not None
        self.callbacks = Callbacks(
            self.store,
            self.tenants,
            self.secret,
            base_url=self._public_base,
            instance_id=self.coordinator.instance_id,
            shared=clustered,
        )
        self.callbacks.outbounds = self.supervisor.outbound
        await self.callbacks.load()
        self.pipeline.callbacks = self.callbacks
        self._spawn(self.callbacks.run(), "maintenance:callbacks")

    def _public_base(self) -> str:
        """The gateway's URL as agents reach it: server.public_url, else the listen address."""
        assert self.config is not None
        if self.config.server.public_url is not None:
            return str(self.config.server.public_url).rstrip("/")
        host = self._listen.host if self._listen is not None else self.config.listen.host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def _tenant_secrets(self, old: Any, new: Any) -> None:
        if new is not None:
            scrubber.add(secrets_in(new))

    def _make_adapter(self, tenant_id: TenantId, platform: Platform, settings: Any) -> Adapter:
        assert self.pipeline is not None
        return load_adapter_class(platform)(tenant_id, settings, self.pipeline)

    async def _settle_adapters(self) -> None:
        """Give every adapter its first connection attempt before announcing readiness."""
        assert self.supervisor is not None
        deadline = time.monotonic() + STARTUP_SETTLE
        while not self.supervisor.settled() and not self._stop_requested.is_set():
            if time.monotonic() > deadline:
                log.warning("adapters_still_connecting", seconds=STARTUP_SETTLE)
                return
            await asyncio.sleep(0.05)

    async def _start_web(self, config: GatewayConfig) -> None:
        from adapters.web import WebContext, create_app
        from adapters.web.ops import ops_routes
        from adapters.web.server import make_runner

        assert self.pipeline is not None and self.tenants is not None and self.store is not None
        loopback = is_loopback(config.listen.host)
        anonymous = self.tenants.get("default")
        if anonymous is not None and anonymous.config.web.anonymous and not loopback:
            log.warning("anonymous_web_disabled", reason="listen address is not loopback")
        self.web_context = WebContext(
            pipeline=self.pipeline,
            tenants=self.tenants,
            store=self.store,
            server=config.server,
            admin_token=config.admin.token,
            loopback=loopback,
            secret=self.secret,
            public_url=self._public_base,
            extra_routes=ops_routes(self),
        )
        context = self.web_context
        # Caps and read timeouts per connection (docs/security.md); read from the running
        # `server` section, so a reload applies them to new connections.
        self.runner = make_runner(
            create_app(context),
            lambda: context.server,
            registry=self.metrics.registry,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=HTTP_SHUTDOWN_GRACE,
        )
        await self.runner.setup()
        self._site, self.port = await self._bind(config.listen)
        self._listen = config.listen

    async def _bind(self, listen: ListenConfig) -> tuple[web.TCPSite, int]:
        assert self.runner is not None
        before = set(map(tuple, self.runner.addresses))
        site = web.TCPSite(self.runner, listen.host, listen.port)
        await site.start()
        new = [a for a in self.runner.addresses if tuple(a) not in before]
        port = int(new[0][1]) if new else listen.port
        return site, port

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prune_loop(self) -> None:
        """Apply every tenant's retention (sessions and web uploads) at start, then every
        `storage.prune_interval`."""
        assert self.tenants is not None and self.store is not None
        interval = self._storage.prune_interval if self._storage else PRUNE_INTERVAL
        while True:
            files = self.pipeline.files if self.pipeline is not None else None
            uploads = files.uploads if files is not None else None
            await prune_expired(self.store, self.tenants.all(), self.clock(), uploads)
            await asyncio.sleep(interval)

    # Health, watchdog and status -----------------------------------------------------------

    async def _health_loop(self) -> None:
        """Check health, feed the systemd watchdog, and keep STATUS= current.

        The pings come from the event loop itself, so a blocked loop sends none and systemd
        restarts the service; a wedged adapter is first restarted by the supervisor, and only
        something it cannot repair withholds the pings.
        """
        assert self.supervisor is not None
        loop = asyncio.get_running_loop()
        watchdog = self.notifier.watchdog_interval
        interval = min(watchdog, HEALTH_INTERVAL) if watchdog else HEALTH_INTERVAL
        last_status = ""
        while True:
            try:
                healthy = self.health_check()
                if healthy and watchdog:
                    self.notifier.watchdog()
                status = self.status_line()
                if status != last_status and self.state == "ready":
                    self.notifier.status(status)
                    last_status = status
            except Exception:
                # No ping this round; if it keeps failing, the watchdog restarts the service.
                log.exception("health_check_failed")
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            lag = loop.time() - expected
            if lag > max(1.0, interval):
                log.warning("event_loop_lag", seconds=round(lag, 2))

    def health_check(self) -> bool:
        """True when nothing is wedged; logs when that changes."""
        assert self.supervisor is not None
        health = self.supervisor.check()
        if health.problems != self._health_problems:
            if health.problems:
                log.error("watchdog_withheld", problems=health.problems)
            elif self._health_problems:
                log.info("health_restored")
            self._health_problems = health.problems
        if health.ok:
            self._healthy_at = time.time()
        return health.ok

    def status_line(self) -> str:
        """The one-line summary systemd shows (STATUS=) in `systemctl status`."""
        in_flight = self.pipeline.active if self.pipeline else 0
        if self.state == "draining":
            return f"Draining: {in_flight} message(s) in flight"
        tenants = len(self.tenants) if self.tenants else 0
        counts = self.supervisor.counts() if self.supervisor else {}
        up = counts.get(AdapterState.CONNECTED, 0)
        parked = counts.get(AdapterState.PARKED, 0)
        retrying = counts.get(AdapterState.BACKOFF, 0)
        connecting = counts.get(AdapterState.STARTING, 0) + counts.get(AdapterState.CONNECTING, 0)
        text = f"{tenants} tenant(s); adapters: {up} up, {parked} parked, {retrying} retrying"
        if connecting:
            text += f", {connecting} connecting"
        return f"{text}; {in_flight} in flight"

    def readiness(self) -> tuple[bool, str]:
        """(ready, state): ready once the store is open and adapters started, until draining."""
        return self.state in ("ready", "reloading") and self.store is not None, self.state

    def _gateway_sample(self) -> GatewaySample:
        return GatewaySample(
            ready=self.readiness()[0],
            draining=self.state == "draining",
            in_flight=self.pipeline.active if self.pipeline else 0,
            tenants=len(self.tenants) if self.tenants else 0,
            healthy=not self._health_problems,
            healthy_at=self._healthy_at,
        )

    async def refresh_metrics(self) -> None:
        """Update the active-session gauge from the store (one indexed count per tenant)."""
        if self.tenants is None or self.store is None or self.state == "stopped":
            return
        counts: dict[tuple[str, str], int] = {}
        now = time.time()
        for tenant in self.tenants.all():
            idle_since = now - tenant.config.sessions.idle_timeout
            by_platform = await self.store.count_sessions_by_platform(
                tenant.id, active_since=idle_since
            )
            for platform, count in by_platform.items():
                counts[tenant.id, platform.value] = count
        self.metrics.set_active_sessions(counts)

    async def status_report(self) -> dict[str, Any]:
        """Everything GET /admin/status shows."""
        assert self.tenants is not None and self.store is not None and self.supervisor is not None
        tenants = []
        now = time.time()
        for tenant in sorted(self.tenants.all(), key=lambda t: t.id):
            config = tenant.config
            idle_since = now - config.sessions.idle_timeout
            adapters = []
            for status in self.supervisor.statuses(tenant.id):
                item = status.as_dict()
                if item["lastError"]:
                    item["lastError"] = scrubber.scrub(item["lastError"])
                adapters.append(item)
            tenants.append(
                {
                    "id": tenant.id,
                    "name": config.name,
                    "source": tenant.source,
                    "web": {"enabled": config.web.enabled},
                    "adapters": adapters,
                    "sessions": {
                        "active": await self.store.count_sessions(
                            tenant.id, active_since=idle_since
                        ),
                        "total": await self.store.count_sessions(tenant.id),
                    },
                }
            )
        return {
            "version": __version__,
            "state": self.state,
            "ready": self.readiness()[0],
            "pid": os.getpid(),
            "instance": {
                "id": self.coordinator.instance_id if self.coordinator else None,
                "coordination": self.config.cluster.coordination if self.config else "local",
            },
            "startedAt": self.started_at,
            "uptimeSeconds": round(now - self.started_at, 1),
            "configFile": str(self.config_path),
            "listen": {"host": self._listen.host if self._listen else None, "port": self.port},
            "inFlight": self.pipeline.active if self.pipeline else 0,
            "health": {"ok": not self._health_problems, "problems": self._health_problems},
            "systemd": {
                "notify": self.notifier.enabled,
                "watchdogSeconds": self.notifier.watchdog_usec / 1e6
                if self.notifier.watchdog_usec
                else None,
            },
            "lastReload": self.last_reload.as_dict() if self.last_reload else None,
            "tenants": tenants,
        }

    # Reload --------------------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """Re-read the config file and apply only the difference; a bad file changes nothing.

        Raises ConfigError (after logging every problem) when the new file is invalid, and
        UnavailableError while the gateway is starting or stopping.
        """
        assert self.tenants is not None and self.config is not None
        async with self._reload_lock:
            if self.state in ("starting", "draining", "stopped"):
                raise UnavailableError(f"cannot reload while {self.state}")
            self.state = "reloading"
            self.notifier.reloading()
            log.info("config_reloading", file=str(self.config_path))
            try:
                return await self._reload()
            finally:
                if self.state == "reloading":  # not if a stop began meanwhile
                    self.state = "ready"
                    self.notifier.ready(self.status_line())

    async def _reload(self) -> ReloadResult:
        assert self.tenants is not None and self.config is not None
        try:
            config = load_config(self.config_path, self.environ)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error(
                    "reload_rejected", file=problem.file, path=problem.path, problem=problem.message
                )
            self.metrics.reloads.labels("rejected").inc()
            self.last_reload = ReloadResult(
                ok=False, at=time.time(), errors=[str(p) for p in exc.problems]
            )
            raise
        old = self.config
        scrubber.add(secrets_in(config))
        if config.logging != old.logging:
            configure_logging(config.logging.level, config.logging.format, environ=self.environ)
            log.info("logging_changed", level=config.logging.level, format=config.logging.format)
        changes = await self.tenants.apply_config(config.tenants)
        if self.web_context is not None:
            if config.admin.token != old.admin.token:
                changes.append("admin token changed")
            self.web_context.admin_token = config.admin.token
            # max_body_bytes and the visitor-token key are fixed when the app starts; the
            # rest of `server` is read per request.
            self.web_context.server = self._running_server(old, config)
        if config.listen != self._listen:
            if await self._rebind(config.listen):
                changes.append(f"listen {config.listen.host}:{self.port}")
        pending = restart_needed(old, config)
        # Keys that need a restart keep their running values so status and stop stay truthful.
        self.config = config.model_copy(
            update={
                "storage": old.storage,
                "cluster": old.cluster,
                "server": self._running_server(old, config),
            }
        )
        if self.callbacks is not None:
            self.callbacks.address_changed()  # public_url or the listen address may differ
        if pending:
            log.warning("reload_needs_restart", keys=pending)
        self.metrics.reloads.labels("ok").inc()
        self.last_reload = ReloadResult(
            ok=True, at=time.time(), changes=changes, restart_needed=pending
        )
        log.info("config_reloaded", changes=changes, restart_needed=pending)
        return self.last_reload

    @staticmethod
    def _running_server(old: GatewayConfig, new: GatewayConfig) -> ServerConfig:
        """The new `server` section, minus the keys only a restart applies."""
        return new.server.model_copy(
            update={
                "max_body_bytes": old.server.max_body_bytes,
                "visitor_secret": old.server.visitor_secret,
            }
        )

    async def _rebind(self, listen: ListenConfig) -> bool:
        """Listen on the new address, then close the old listener; keep the old one on failure."""
        try:
            site, port = await self._bind(listen)
        except OSError as exc:
            log.error(
                "listen_change_failed",
                host=listen.host,
                port=listen.port,
                error=exc.strerror or str(exc),
                kept=f"{self._listen.host}:{self.port}" if self._listen else None,
            )
            return False
        old_site, self._site, self.port, self._listen = self._site, site, port, listen
        if old_site is not None:
            await old_site.stop()
        if self.web_context is not None:
            self.web_context.loopback = is_loopback(listen.host)
        log.info("listen_changed", host=listen.host, port=port)
        return True

    async def _reload_quietly(self) -> None:
        if self.state in ("draining", "stopped", "starting"):
            log.warning("reload_ignored", state=self.state)
            return
        try:
            await self.reload()
        except (ConfigError, UnavailableError):
            pass  # every problem was logged; the old config keeps running
        except Exception:
            log.exception("reload_failed")

    # Stop ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: stop gracefully. A second call while draining: stop waiting for it."""
        if self._stop_requested.is_set():
            if not self._hurry.is_set():
                log.warning("drain_cut_short", reason="second stop signal")
                self._hurry.set()
            return
        self._stop_requested.set()

    async def stop(self) -> None:
        """Stop intake, drain in-flight messages within the deadline, then close everything."""
        if self._stopped:
            return
        self._stopped = True
        if self.store is None:
            return  # nothing was started (e.g. the config was invalid)
        errors: list[Exception] = []
        deadline = self.config.server.drain_seconds if self.config else 0.0
        in_flight = self.pipeline.active if self.pipeline else 0
        self.state = "draining"
        self.notifier.stopping(self.status_line())
        log.info("gateway_stopping", in_flight=in_flight, drain_seconds=deadline)
        drained = True
        if self.supervisor is not None:
            # Several instances: leased connections (Discord bots) move to another instance
            # now, while the drain finishes their answers in flight here.
            await self.supervisor.hand_over()
        if self.pipeline is not None:
            self.pipeline.accepting = False
            if self.callbacks is not None:
                self.callbacks.stop_waiting()  # a late answer must not hold up the drain
            drained = await self._drain(self.pipeline, deadline)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Adapters first (they send what the drained messages answered), then the web server
        # (it finishes writing answered responses), agent HTTP clients, and the store last.
        steps = [
            ("callbacks", self.callbacks.close() if self.callbacks else None),
            ("adapters", self.supervisor.stop_all() if self.supervisor else None),
            ("web", self.runner.cleanup() if self.runner else None),
            ("agents", self.tenants.close() if self.tenants else None),
            ("coordination", self.coordinator.close() if self.coordinator else None),
            ("limits", self.pipeline.admission.close() if self.pipeline else None),
            ("usage", self.pipeline.usage.close() if self.pipeline else None),
            ("store", self.store.close() if self.store else None),
            ("tracing", self.tracer.shutdown() if self.tracer else None),
        ]
        for name, step in steps:
            if step is None:
                continue
            try:
                await step
            except Exception as exc:
                log.error("stop_step_failed", step=name, error=f"{type(exc).__name__}: {exc}")
                errors.append(exc)
        self.state = "stopped"
        self.notifier.close()
        log.info("gateway_stopped", drained=drained)
        if errors:
            raise ExceptionGroup("errors while stopping", errors)

    async def _drain(self, pipeline: Pipeline, deadline: float) -> bool:
        if pipeline.active == 0:
            return True
        idle = asyncio.create_task(pipeline.wait_idle())
        hurry = asyncio.create_task(self._hurry.wait())
        try:
            await asyncio.wait({idle, hurry}, timeout=deadline, return_when="FIRST_COMPLETED")
        finally:
            idle.cancel()
            hurry.cancel()
        if pipeline.active:
            log.warning("drain_incomplete", in_flight=pipeline.active, drain_seconds=deadline)
            return False
        log.info("drain_complete")
        return True

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit code.

        Raises ConfigError for an invalid config (the CLI prints it and exits 78).
        """
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: self._spawn(self._reload_quietly(), "reload")
        )
        code = 0
        try:
            try:
                await self.start()
            except ConfigError:
                raise
            except Exception as exc:
                log.error(
                    "gateway_start_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True
                )
                code = EXIT_FAILURE
            else:
                await self._stop_requested.wait()
        finally:
            # The handlers stay during stop(): a second SIGTERM cuts the drain short, and a
            # SIGHUP is ignored, instead of killing the process mid-cleanup.
            try:
                await self.stop()
            except Exception:
                code = EXIT_FAILURE
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
        return code
