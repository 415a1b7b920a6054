"""Optional OpenTelemetry traces: one span per message, child spans for the store and the agent.

The daemon builds a `MessageTracer` only when `tracing.enabled` is set, and only this module
imports OpenTelemetry (an optional extra). Without a tracer the pipeline does no tracing work per
message and the agent gets no `traceparent` header.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast

from chatgateway import __version__
from chatgateway.errors import (
    AgentError,
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    UnavailableError,
)

if TYPE_CHECKING:
    import aiohttp
    from opentelemetry.sdk.trace.export import SpanExporter

    from chatgateway.config import TracingConfig
    from chatgateway.models import NormalizedMessage
    from chatgateway.pipeline import Reply
    from chatgateway.store.base import SessionStore

#: Adds the W3C `traceparent` of the current span to an agent call's headers. None until a
#: gateway of this process traces, so an HTTP invoker pays one global lookup when tracing is off.
inject: Callable[[dict[str, str]], None] | None = None

T = TypeVar("T")

#: Seconds an export to the collector may take, retries included; also bounds the stop's flush.
EXPORT_TIMEOUT = 5.0

#: Span attribute names (OpenTelemetry has no convention for a chat gateway's fields).
TENANT = "chatgateway.tenant"
PLATFORM = "chatgateway.platform"
OUTCOME = "chatgateway.outcome"
CAUSE = "chatgateway.cause"


def refusal(exc: BaseException) -> str | None:
    """The outcome of a message `Pipeline.handle` did not process because of `exc`, if expected.

    None for anything else: an error, recorded on the span with its status.
    """
    if isinstance(exc, RateLimitedError | OverloadedError):
        return "rejected"
    if isinstance(exc, NotFoundError):
        return "not_found"
    if isinstance(exc, UnavailableError):
        return "unavailable"  # the gateway is shutting down
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"  # e.g. the web client went away, or a forced stop
    return None


class MessageTracer:
    """One gateway's spans, on its own provider so that gateways in one process stay apart."""

    def __init__(self, config: TracingConfig, exporter: SpanExporter | None = None) -> None:
        """Export to `config.endpoint` over OTLP/HTTP, or at once to `exporter` (tests)."""
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        global inject
        self._trace = trace
        self._provider = TracerProvider(
            resource=Resource.create(
                {"service.name": config.service_name, "service.version": __version__}
            ),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Batched in the SDK's own thread: exporting never blocks the event loop.
            exporter = OTLPSpanExporter(endpoint=config.endpoint, timeout=EXPORT_TIMEOUT)
            processor: Any = BatchSpanProcessor(exporter)
        else:
            processor = SimpleSpanProcessor(exporter)
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("chatgateway", __version__)
        # Always W3C Trace Context, whatever OTEL_PROPAGATORS says: that is what agents get told.
        inject = TraceContextTextMapPropagator().inject

    async def message(
        self, message: NormalizedMessage, handling: Coroutine[Any, Any, Reply]
    ) -> Reply:
        """Await `handling` (the pipeline's work on `message`) inside the message's span."""
        from opentelemetry.trace import SpanKind, StatusCode

        with self._tracer.start_as_current_span(
            "chatgateway.message",
            kind=SpanKind.CONSUMER,
            attributes={
                TENANT: message.tenant_id,
                PLATFORM: message.platform.value,
                "messaging.message.id": message.message_id,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                reply = await handling
            except BaseException as exc:
                outcome = refusal(exc)
                if outcome is not None:
                    span.set_attribute(OUTCOME, outcome)
                    if isinstance(exc, RateLimitedError):
                        span.set_attribute(CAUSE, exc.reason)
                    elif isinstance(exc, OverloadedError):
                        span.set_attribute(CAUSE, "overloaded")
                else:
                    span.set_attribute(OUTCOME, "error")
                    span.record_exception(exc)
                    span.set_status(StatusCode.ERROR, type(exc).__name__)
                raise
            span.set_attribute(OUTCOME, reply.outcome)
            if reply.cause is not None:
                span.set_attribute(CAUSE, reply.cause)
            if reply.session is not None:
                span.set_attribute("chatgateway.session_id", reply.session.id)
            return reply

    async def agent_call(self, message: NormalizedMessage, call: Awaitable[T]) -> T:
        """Await the agent `call` inside a child span; HTTP invokers send it as `traceparent`."""
        from opentelemetry.trace import SpanKind, StatusCode

        with self._tracer.start_as_current_span(
            "chatgateway.agent_call",
            kind=SpanKind.CLIENT,
            attributes={TENANT: message.tenant_id, PLATFORM: message.platform.value},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await call
            except AgentError as exc:
                span.set_attribute(CAUSE, exc.cause)
                span.set_status(StatusCode.ERROR, exc.cause)
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR, type(exc).__name__)
                raise

    def traced_store(self, store: SessionStore, system: str) -> SessionStore:
        """`store` with a child span around each call made inside a message's span."""
        return cast("SessionStore", _TracedStore(store, self, system))

    def _store_call(
        self, method: Callable[..., Awaitable[Any]], name: str, system: str
    ) -> Callable[..., Awaitable[Any]]:
        trace = self._trace
        tracer = self._tracer

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            # Only inside a message: the admin API's and maintenance's calls are not traced.
            if not trace.get_current_span().is_recording():
                return await method(*args, **kwargs)
            with tracer.start_as_current_span(
                f"store.{name}",
                kind=trace.SpanKind.CLIENT,
                attributes={"db.system": system, "db.operation": name},
            ):
                return await method(*args, **kwargs)

        return call

    async def shutdown(self) -> None:
        """Export the spans still buffered (the SDK waits up to its export timeout)."""
        await asyncio.to_thread(self._provider.shutdown)


class _TracedStore:
    """Forwards to a store; its coroutine methods get a span each (wrapped once, on first use)."""

    def __init__(self, store: SessionStore, tracer: MessageTracer, system: str) -> None:
        self._store = store
        self._tracer = tracer
        self._system = system

    def __getattr__(self, name: str) -> Any:
        import inspect

        value = getattr(self._store, name)
        if inspect.iscoroutinefunction(value):
            value = self._tracer._store_call(value, name, self._system)
            # Cached on the instance: __getattr__ runs only for the first lookup of a method.
            setattr(self, name, value)
        return value


def client_trace_configs() -> list[aiohttp.TraceConfig] | None:
    """aiohttp hooks that add `traceparent` to an agent client's requests; None when off."""
    if inject is None:
        return None
    import aiohttp

    async def on_request_start(
        session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestStartParams
    ) -> None:
        # The current span is the message's agent call (or none: the header is left out).
        if inject is not None:
            inject(cast("dict[str, str]", params.headers))

    config = aiohttp.TraceConfig()
    config.on_request_start.append(on_request_start)
    return [config]


def httpx_event_hooks() -> dict[str, list[Callable[[Any], Awaitable[None]]]] | None:
    """httpx hooks that add `traceparent` to an agent client's requests (a2a); None when off."""
    if inject is None:
        return None

    async def on_request(request: Any) -> None:
        if inject is not None:
            inject(request.headers)

    return {"request": [on_request]}
