"""Answers an agent sends later: the callback each request offers, and their delivery.

An agent of the `chatgateway` protocol may answer `202 Accepted` (docs/agent-protocol.md,
"Answering later"). The request carried `callback: {url, token, expiresAt}`; the pipeline then
records the user's turn, keeps a pending row in the store (`agent_callbacks`) and ends the
message with outcome "deferred". The agent POSTs progress and its final answer to the URL
(adapters/web/callbacks.py); the first final wins atomically in the store, is recorded as the
agent's turn of the session exactly once (its processed event `callback:<id>`) and shown through
the outbound of the platform the message came from: whichever instance can (a Discord bot's
owner) claims the delivery in the store. Until then the session's next message waits under the
session's lock, so answers keep their order. A sweep on every instance gives callbacks past
their expiry the tenant's fallback text, and delivers what another instance could not.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import structlog

from chatgateway.config import AgentConfig
from chatgateway.errors import NotFoundError
from chatgateway.invoker import CallbackTicket
from chatgateway.models import NormalizedMessage, Platform, Role, SessionId, TenantId, Turn
from chatgateway.outbound import Address, Outbound
from chatgateway.signing import SignatureError, Signer
from chatgateway.store.base import CALLBACK_OPEN, CallbackRecord, SessionStore
from chatgateway.tenants import TenantRegistry
from chatgateway.text import storable

log = structlog.get_logger("chatgateway.callbacks")

#: The path an agent POSTs its answer to; `{callback_id}` is the callback's id.
CALLBACK_PATH = "/api/callbacks/"
#: How often every instance looks for callbacks past expiry or left for it to deliver.
SWEEP_INTERVAL = 2.0
#: A delivery claimed this long ago and not finished (its instance died) is taken over.
DELIVERY_STALE = 60.0
#: How often a message waiting for its session's callback re-reads the store when other
#: instances may settle it (one instance wakes at once on its own event).
WAIT_POLL = 1.0
#: Delivered callbacks are deleted this long after (the transcript keeps the answer).
KEEP_DELIVERED = 24 * 3600.0
#: How often delivered callbacks are pruned.
PRUNE_EVERY = 600.0

#: Where an answer can be shown: an Outbound, "elsewhere" (another instance runs the adapter),
#: or "nowhere" (no adapter can show it: the answer is only recorded in the transcript).
Route = Outbound | Literal["elsewhere", "nowhere"]
OutboundLookup = Callable[[TenantId, Address], Route]


class CallbackTokenError(Exception):
    """A callback request refused: `status` (401, 410) and `code` for the JSON error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def uses_callbacks(agent: AgentConfig) -> bool:
    """Whether a tenant's agent is offered callbacks (an HTTP agent of the chatgateway protocol)."""
    return agent.url is not None and agent.protocol == "chatgateway"


def web_address(session_id: SessionId) -> Address:
    """Where a web session's late answer goes: its transcript (the page polls for it)."""
    return Address(Platform.WEB, "web", {"sessionId": session_id})


