"""The path every message takes: dedup, session, agent call in order, transcript, metrics, log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import structlog

from chatgateway.admission import Admission
from chatgateway.errors import AgentError, NotFoundError, OverloadedError, UnavailableError
from chatgateway.files import FileService, notice_first, prepare_files
from chatgateway.invoker import (
    AgentRequest,
    CallbackTicket,
    Deferred,
    DeltaSink,
    StoredSessionMemory,
    Usage,
)
from chatgateway.metrics import Metrics
from chatgateway.models import (
    Action,
    NormalizedMessage,
    OutFile,
    Platform,
    Role,
    Session,
    SessionId,
    SessionKey,
    Turn,
)
from chatgateway.outbound import Outbound
from chatgateway.rich import FileLink, RichOutbound, chosen, fallback_text, typed_choice
from chatgateway.store.base import SessionStore
from chatgateway.tenants import TenantRegistry, TenantRuntime
from chatgateway.text import storable
from chatgateway.usage import UsageRecorder

if TYPE_CHECKING:  # coordination.local imports KeyedLocks from here
    from chatgateway.callbacks import Callbacks
    from chatgateway.config import TenantConfig
    from chatgateway.coordination.base import Coordinator
    from chatgateway.tracing import MessageTracer

log = structlog.get_logger("chatgateway.pipeline")

#: "collected": the message went to the agent with an earlier one of its session (collect mode).
#: "deferred": the agent answered 202 and sends the answer later (chatgateway/callbacks.py).
Outcome = Literal["ok", "empty", "fallback", "duplicate", "collected", "deferred"]

#: Platforms whose connection one instance owns at a time (a Discord bot's lease, see the
#: supervisor): their events reach only the owner, so they are not claimed; a claim would only
#: make the next owner drop the replay of what a killed owner had not finished.
LEASED_PLATFORMS = frozenset({Platform.DISCORD})


@dataclass(frozen=True, slots=True)
class Reply:
    """What the adapter should do: send `text` (nothing when empty) into `session`."""

    session: Session | None
    text: str
    outcome: Outcome
    cause: str | None = None
    #: The answer's files and buttons (chatgateway.rich); adapters that cannot show them got
    #: them as text in `outbound.finish`.
    files: tuple[OutFile, ...] = ()
    actions: tuple[Action, ...] = ()
    #: The stored agent turn's timestamp (the web API's file links name the turn by it).
    answered_at: float = 0.0


class KeyedLocks:
    """FIFO locks created on demand and dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, list[Any]] = {}

    async def acquire(self, key: Hashable) -> None:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._drop(key, entry)
            raise

    def release(self, key: Hashable) -> None:
        entry = self._locks[key]
        entry[0].release()
        self._drop(key, entry)

    def _drop(self, key: Hashable, entry: list[Any]) -> None:
        entry[1] -= 1
        if entry[1] == 0:
            del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


@dataclass(frozen=True, slots=True)
class _Series:
    """One (tenant, platform)'s metric children, looked up once instead of per message."""

    messages_in: Any
    messages_out: Any
    agent_latency: Any
    deduplicated: Any


#: What answers a message (`Pipeline._answer`): the message as the agent got it, its metrics,
#: the text, outcome and cause, the files and buttons, and the callback when the answer comes
#: later.
_Answer = tuple[
    NormalizedMessage,
    _Series,
    str,
    Outcome,
    str | None,
    tuple[OutFile, ...],
    tuple[Action, ...],
    CallbackTicket | None,
]


