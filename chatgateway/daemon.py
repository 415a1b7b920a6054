"""The composition root: config, store, tenants, pipeline, web server and adapters in one loop."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from chatgateway.adapter import Adapter
from chatgateway.config import GatewayConfig, StorageConfig, is_loopback, load_config
from chatgateway.errors import ConfigError
from chatgateway.logging import configure_logging, scrubber, secrets_in
from chatgateway.metrics import Metrics
from chatgateway.models import Platform, TenantId
from chatgateway.pipeline import Pipeline
from chatgateway.store import SessionStore, open_store
from chatgateway.supervisor import Supervisor, load_adapter_class
from chatgateway.tenants import TenantRegistry

log = structlog.get_logger("chatgateway.daemon")

#: How often idle sessions past their tenant's retention are deleted.
PRUNE_INTERVAL = 3600.0


def resolve_storage(storage: StorageConfig, environ: Mapping[str, str]) -> StorageConfig:
    """Relative SQLite paths live in $STATE_DIRECTORY (systemd) or else the working directory."""
    path = Path(storage.path)
    state_dir = environ.get("STATE_DIRECTORY")
    if storage.backend == "sqlite" and not path.is_absolute() and storage.path != ":memory:":
        if state_dir:
            path = Path(state_dir.split(":")[0]) / path.name
        return storage.model_copy(update={"path": str(path)})
    return storage


class Daemon:
    """One gateway process. `start` then `stop`, or `run` to serve until a signal."""

    def __init__(self, config_path: str | Path, environ: Mapping[str, str]) -> None:
        self.config_path = Path(config_path)
        self.environ = environ
        self.config: GatewayConfig | None = None
        self.metrics = Metrics()
        self.store: SessionStore | None = None
        self.tenants: TenantRegistry | None = None
        self.pipeline: Pipeline | None = None
        self.supervisor: Supervisor | None = None
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self.started = False
        self._stop_requested = asyncio.Event()
        self._stopped = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # Start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the config (ConfigError if invalid), open the store, start serving."""
        config = load_config(self.config_path, self.environ)
        self.config = config
        configure_logging(config.logging.level, config.logging.format)
        scrubber.update(secrets_in(config))
        self.store = await open_store(resolve_storage(config.storage, self.environ))
        self.tenants = TenantRegistry(self.store, self.environ)
        self.pipeline = Pipeline(self.store, self.tenants, self.metrics)
        self.supervisor = Supervisor(self._make_adapter, self.metrics)
        self.tenants.on_change(self.supervisor.tenant_changed)
        await self.tenants.load(config.tenants)
        await self._start_web(config)
        self._spawn(self._prune_loop(), "maintenance:prune")
        self.started = True
        log.info(
            "gateway_started",
            tenants=len(self.tenants),
            host=config.listen.host,
            port=self.port,
            storage=config.storage.backend,
        )

    def _make_adapter(self, tenant_id: TenantId, platform: Platform, settings: Any) -> Adapter:
        assert self.pipeline is not None
        return load_adapter_class(platform)(tenant_id, settings, self.pipeline)

    async def _start_web(self, config: GatewayConfig) -> None:
        from adapters.web import WebContext, create_app

        assert self.pipeline and self.tenants and self.store
        loopback = is_loopback(config.listen.host)
        anonymous = self.tenants.get("default")
        if anonymous is not None and anonymous.config.web.anonymous and not loopback:
            log.warning("anonymous_web_disabled", reason="listen address is not loopback")
        context = WebContext(
            pipeline=self.pipeline,
            tenants=self.tenants,
            store=self.store,
            server=config.server,
            admin_token=config.admin.token,
            loopback=loopback,
        )
        self.runner = web.AppRunner(create_app(context), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, config.listen.host, config.listen.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else config.listen.port

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prune_loop(self) -> None:
        assert self.tenants and self.store
        while True:
            for tenant in self.tenants.all():
                retention = tenant.config.sessions.retention_days * 86400
                try:
                    removed = await self.store.prune(tenant.id, idle_before=time.time() - retention)
                    if removed:
                        log.info("sessions_pruned", tenant_id=tenant.id, count=removed)
                except Exception as exc:
                    log.warning("prune_failed", tenant_id=tenant.id, error=str(exc))
            await asyncio.sleep(PRUNE_INTERVAL)

    # Reload --------------------------------------------------------------------------------

    async def reload(self) -> list[str]:
        """Re-read the config file and apply only the difference; a bad file changes nothing."""
        assert self.tenants is not None
        try:
            config = load_config(self.config_path, self.environ)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload_rejected", problem=str(problem))
            raise
        scrubber.update(secrets_in(config))
        changes = await self.tenants.apply_config(config.tenants)
        self.config = config
        log.info("config_reloaded", changes=changes)
        return changes

    # Stop ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def stop(self) -> None:
        """Stop intake, drain in-flight messages within the deadline, then close everything."""
        if self._stopped:
            return
        self._stopped = True
        errors: list[BaseException] = []
        deadline = self.config.server.drain_seconds if self.config else 0.0
        if self.pipeline is not None:
            self.pipeline.accepting = False
            try:
                async with asyncio.timeout(deadline):
                    await self.pipeline.wait_idle()
            except TimeoutError:
                log.warning("drain_deadline_passed", in_flight=self.pipeline.active)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        steps = [
            self.supervisor.stop_all() if self.supervisor else None,
            self.runner.cleanup() if self.runner else None,
            self.tenants.close() if self.tenants else None,
            self.store.close() if self.store else None,
        ]
        for step in steps:
            if step is None:
                continue
            try:
                await step
            except Exception as exc:
                errors.append(exc)
        log.info("gateway_stopped")
        if errors:
            raise ExceptionGroup("errors while stopping", errors)

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: self._spawn(self._reload_quietly(), "reload")
        )
        try:
            await self._stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.stop()
        return 0

    async def _reload_quietly(self) -> None:
        try:
            await self.reload()
        except ConfigError:
            pass
