"""The path every message takes: dedup, session, agent call in order, transcript, metrics, log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import structlog

from chatgateway.errors import AgentError, NotFoundError, OverloadedError, UnavailableError
from chatgateway.invoker import AgentRequest, DeltaSink
from chatgateway.metrics import Metrics
from chatgateway.models import (
    NormalizedMessage,
    Role,
    Session,
    SessionId,
    SessionKey,
    Turn,
)
from chatgateway.store.base import SessionStore
from chatgateway.tenants import TenantRegistry, TenantRuntime

log = structlog.get_logger("chatgateway.pipeline")

Outcome = Literal["ok", "empty", "fallback", "duplicate"]


@dataclass(frozen=True, slots=True)
class Reply:
    """What the adapter should do: send `text` (nothing when empty) into `session`."""

    session: Session | None
    text: str
    outcome: Outcome
    cause: str | None = None


class KeyedLocks:
    """FIFO locks created on demand and dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class Pipeline:
    """Takes normalized messages from every adapter and returns what to answer."""

    def __init__(self, store: SessionStore, tenants: TenantRegistry, metrics: Metrics) -> None:
        self.store = store
        self.tenants = tenants
        self.metrics = metrics
        self._key_locks = KeyedLocks()
        self._session_locks = KeyedLocks()
        self._in_flight: set[tuple[str, str, str]] = set()
        self._active = 0
        self._per_tenant: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepting = True

    @property
    def active(self) -> int:
        """Messages being processed right now (the drain waits for this to reach 0)."""
        return self._active

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def handle(
        self,
        message: NormalizedMessage,
        *,
        session_id: SessionId | None = None,
        new_session: bool = False,
        dedup: bool = True,
        on_delta: DeltaSink | None = None,
    ) -> Reply:
        """Process one message.

        Raises NotFoundError for an unknown tenant or a session the caller may not see, and
        OverloadedError when the tenant already has too many messages in flight, and
        UnavailableError once the gateway has begun to shut down.
        """
        if not self.accepting:
            raise UnavailableError("the gateway is shutting down")
        tenant = self.tenants.get(message.tenant_id)
        if tenant is None:
            raise NotFoundError(f"no tenant {message.tenant_id!r}")
        labels = (message.tenant_id, message.platform.value)
        self.metrics.messages_in.labels(*labels).inc()
        agent = tenant.config.agent
        if self._per_tenant.get(message.tenant_id, 0) >= agent.max_concurrency + agent.max_queue:
            # Admission control: a flood from one tenant queues against its own limit only.
            raise OverloadedError(f"tenant {message.tenant_id} has too many messages in flight")
        event = (message.tenant_id, message.platform.value, message.message_id)
        if dedup:
            if event in self._in_flight or await self.store.is_processed(
                message.tenant_id, message.platform, message.message_id
            ):
                self.metrics.deduplicated.labels(*labels).inc()
                log.info(
                    "message_duplicate",
                    tenant_id=message.tenant_id,
                    platform=message.platform.value,
                    message_id=message.message_id,
                )
                return Reply(None, "", "duplicate")
            self._in_flight.add(event)
        self._active += 1
        self._per_tenant[message.tenant_id] = self._per_tenant.get(message.tenant_id, 0) + 1
        self._idle.clear()
        try:
            return await self._handle(tenant, message, session_id, new_session, dedup, on_delta)
        finally:
            self._in_flight.discard(event)
            self._active -= 1
            left = self._per_tenant[message.tenant_id] - 1
            if left:
                self._per_tenant[message.tenant_id] = left
            else:
                del self._per_tenant[message.tenant_id]
            if self._active == 0:
                self._idle.set()

    async def _handle(
        self,
        tenant: TenantRuntime,
        message: NormalizedMessage,
        session_id: SessionId | None,
        new_session: bool,
        dedup: bool,
        on_delta: DeltaSink | None,
    ) -> Reply:
        started = time.monotonic()
        config = tenant.config
        key = SessionKey.of(message)
        # Resolve (or create) the session under a per-key lock so two first messages of a
        # conversation make one session; then hold the session's lock for the agent call so
        # its messages reach the agent one at a time, in arrival order.
        async with self._key_locks.hold(session_id or key):
            session = await self._resolve(tenant, message, key, session_id, new_session)
            session_lock = self._session_locks.hold(session.id)
            await session_lock.__aenter__()
        try:
            structlog.contextvars.bind_contextvars(
                tenant_id=message.tenant_id,
                platform=message.platform.value,
                session_id=session.id,
            )
            history = await self.store.history(
                message.tenant_id, session.id, config.agent.history_turns
            )
            request = AgentRequest(message=message, session_id=session.id, history=history)
            cause: str | None = None
            agent_started = time.monotonic()
            try:
                text = await tenant.invoker.invoke(request, on_delta)
                outcome: Outcome = "ok" if text else "empty"
            except AgentError as exc:
                cause = exc.cause
                text, outcome = config.agent.fallback_text, "fallback"
                self.metrics.agent_failures.labels(
                    message.tenant_id, message.platform.value, cause
                ).inc()
                log.warning("agent_failed", cause=cause, detail=str(exc))
            self.metrics.agent_latency.labels(message.tenant_id, message.platform.value).observe(
                time.monotonic() - agent_started
            )
            now = time.time()
            turns = [Turn(Role.USER, message.text, message.timestamp)]
            if text:
                turns.append(Turn(Role.AGENT, text, max(now, message.timestamp)))
            await self.store.record_exchange(
                message.tenant_id,
                session.id,
                turns,
                max_turns=config.sessions.max_turns,
                processed_event=(message.platform, message.message_id) if dedup else None,
            )
            if text:
                self.metrics.messages_out.labels(message.tenant_id, message.platform.value).inc()
            log.info(
                "message_handled",
                outcome=outcome,
                cause=cause,
                latency_ms=round((time.monotonic() - started) * 1000, 1),
            )
            return Reply(session, text, outcome, cause)
        finally:
            structlog.contextvars.unbind_contextvars("tenant_id", "platform", "session_id")
            await session_lock.__aexit__(None, None, None)

    async def _resolve(
        self,
        tenant: TenantRuntime,
        message: NormalizedMessage,
        key: SessionKey,
        session_id: SessionId | None,
        new_session: bool,
    ) -> Session:
        if session_id is not None:
            session = await self.store.get_session(message.tenant_id, session_id)
            # Another tenant's, another user's or another platform's session looks absent.
            if (
                session is None
                or session.user_id != message.user.id
                or session.platform != message.platform
            ):
                raise NotFoundError(f"no session {session_id!r}")
            return session
        now = time.time()
        if not new_session:
            idle_since = now - tenant.config.sessions.idle_timeout
            session = await self.store.find_active_session(key, idle_since=idle_since)
            if session is not None:
                return session
        return await self.store.create_session(
            key, kind=message.conversation.kind, user_name=message.user.display_name, now=now
        )