class Pipeline:
    """Takes normalized messages from every adapter and returns what to answer."""

    def __init__(
        self,
        store: SessionStore,
        tenants: TenantRegistry,
        metrics: Metrics,
        coordinator: Coordinator | None = None,
        *,
        claim_timeout: float | None = None,
    ) -> None:
        """`claim_timeout` (seconds): claim platform events in the store before processing
        them, so a redelivery to another instance waits for or takes over the first one."""
        if coordinator is None:
            from chatgateway.coordination.local import LocalCoordinator  # it imports KeyedLocks

            coordinator = LocalCoordinator()
        self.store = store
        self.tenants = tenants
        self.metrics = metrics
        self.coordinator = coordinator
        self._session_lock = coordinator.session_lock
        self._claim_timeout = claim_timeout
        #: Several instances share the store (a claim timeout is given only then).
        self._shared = claim_timeout is not None
        self._key_locks = KeyedLocks()
        #: Collect mode: the messages of each session waiting for its lock, in arrival order.
        self._collecting: dict[Hashable, list[NormalizedMessage]] = {}
        self._in_flight: set[tuple[str, str, str]] = set()
        self._active = 0
        self._per_tenant: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._series: dict[tuple[str, str], _Series] = {}
        #: Limits, quotas and the breaker; the daemon replaces it with one on the shared store.
        self.admission = Admission(metrics)
        metrics.watch_breakers(self._breaker_states)
        #: Agent calls and tokens per tenant: metrics, daily buckets, the token budget.
        self.usage = UsageRecorder(store, metrics)
        self._reserved = 0
        self.accepting = True
        #: Spans of every message (`tracing.enabled`); None costs nothing per message.
        self.tracer: MessageTracer | None = None
        #: Links to the files of stored answers (the web app sets it), for platforms that
        #: show an answer's files as links; None: files given as bytes are listed by name.
        self.file_link: FileLink | None = None
        #: Answers agents send later (202 + callback); None: no callback is offered.
        self.callbacks: Callbacks | None = None
        #: File links and fetching (adapters/web/files.py sets it); None: files get no link.
        self.files: FileService | None = None

    def _breaker_states(self) -> list[tuple[str, str]]:
        """(tenant, breaker state) of every tenant with a breaker, for the metric."""
        admission = self.admission
        return [
            (t.id, admission.breaker_state(t.id))
            for t in self.tenants.all()
            if t.config.breaker.enabled
        ]

    def _metrics_for(self, message: NormalizedMessage) -> _Series:
        labels = (message.tenant_id, message.platform.value)
        series = self._series.get(labels)
        if series is None:
            m = self.metrics
            series = self._series[labels] = _Series(
                m.messages_in.labels(*labels),
                m.messages_out.labels(*labels),
                m.agent_latency.labels(*labels),
                m.deduplicated.labels(*labels),
            )
        return series

    async def already_processed(self, message: NormalizedMessage) -> bool:
        """Whether this platform message was handled before (e.g. a redelivery or a replay).

        Adapters use it to skip cosmetic work such as a typing indicator; `handle` makes the
        real decision. A failing store answers False, so the message is never dropped here.
        """
        try:
            return await self.store.is_processed(
                message.tenant_id, message.platform, message.message_id
            )
        except Exception:
            return False

    @property
    def active(self) -> int:
        """Messages being processed or reserved right now (the drain waits for this to be 0)."""
        return self._active + self._reserved

    async def wait_idle(self) -> None:
        """Return once no message is being processed or reserved."""
        await self._idle.wait()

    def reserve(self) -> Reservation | None:
        """Count a message an adapter took from its platform (e.g. acked) but has not handed
        to `handle` yet; None once shutting down. See `Reservation`."""
        if not self.accepting:
            return None
        self._reserved += 1
        self._idle.clear()
        return Reservation(self)

    def _unreserve(self) -> None:
        self._reserved -= 1
        if self.active == 0:
            self._idle.set()

    async def handle(
        self,
        message: NormalizedMessage,
        *,
        session_id: SessionId | None = None,
        new_session: bool = False,
        dedup: bool = True,
        on_delta: DeltaSink | None = None,
        reservation: Reservation | None = None,
        admitted: bool = False,
        outbound: Outbound | None = None,
    ) -> Reply:
        """Process one message; a `reservation` taken for it is released on return.

        With an `outbound`, the answer is streamed through it as the agent writes and finished
        there once stored (the returned Reply is then for information only).

        Raises NotFoundError for an unknown tenant or a session the caller may not see, and
        OverloadedError when the tenant already has too many messages in flight,
        RateLimitedError when a limit or quota refuses it (`admitted`: the tenant's rate and
        quota were checked already, by the web API before it read the body), and
        UnavailableError once the gateway has begun to shut down (unless the message was
        reserved before).
        """
        work = self._process(
            message, session_id, new_session, dedup, on_delta, reservation, admitted, outbound
        )
        if self.tracer is None:
            return await work
        return await self.tracer.message(message, work)

    async def _process(
        self,
        message: NormalizedMessage,
        session_id: SessionId | None,
        new_session: bool,
        dedup: bool,
        on_delta: DeltaSink | None,
        reservation: Reservation | None,
        admitted: bool,
        outbound: Outbound | None,
    ) -> Reply:
        """`handle`'s work (inside the message's span when tracing)."""
        try:
            if not self.accepting and (reservation is None or not reservation.held):
                raise UnavailableError("the gateway is shutting down")
            tenant = self.tenants.get(message.tenant_id)
            if tenant is None:
                raise NotFoundError(f"no tenant {message.tenant_id!r}")
            series = self._metrics_for(message)
            series.messages_in.inc()
            agent = tenant.config.agent
            limit = agent.max_concurrency + agent.max_queue
            if self._per_tenant.get(message.tenant_id, 0) >= limit:
                # Admission control: a flood from one tenant queues against its own limit only.
                self.metrics.rejected.labels(
                    message.tenant_id, message.platform.value, "overloaded"
                ).inc()
                raise OverloadedError(f"tenant {message.tenant_id} has too many messages in flight")
            # The one admission point for limits and quotas (the breaker decides at call time).
            limits = tenant.config.limits
            if not admitted:
                await self.admission.admit_message(
                    message.tenant_id, message.platform.value, message.user.id, limits
                )
            elif limits.user is not None and not self.admission.check_user(
                message.tenant_id, message.platform.value, message.user.id, limits
            ):
                await self.admission.admit_user(
                    message.tenant_id, message.platform.value, message.user.id, limits
                )
            event = (message.tenant_id, message.platform.value, message.message_id)
            if dedup:
                in_flight = event in self._in_flight
                if in_flight or await self.store.is_processed(
                    message.tenant_id, message.platform, message.message_id
                ):
                    series.deduplicated.inc()
                    log.info(
                        "message_duplicate",
                        tenant_id=message.tenant_id,
                        platform=message.platform.value,
                        message_id=message.message_id,
                    )
                    if not in_flight and outbound is not None and outbound.idempotent:
                        await self._post_again(message, outbound)
                    return Reply(None, "", "duplicate")
                self._in_flight.add(event)
            self._active += 1
        finally:
            if reservation is not None:
                reservation.release()  # from here on `_active` counts the message
        self._per_tenant[message.tenant_id] = self._per_tenant.get(message.tenant_id, 0) + 1
        self._idle.clear()
        try:
            return await self._handle(
                tenant, message, session_id, new_session, dedup, on_delta, outbound
            )
        finally:
            self._in_flight.discard(event)
            self._active -= 1
            left = self._per_tenant[message.tenant_id] - 1
            if left:
                self._per_tenant[message.tenant_id] = left
            else:
                del self._per_tenant[message.tenant_id]
            if self.active == 0:
                self._idle.set()

    async def _handle(
        self,
        tenant: TenantRuntime,
        message: NormalizedMessage,
        session_id: SessionId | None,
        new_session: bool,
        dedup: bool,
        on_delta: DeltaSink | None,
        outbound: Outbound | None,
    ) -> Reply:
        """The admitted message's path: its files, its session and the session's lock (in
        arrival order), what answers it, then the record and the delivery of the answer."""
        started = time.monotonic()
        if outbound is not None and on_delta is None:
            on_delta = outbound.append
        config = tenant.config
        notice = ""
        if message.attachments:  # the size cap, and links for the agent (chatgateway/files.py)
            message, notice = await prepare_files(message, config, self.files)
            if notice and on_delta is not None:
                on_delta = notice_first(on_delta, notice)
        key = SessionKey.of(message)
        # Resolve (or create) the session under a per-key lock so two first messages of a
        # conversation make one session; then hold the session's lock for the agent call so
        # its messages reach the agent one at a time, in arrival order.
        lock_key: Hashable = session_id or key
        if (
            dedup
            and self._claim_timeout is not None
            and message.platform not in LEASED_PLATFORMS
            and not await self._claim(message)
        ):
            return Reply(None, "", "duplicate")
        collect = config.sessions.while_answering == "collect" and not new_session
        if collect:  # in arrival order, which is the order the locks below are taken in
            # Keyed by the sender too: a message naming someone else's session (refused below,
            # once resolved) never joins that session's batch.
            collect_key = (lock_key, message.tenant_id, message.platform, message.user.id)
            self._collecting.setdefault(collect_key, []).append(message)
        try:
            await self._key_locks.acquire(lock_key)
            try:
                session = await self._resolve(tenant, message, key, session_id, new_session)
                # Across instances (coordination: postgres) this also waits for other instances.
                session_lock = self._session_lock(session.id)
                await session_lock.__aenter__()
            finally:
                self._key_locks.release(lock_key)
        except BaseException:
            if collect:
                self._uncollect(collect_key, message)
            raise
        try:
            structlog.contextvars.bind_contextvars(
                tenant_id=message.tenant_id,
                platform=message.platform.value,
                session_id=session.id,
            )
            if (
                dedup
                and self._claim_timeout is not None
                and message.platform in LEASED_PLATFORMS
                and await self._answered_elsewhere(message, outbound)
            ):
                return Reply(None, "", "duplicate")
            callbacks = self.callbacks
            if callbacks is not None and callbacks.awaited(
                message.tenant_id, session.id, config.agent
            ):
                # The agent owes this session an answer (it answered 202): that one first.
                await callbacks.wait(message.tenant_id, session.id)
            earlier: tuple[NormalizedMessage, ...] = ()
            own = message
            if collect:
                batch = self._take_batch(collect_key, message)
                if batch is None:
                    return await self._collected(message, session, dedup, config.sessions)
                message, earlier, own = batch
            answer = await self._answer(tenant, session, message, earlier, notice, on_delta)
            return await self._finish(
                config, session, own, earlier, answer, notice, dedup, outbound, started
            )
        finally:
            structlog.contextvars.unbind_contextvars("tenant_id", "platform", "session_id")
            await session_lock.__aexit__(None, None, None)

    def _take_batch(
        self, key: Hashable, message: NormalizedMessage
    ) -> tuple[NormalizedMessage, tuple[NormalizedMessage, ...], NormalizedMessage] | None:
        """Collect mode, under the session's lock: the messages that waited for it with
        `message` first, as (the request's message, its `earlier` ones, the one whose event
        the answer is recorded for); None when an earlier one took `message` along."""
        batch = self._collecting.pop(key, None)
        if batch is None or batch[0] is not message:
            # An earlier message of the session took this one to the agent with it.
            if batch is not None:
                self._collecting[key] = batch
            return None
        # What arrived while the agent answered goes in this one call: the newest is
        # the request's message, the others its `earlier` ones; the answer goes where
        # this (the first) message's would.
        *rest, newest = batch
        return newest, tuple(rest), rest[0] if rest else newest

    async def _answered_elsewhere(
        self, message: NormalizedMessage, outbound: Outbound | None
    ) -> bool:
        """Whether a leased platform's message was answered while it waited for the session's
        lock (then it is counted and logged as a duplicate, its answer posted again)."""
        if not await self.store.is_processed(
            message.tenant_id, message.platform, message.message_id
        ):
            return False
        # A bot's previous owner, still finishing this message when its lease was lost,
        # answered it while we waited for the session's lock: Discord replayed it here.
        self._metrics_for(message).deduplicated.inc()
        log.info("message_duplicate", message_id=message.message_id, answered_elsewhere=True)
        if outbound is not None and outbound.idempotent:
            await self._post_again(message, outbound)
        return True

    async def _answer(
        self,
        tenant: TenantRuntime,
        session: Session,
        message: NormalizedMessage,
        earlier: tuple[NormalizedMessage, ...],
        notice: str,
        on_delta: DeltaSink | None,
    ) -> _Answer:
        """Build the agent request and choose what answers it: the token budget's notice, the
        file-size notice alone, the open breaker's fallback, or the agent (its failures get
        the fallback too)."""
        config = tenant.config
        callbacks = self.callbacks
        history = await self.store.history(
            message.tenant_id, session.id, config.agent.history_turns
        )
        # "1" or "Approve" right after an answer with buttons: the agent gets the value.
        picked = None if "action" in message.metadata else typed_choice(message.text, history)
        if picked is not None:
            message = chosen(message, *picked)
        request = AgentRequest(
            earlier=earlier,
            message=message,
            session_id=session.id,
            history=history,
            # Only A2A keeps state per session (the task waiting for the user's input).
            memory=StoredSessionMemory(self.store, message.tenant_id, session.id)
            if config.agent.protocol == "a2a"
            else None,
            callback=callbacks.ticket(message.tenant_id, config.agent)
            if callbacks is not None
            else None,
        )
        cause: str | None = None
        files: tuple[OutFile, ...] = ()
        actions: tuple[Action, ...] = ()
        deferred: CallbackTicket | None = None
        agent_started = time.monotonic()
        # The tenant's current client and breaker: a reload may have replaced them while
        # we queued.
        current = self.tenants.get(message.tenant_id) or tenant
        breaker = current.config.breaker
        # Only a tenant whose agent failed before has a breaker to ask (a dict lookup).
        tripped = breaker.enabled and message.tenant_id in self.admission.breakers
        series = self._metrics_for(message)
        outcome: Outcome
        budget = current.config.agent.daily_token_budget
        if budget is not None and await self.usage.spent_today(message.tenant_id) >= budget:
            # The day's tokens are spent: the tenant's notice, without calling the agent.
            cause, outcome = "token_budget", "fallback"
            text = current.config.agent.budget_notice
            self.metrics.rejected.labels(message.tenant_id, message.platform.value, cause).inc()
        elif notice and not message.text and not message.attachments:
            # Every file was over the cap and there is nothing else: only the notice.
            cause, text, outcome = "file_too_large", "", "fallback"
        elif tripped and not self.admission.breaker_allow(message.tenant_id, breaker):
            # The breaker is open: the fallback at once, without calling the agent.
            cause, text, outcome = "breaker_open", config.agent.fallback_text, "fallback"
            self.metrics.rejected.labels(message.tenant_id, message.platform.value, cause).inc()
        else:
            usage: Usage | None = None
            try:
                if self.tracer is None:
                    answer = await current.invoker.invoke(request, on_delta)
                else:
                    answer = await self.tracer.agent_call(
                        message, current.invoker.invoke(request, on_delta)
                    )
                if isinstance(answer, str):
                    text = answer
                elif isinstance(answer, Deferred):  # 202: the answer comes to the callback
                    text, deferred = "", request.callback
                else:  # an AgentAnswer: the protocol reported the tokens it used
                    text, usage = answer.text, answer.usage
                    files, actions = answer.files, answer.actions
                outcome = "ok" if text else "deferred" if deferred else "empty"
                if outcome == "empty" and (files or actions):  # only files or buttons
                    outcome = "ok"
                if tripped:
                    self.admission.breaker_record(message.tenant_id, breaker, True)
            except asyncio.CancelledError:
                if tripped:
                    self.admission.breaker_abandon(message.tenant_id)
                raise
            except Exception as exc:
                # An unexpected error (a bug) gets the fallback too, never a 500; its
                # traceback goes to the log, scrubbed of secrets like every line.
                cause = exc.cause if isinstance(exc, AgentError) else "internal"
                text, outcome = config.agent.fallback_text, "fallback"
                self.metrics.agent_failures.labels(
                    message.tenant_id, message.platform.value, cause
                ).inc()
                if isinstance(exc, AgentError):
                    log.warning("agent_failed", cause=cause, detail=str(exc))
                else:
                    detail = f"{type(exc).__name__}: {exc}"
                    log.exception("agent_failed", cause=cause, detail=detail)
                if breaker.enabled:
                    # Only the agent's failures count: a bug of ours is not the agent's.
                    self.admission.breaker_record(
                        message.tenant_id, breaker, not isinstance(exc, AgentError)
                    )
            series.agent_latency.observe(time.monotonic() - agent_started)
            self.usage.record(message.tenant_id, usage)
        return message, series, text, outcome, cause, files, actions, deferred

    async def _finish(
        self,
        config: TenantConfig,
        session: Session,
        own: NormalizedMessage,
        earlier: tuple[NormalizedMessage, ...],
        answer: _Answer,
        notice: str,
        dedup: bool,
        outbound: Outbound | None,
        started: float,
    ) -> Reply:
        """Store the exchange (and `own`'s event as processed), then hand the answer to the
        callback that waits for it or to the outbound, and log the message as handled."""
        message, series, text, outcome, cause, files, actions, deferred = answer
        now = time.time()
        # An agent may answer a NUL or a lone surrogate; PostgreSQL refuses the first and
        # neither store can encode the second, which would lose the whole exchange.
        text = storable(text)
        if notice:  # the files over the cap, before the answer (as streamed)
            text = f"{notice}\n\n{text}" if text else notice
        turns = [Turn(Role.USER, m.text, m.timestamp) for m in earlier]
        turns.append(Turn(Role.USER, message.text, message.timestamp))
        answer_at = max(now, message.timestamp)
        if text or files or actions:
            turns.append(Turn(Role.AGENT, text, answer_at, files, actions))
        await self.store.record_exchange(
            message.tenant_id,
            session.id,
            turns,
            max_turns=config.sessions.max_turns,
            processed_event=(own.platform, own.message_id) if dedup else None,
            # Kept for a replay after a crash before the post (see _post_again).
            keep_answer=dedup and outbound is not None and outbound.idempotent,
        )
        if text:
            series.messages_out.inc()
        callbacks = self.callbacks
        if deferred is not None and callbacks is not None:
            await callbacks.defer(message, session.id, deferred, outbound)
        elif outbound is not None:
            link = None
            if files and self.file_link is not None:
                link = partial(self.file_link, message.tenant_id, session.id, answer_at)
            await self._deliver(outbound, text, files, actions, link)
            if dedup and outbound.idempotent and (text or files or actions):
                await self._answer_posted(own)
        log.info(
            "message_handled",
            outcome=outcome,
            cause=cause,
            latency_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return Reply(session, text, outcome, cause, files, actions, answer_at)

    def _uncollect(self, key: Hashable, message: NormalizedMessage) -> None:
        waiting = self._collecting.get(key)
        if waiting is not None and message in waiting:
            waiting.remove(message)
            if not waiting:
                del self._collecting[key]

    async def _collected(
        self, message: NormalizedMessage, session: Session, dedup: bool, sessions: Any
    ) -> Reply:
        """A message answered with an earlier one (collect mode): only its event is marked."""
        if dedup:
            await self.store.record_exchange(
                message.tenant_id,
                session.id,
                [],
                max_turns=sessions.max_turns,
                processed_event=(message.platform, message.message_id),
            )
        log.info("message_handled", outcome="collected")
        return Reply(session, "", "collected")

    async def _deliver(
        self,
        outbound: Outbound,
        text: str,
        files: tuple[OutFile, ...] = (),
        actions: tuple[Action, ...] = (),
        link: Callable[[int, OutFile], str | None] | None = None,
    ) -> None:
        """Show the stored answer (still under the session's lock, so answers keep their order).
        The exchange is stored already: a platform failure is logged, never raised. Files and
        buttons an outbound cannot show go as text (links, numbered choices)."""
        try:
            if (files or actions) and isinstance(outbound, RichOutbound):
                await outbound.finish_rich(text, files, actions)
            else:
                await outbound.finish(fallback_text(text, files, actions, link=link))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("reply_failed", error=f"{type(exc).__name__}: {exc}")

    async def _post_again(self, message: NormalizedMessage, outbound: Outbound) -> None:
        """A replayed platform message was answered before: its answer is stored, but the
        instance that stored it may have died before its post returned (the processed event
        points at the answer until then). Where a second post shows the answer once
        (`outbound.idempotent`: Discord's nonces), post the stored answer again, so it is shown
        exactly once either way. Failures are logged."""
        try:
            found = await self.store.processed_answer(
                message.tenant_id, message.platform, message.message_id
            )
            if found is None:
                return
            session_id, answer = found
            if answer.files or answer.actions:
                link = None
                if answer.files and self.file_link is not None:
                    link = partial(self.file_link, message.tenant_id, session_id, answer.timestamp)
                await self._deliver(outbound, answer.text, answer.files, answer.actions, link)
            elif answer.text:
                await outbound.post(answer.text)
            else:
                return
            await self._answer_posted(message)
            log.info("message_answer_posted_again", message_id=message.message_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("reply_failed", error=f"{type(exc).__name__}: {exc}")

    async def _answer_posted(self, message: NormalizedMessage) -> None:
        """The answer's post returned: a replay of the message need not post it again."""
        try:
            await self.store.answer_posted(
                message.tenant_id, message.platform, message.message_id
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A replay would post it once more: still shown once (the nonce).
            log.warning("answer_posted_failed", error=f"{type(exc).__name__}: {exc}")

    async def _claim(self, message: NormalizedMessage) -> bool:
        """Claim a platform event for this instance; False when another one has it or had it."""
        assert self._claim_timeout is not None
        now = time.time()
        claimed = await self.store.claim_event(
            message.tenant_id,
            message.platform,
            message.message_id,
            self.coordinator.instance_id,
            now,
            stale_before=now - self._claim_timeout,
        )
        if not claimed:
            self._metrics_for(message).deduplicated.inc()
            log.info(
                "message_duplicate",
                tenant_id=message.tenant_id,
                platform=message.platform.value,
                message_id=message.message_id,
                claimed_elsewhere=True,
            )
        return claimed

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
            if self._shared:
                return await self._find_or_create_shared(message, key, idle_since)
        return await self.store.create_session(
            key, kind=message.conversation.kind, user_name=message.user.display_name, now=now
        )

    async def _find_or_create_shared(
        self, message: NormalizedMessage, key: SessionKey, idle_since: float
    ) -> Session:
        """With several instances, one may be creating this conversation's session right now:
        decide under the key's cluster-wide lock (only for a conversation's first message)."""
        async with self._session_lock(key):
            session = await self.store.find_active_session(key, idle_since=idle_since)
            if session is not None:
                return session
            return await self.store.create_session(
                key,
                kind=message.conversation.kind,
                user_name=message.user.display_name,
                now=time.time(),
            )


class Reservation:
    """A message an adapter took from its platform before it reaches `Pipeline.handle`.

    Until released it counts as in flight (`active`, `wait_idle`), so the drain waits for it,
    and `handle` lets it in after shutdown began: the platform will not deliver it again.
    """

    __slots__ = ("_pipeline", "held")

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self.held = True

    async def handle(
        self,
        message: NormalizedMessage,
        *,
        dedup: bool = True,
        outbound: Outbound | None = None,
    ) -> Reply:
        """`Pipeline.handle` for the reserved message; releases the reservation."""
        return await self._pipeline.handle(
            message, dedup=dedup, reservation=self, outbound=outbound
        )

    def release(self) -> None:
        """Stop counting the message as in flight (idempotent)."""
        if self.held:
            self.held = False
            self._pipeline._unreserve()