class Callbacks:
    """Issues callback tickets, takes the agents' answers and delivers them, on one instance."""

    def __init__(
        self,
        store: SessionStore,
        tenants: TenantRegistry,
        secret: str,
        *,
        base_url: Callable[[], str],
        instance_id: str,
        shared: bool = False,
    ) -> None:
        """`base_url()`: the gateway's URL as agents reach it (no trailing slash). `shared`:
        other instances use the same store (they may take and settle callbacks too)."""
        self.store = store
        self.tenants = tenants
        self.signer = Signer(secret, "callback")
        #: Callback ids: unique per process start (random) and message (a counter); the
        #: token, not the id, is the credential.
        self._id_prefix = secrets.token_urlsafe(9)
        self._ids = itertools.count(1)
        self._base: str | None = None
        self.base_url = base_url
        self.instance_id = instance_id
        self.shared = shared
        #: Finds the outbound for an address (the daemon's adapters); None: web only.
        self.outbounds: OutboundLookup | None = None
        #: (tenant, session) with an answer not shown yet; the whole truth on one instance.
        self._open: set[tuple[str, str]] = set()
        self._waiters: dict[tuple[str, str], asyncio.Event] = {}
        #: Outbounds showing an answer's progress here, by (tenant, callback id).
        self._live: dict[tuple[str, str], Outbound] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pruned_at = 0.0
        #: Set when the gateway stops: messages waiting for a late answer go on without it.
        self._stopping = False

    # Issuing -------------------------------------------------------------------------------

    def ticket(self, tenant_id: str, agent: AgentConfig) -> CallbackTicket | None:
        """A callback for one agent request (one HMAC), or None if the agent gets none."""
        if agent.url is None or agent.protocol != "chatgateway":
            return None
        callback_id = f"{self._id_prefix}{next(self._ids):x}"
        expires_at = int(time.time() + agent.callback_timeout)
        token = self.signer.sign((tenant_id, callback_id), expires_at=expires_at)
        base = self._base
        if base is None:
            base = self._base = f"{self.base_url()}{CALLBACK_PATH}"
        return CallbackTicket(callback_id, base + callback_id, token, expires_at)

    def address_changed(self) -> None:
        """`server.public_url` or the listen address changed (a reload): new URLs from now."""
        self._base = None

    def verify(self, token: str, callback_id: str, *, now: float) -> TenantId:
        """The tenant a callback request's token was issued for; CallbackTokenError if the
        token is not ours, altered, for another callback (401) or expired (410)."""
        try:
            tenant_id, signed_id = self.signer.verify(token, now=0, count=2)
        except SignatureError:
            raise CallbackTokenError(401, "unauthorized", "invalid callback token") from None
        if signed_id != callback_id:
            raise CallbackTokenError(401, "unauthorized", "the token is for another callback")
        expiry = Signer.expiry(token)
        if expiry is None or expiry <= now:
            raise CallbackTokenError(
                410, "callback_expired", "the callback expired: the user got the fallback text"
            )
        if self.tenants.get(tenant_id) is None:
            raise CallbackTokenError(410, "callback_expired", "the tenant no longer exists")
        return TenantId(tenant_id)

    # Deferring (the pipeline, under the session's lock) ------------------------------------

    def awaited(self, tenant_id: str, session_id: str, agent: AgentConfig) -> bool:
        """Whether the session may owe an answer (then `wait` before calling the agent)."""
        if (tenant_id, session_id) in self._open:
            return True
        return self.shared and uses_callbacks(agent)

    async def wait(self, tenant_id: TenantId, session_id: SessionId) -> None:
        """Return once the session owes no answer (delivered, or expired and the fallback
        given): its next message reaches the agent after the answer before it."""
        key = (tenant_id, session_id)
        logged = False
        while True:
            if self._stopping:
                # The gateway stops: answered out of order rather than lost (the late answer
                # is still delivered when it comes, by this or another instance).
                log.warning("callback_wait_cut_short", reason="gateway stopping")
                return
            record = await self.store.latest_callback(tenant_id, session_id)
            if record is None or record.state not in CALLBACK_OPEN:
                self._open.discard(key)
                return
            if not logged:
                log.info("message_waits_for_callback", callback_id=record.callback_id)
                logged = True
            event = self._waiters.setdefault(key, asyncio.Event())
            # One instance is woken by its own delivery; others may settle it too (a poll),
            # and the sweep gives it the fallback at its expiry.
            poll = WAIT_POLL if self.shared else max(WAIT_POLL, SWEEP_INTERVAL * 2)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(poll):
                        await event.wait()
            finally:
                if self._waiters.get(key) is event:
                    del self._waiters[key]

    async def defer(
        self,
        message: NormalizedMessage,
        session_id: SessionId,
        ticket: CallbackTicket,
        outbound: Outbound | None,
    ) -> None:
        """The agent answered 202: keep the pending answer (the user's turn is recorded)."""
        if outbound is not None:
            address: dict[str, Any] | None = outbound.address.as_dict()
        elif message.platform is Platform.WEB:
            address = web_address(session_id).as_dict()
        else:
            address = None  # an adapter without an outbound: the transcript only
        record = await self.store.add_callback(
            message.tenant_id,
            ticket.callback_id,
            session_id,
            address,
            expires_at=ticket.expires_at,
            now=time.time(),
        )
        self._open.add((message.tenant_id, session_id))
        log.info("answer_deferred", callback_id=ticket.callback_id, expires_at=ticket.expires_at)
        if record.state != "pending":  # the final answer arrived before this row
            self._spawn(self.deliver(message.tenant_id, ticket.callback_id))

    # Receiving (the callback endpoint) -----------------------------------------------------

    async def receive(
        self, tenant_id: TenantId, callback_id: str, text: str, *, final: bool, expires_at: float
    ) -> str:
        """Take an agent's progress or final answer: "accepted", "already" (a final came
        before), "expired" (the fallback was given) or "unknown"."""
        now = time.time()
        text = storable(text)
        result = await self.store.receive_callback(
            tenant_id,
            callback_id,
            text,
            now=now,
            final=final,
            early_expires_at=expires_at if final else None,
        )
        if result != "accepted":
            log.info("callback_refused", callback_id=callback_id, result=result, final=final)
            return result
        if not final:
            await self._progress(tenant_id, callback_id, text)
            return result
        log.info("callback_received", callback_id=callback_id, chars=len(text))
        # Shielded: an agent hanging up mid-delivery must not leave the claim half done.
        task = self._spawn(self.deliver(tenant_id, callback_id))
        with contextlib.suppress(Exception):
            await asyncio.shield(task)
        return result

    async def _progress(self, tenant_id: TenantId, callback_id: str, delta: str) -> None:
        """Show a progress delta where the answer will go (web: the row, read by the page)."""
        live_key = (tenant_id, callback_id)
        outbound = self._live.get(live_key)
        if outbound is None:
            record = await self.store.get_callback(tenant_id, callback_id)
            if record is None or record.address is None or not record.session_id:
                return
            route = self._route(tenant_id, record)
            if isinstance(route, str):
                return
            outbound = self._live[live_key] = route
        try:
            await outbound.append(delta)
        except Exception as exc:
            log.warning("callback_progress_failed", error=f"{type(exc).__name__}: {exc}")

    # Delivering ----------------------------------------------------------------------------

    def _route(self, tenant_id: TenantId, record: CallbackRecord) -> Route:
        if record.address is None:
            return "nowhere"
        address = Address.from_dict(record.address)
        if address.platform is Platform.WEB or self.outbounds is None:
            return "nowhere"
        return self.outbounds(tenant_id, address)

    async def deliver(self, tenant_id: TenantId, callback_id: str) -> bool:
        """Record and show a received answer if this instance can; True once delivered.
        The claim in the store makes it happen once across instances."""
        now = time.time()
        record = await self.store.claim_callback(
            tenant_id,
            callback_id,
            self.instance_id,
            now=now,
            stale_before=now - DELIVERY_STALE,
        )
        if record is None:
            return False
        delivered = False
        try:
            outbound = self._live.pop((tenant_id, callback_id), None)
            route: Route = outbound if outbound is not None else self._route(tenant_id, record)
            if route == "elsewhere":
                log.info("callback_left_for_owner", callback_id=callback_id)
                return False
            text = record.text or ""
            await self._record(record, text)
            if not isinstance(route, str) and text:
                try:
                    await route.finish(text)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("reply_failed", error=f"{type(exc).__name__}: {exc}")
            elif route == "nowhere" and record.address is not None and text:
                platform = record.address.get("platform")
                if platform != Platform.WEB.value:
                    log.warning("callback_not_shown", callback_id=callback_id, platform=platform)
            delivered = True
            log.info(
                "callback_delivered",
                tenant_id=tenant_id,
                session_id=record.session_id,
                callback_id=callback_id,
                expired=record.expired,
            )
        finally:
            await self.store.settle_callback(
                tenant_id, callback_id, self.instance_id, delivered=delivered, now=time.time()
            )
        self._settled(tenant_id, record.session_id)
        return True

    async def _record(self, record: CallbackRecord, text: str) -> None:
        """The answer as the agent's turn of its session, once (a processed event says so)."""
        if not text:
            return
        platform = Platform(record.address["platform"]) if record.address else Platform.WEB
        event = f"callback:{record.callback_id}"
        if await self.store.is_processed(record.tenant_id, platform, event):
            return
        runtime = self.tenants.get(record.tenant_id)
        max_turns = runtime.config.sessions.max_turns if runtime is not None else 1000
        try:
            await self.store.record_exchange(
                record.tenant_id,
                record.session_id,
                [Turn(Role.AGENT, text, time.time())],
                max_turns=max_turns,
                processed_event=(platform, event),
            )
        except NotFoundError:
            log.info("callback_session_gone", callback_id=record.callback_id)

    def _settled(self, tenant_id: str, session_id: str) -> None:
        key = (tenant_id, session_id)
        self._open.discard(key)
        event = self._waiters.get(key)
        if event is not None:
            event.set()

    # Start, sweep, stop --------------------------------------------------------------------

    async def load(self) -> None:
        """Learn the sessions that owe an answer (rows kept across a restart)."""
        for tenant in self.tenants.all():
            for record in await self.store.open_callbacks(TenantId(tenant.id)):
                self._open.add((record.tenant_id, record.session_id))

    async def run(self) -> None:
        """Sweep every SWEEP_INTERVAL until cancelled."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("callback_sweep_failed", error=f"{type(exc).__name__}: {exc}")

    async def sweep(self) -> None:
        """Give expired callbacks the fallback text; deliver what is left to deliver here."""
        now = time.time()
        prune = now - self._pruned_at >= PRUNE_EVERY
        if prune:
            self._pruned_at = now
        if self.shared or prune:
            tenant_ids = [TenantId(t.id) for t in self.tenants.all()]
        else:  # one instance: only what it knows of can be due
            tenant_ids = sorted({TenantId(t) for t, _ in self._open})
        if prune:
            # Progress shown here of answers whose final went to another instance.
            for tenant_id, callback_id in list(self._live):
                record = await self.store.get_callback(TenantId(tenant_id), callback_id)
                if record is None or record.state != "pending":
                    self._live.pop((tenant_id, callback_id), None)
        for tenant_id in tenant_ids:
            if prune:
                await self.store.prune_callbacks(tenant_id, before=now - KEEP_DELIVERED)
            due = await self.store.due_callbacks(
                tenant_id, now=now, stale_before=now - DELIVERY_STALE
            )
            for record in due:
                if record.state == "pending":
                    runtime = self.tenants.get(tenant_id)
                    fallback = (
                        runtime.config.agent.fallback_text
                        if runtime is not None
                        else AgentConfig.model_fields["fallback_text"].default
                    )
                    result = await self.store.receive_callback(
                        tenant_id, record.callback_id, fallback, now=now, expired=True
                    )
                    if result != "accepted":
                        continue
                    log.warning(
                        "callback_expired",
                        tenant_id=tenant_id,
                        session_id=record.session_id,
                        callback_id=record.callback_id,
                    )
                    self._live.pop((tenant_id, record.callback_id), None)
                await self.deliver(tenant_id, record.callback_id)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name="callback-delivery")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("callback_delivery_failed", error=f"{type(exc).__name__}: {exc}")

    def stop_waiting(self) -> None:
        """The gateway stops: messages waiting for a late answer stop waiting (the drain)."""
        self._stopping = True
        for event in self._waiters.values():
            event.set()

    async def close(self) -> None:
        """Let deliveries in progress finish (their claims would otherwise go stale)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10.0)
