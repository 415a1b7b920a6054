"""Call a tenant's agent: the invoker interface, the chatgateway protocol, retries in a deadline.

The wire format is documented in docs/agent-protocol.md; `agent_payload` is its only writer. The
other protocols (`agent.protocol`) live in `invoker_openai` and `invoker_a2a`, built by
`make_invoker`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from chatgateway import codec, rich, tracing
from chatgateway.config import AgentConfig
from chatgateway.errors import AgentError
from chatgateway.models import Attachment, NormalizedMessage, SessionId, TenantId, Turn

if TYPE_CHECKING:
    from chatgateway.models import Action, OutFile
    from chatgateway.store.base import SessionStore

PROTOCOL_VERSION = 1
SIGNATURE_HEADER = "X-Chatgateway-Signature"
TIMESTAMP_HEADER = "X-Chatgateway-Timestamp"
NDJSON = "application/x-ndjson"

#: Receives each text delta of a streaming answer as it arrives.
DeltaSink = Callable[[str], Awaitable[None]]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one agent call used, as the agent's protocol reported them."""

    tokens_in: int = 0
    tokens_out: int = 0


@dataclass(frozen=True, slots=True)
class AgentAnswer:
    """An answer with what it cost; an invoker whose protocol reports no usage returns a str."""

    text: str
    usage: Usage | None = None
    #: Files and buttons the answer carries (`attachments`, `actions`; chatgateway.rich).
    files: tuple[OutFile, ...] = ()
    actions: tuple[Action, ...] = ()


@dataclass(frozen=True, slots=True)
class Deferred:
    """The agent answered 202 Accepted: the answer comes later, to the request's callback."""


@dataclass(slots=True)  # not frozen: made per request, and a frozen __init__ costs more
class CallbackTicket:
    """Where and with what an agent sends an answer later (the request's `callback` field)."""

    callback_id: str
    url: str
    token: str
    expires_at: int

    def as_payload(self) -> dict[str, Any]:
        return {"url": self.url, "token": self.token, "expiresAt": self.expires_at}


class SessionMemory(Protocol):
    """What a protocol keeps for one session between its messages (e.g. an open A2A task)."""

    async def recall(self) -> str | None: ...

    async def remember(self, value: str | None) -> None: ...


@dataclass(frozen=True, slots=True)
class StoredSessionMemory:
    """A session's memory in the store, so it survives a restart and is shared by instances."""

    store: SessionStore
    tenant_id: TenantId
    session_id: SessionId

    async def recall(self) -> str | None:
        return await self.store.agent_state(self.tenant_id, self.session_id)

    async def remember(self, value: str | None) -> None:
        await self.store.set_agent_state(self.tenant_id, self.session_id, value, now=time.time())


@dataclass(frozen=True, slots=True)
class AgentRequest:
    message: NormalizedMessage
    session_id: SessionId
    history: list[Turn]
    #: Given to the protocols that keep state per session (a2a); None for the others.
    memory: SessionMemory | None = None
    #: Collect mode: the session's messages that arrived while the agent answered, before
    #: `message`, sent in this one call.
    earlier: tuple[NormalizedMessage, ...] = ()
    #: The callback the agent may answer to later (protocol chatgateway with callbacks on).
    callback: CallbackTicket | None = None


class AgentInvoker(Protocol):
    """One tenant's agent. `invoke` returns the answer text ("" means send nothing), or an
    AgentAnswer when the protocol reports token usage, or Deferred when the agent will answer
    later to the request's callback."""

    async def invoke(
        self, request: AgentRequest, on_delta: DeltaSink | None = None
    ) -> str | AgentAnswer | Deferred: ...

    async def close(self) -> None: ...


def agent_payload(request: AgentRequest) -> dict[str, Any]:
    """Build the JSON body the agent receives (docs/agent-protocol.md)."""
    msg = request.message
    payload: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "tenant": msg.tenant_id,
        "sessionId": request.session_id,
        "platform": msg.platform.value,
        "user": {"id": msg.user.id, "name": msg.user.display_name},
        "conversation": {
            "id": msg.conversation.id,
            "type": msg.conversation.kind.value,
            "threadId": msg.conversation.thread_id,
        },
        "message": message_payload(msg),
        "history": [
            {"role": t.role.value, "text": t.text, "timestamp": t.timestamp}
            for t in request.history
        ],
        "metadata": msg.metadata,
    }
    if request.earlier:  # collect mode: the messages before `message`, oldest first
        payload["earlier"] = [message_payload(m) for m in request.earlier]
    if request.callback is not None:
        payload["callback"] = request.callback.as_payload()
    return payload


def message_payload(msg: NormalizedMessage) -> dict[str, Any]:
    """One message as the agent receives it (`message`, and each of `earlier`)."""
    return {
        "id": msg.message_id,
        "text": msg.text,
        "timestamp": msg.timestamp,
        # `url` is the gateway's link (chatgateway/files.py), never the platform's `source`.
        "attachments": [attachment_payload(a) for a in msg.attachments],
    }


def attachment_payload(attachment: Attachment) -> dict[str, Any]:
    """One attachment as the agent receives it; `data` only when the tenant inlines images."""
    item: dict[str, Any] = {
        "name": attachment.name,
        "contentType": attachment.content_type,
        "size": attachment.size,
        "url": attachment.url,
    }
    if attachment.data is not None:
        item["data"] = attachment.data
    return item


def idempotency_key(message: NormalizedMessage) -> str:
    """Stable per platform message, so an agent can drop a repeated call."""
    raw = f"{message.tenant_id}\x00{message.platform.value}\x00{message.message_id}"
    return hashlib.sha256(raw.encode()).hexdigest()[:40]


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header value: v1=hex(HMAC-SHA256(secret, "v1:" + timestamp + ":" + body))."""
    mac = hmac.new(secret, b"v1:" + timestamp.encode() + b":" + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify_signature(
    secret: bytes, timestamp: str, body: bytes, signature: str, *, tolerance: float = 300.0
) -> bool:
    """Check a request's signature as an agent would (also used by the test agents)."""
    try:
        age = abs(time.time() - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance and hmac.compare_digest(sign(secret, timestamp, body), signature)


class _Retryable(Exception):
    def __init__(self, cause: str, detail: str, retry_after: float | None = None) -> None:
        self.cause = cause
        self.detail = detail
        #: The agent's Retry-After, seconds: the next attempt waits this long instead.
        self.retry_after = retry_after
        super().__init__(detail)


class EchoAgent:
    """The built-in `echo` agent: answers with the message text, no HTTP involved."""

    async def invoke(self, request: AgentRequest, on_delta: DeltaSink | None = None) -> str:
        text = f"echo: {request.message.text}"
        if on_delta is not None:
            await on_delta(text)
        return text

    async def close(self) -> None:
        return None


class HttpAgentInvoker:
    """One tenant's HTTP agent with its own connection pool, deadline and concurrency cap."""

    def __init__(self, config: AgentConfig) -> None:
        assert config.url is not None
        self.config = config
        self._url = config.url
        self._secret = config.secret.get_secret_value().encode() if config.secret else None
        self._headers = {"Content-Type": "application/json", **config.header_values()}
        if config.bearer_token is not None:
            self._headers["Authorization"] = f"Bearer {config.bearer_token.get_secret_value()}"
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.config.max_concurrency)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                # Every HTTP invoker's requests carry the message's `traceparent` when tracing.
                trace_configs=tracing.client_trace_configs(),
            )
        return self._session

    async def close(self) -> None:
        """Close the pool once the calls in flight are done (they end by their deadline)."""
        try:
            async with asyncio.timeout(self.config.timeout + 1):
                await self._idle.wait()
        except TimeoutError:
            pass
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def invoke(
        self, request: AgentRequest, on_delta: DeltaSink | None = None
    ) -> str | AgentAnswer | Deferred:
        self._active += 1
        self._idle.clear()
        try:
            async with asyncio.timeout(self.config.timeout) as scope:
                await self._slots.acquire()
                try:
                    return await self._call_with_retries(request, on_delta, scope.when() or 0.0)
                finally:
                    self._slots.release()
        except TimeoutError:
            raise AgentError("timeout", f"no answer within {self.config.timeout:g}s") from None
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def _call_with_retries(
        self, request: AgentRequest, on_delta: DeltaSink | None, deadline: float
    ) -> str | AgentAnswer | Deferred:
        """One call with its retries; `deadline` is the event loop's time it must end by."""
        body = codec.dumps(agent_payload(request))
        headers = dict(self._headers)
        headers["Idempotency-Key"] = idempotency_key(request.message)
        headers["Accept"] = f"application/json, {NDJSON}" if on_delta else "application/json"
        try:
            # The common case, one successful attempt, skips the retry machinery entirely.
            answer = await self._call_once(body, headers, on_delta)
        except _Retryable as exc:
            answer = await self._retry(lambda: self._call_once(body, headers, on_delta), exc)
        if isinstance(answer, Deferred) and request.callback is None:
            raise AgentError("bad_response", "agent answered 202 but was offered no callback")
        return answer

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call`, again on _Retryable with jittered backoff (or its Retry-After)."""
        try:
            return await call()
        except _Retryable as exc:
            failure = exc
        return await self._retry(call, failure)

    async def _retry(self, call: Callable[[], Awaitable[T]], failure: _Retryable) -> T:
        """Retry `call` after its first attempt failed with `failure`."""
        if self.config.retry.attempts == 1:
            raise AgentError(failure.cause, failure.detail)
        first_wait = failure.retry_after
        retry = self.config.retry
        # Full jitter on every wait, the first included, so clients that failed together do not
        # retry together. Attempt n of the loop is the call's attempt n + 1, hence 2 * initial.
        backoff = wait_random_exponential(
            multiplier=2 * retry.backoff_initial, max=retry.backoff_max
        )

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, _Retryable) and error.retry_after is not None:
                return error.retry_after
            return float(backoff(state))

        retrying = AsyncRetrying(
            stop=stop_after_attempt(retry.attempts - 1),
            wait=wait,
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
            sleep=asyncio.sleep,
        )
        try:
            if first_wait is None:
                first_wait = random.uniform(0, min(retry.backoff_initial, retry.backoff_max))
            await asyncio.sleep(first_wait)
            async for attempt in retrying:
                with attempt:
                    return await call()
        except _Retryable as exc:
            raise AgentError(exc.cause, exc.detail) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call_once(
        self, body: bytes, headers: dict[str, str], on_delta: DeltaSink | None
    ) -> str | AgentAnswer | Deferred:
        if self._secret is not None:
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(self._secret, timestamp, body)
        delivered = False

        async def sink(delta: str) -> None:
            nonlocal delivered
            delivered = True
            if on_delta is not None:
                await on_delta(delta)

        try:
            async with self._client().post(self._url, data=body, headers=headers) as resp:
                if resp.status >= 500:
                    raise _Retryable("http_5xx", f"agent answered HTTP {resp.status}")
                if resp.status >= 400:
                    raise AgentError("http_4xx", f"agent answered HTTP {resp.status}")
                if resp.status == 202:  # "I will answer later", to the request's callback
                    return Deferred()
                if resp.content_type == NDJSON:
                    return await _read_stream(resp, sink if on_delta else None)
                try:
                    # orjson also refuses what the store could not keep (a lone surrogate).
                    data = orjson.loads(await resp.read())
                except orjson.JSONDecodeError:
                    raise AgentError("bad_response", "agent answer is not JSON") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if delivered:
                # The visitor already saw part of the answer; a retry would show it twice.
                raise AgentError("stream_broken", detail) from None
            raise _Retryable("connection_error", detail) from None
        except (aiohttp.ClientError, HttpProcessingError, ValueError) as exc:
            # A malformed answer (bad HTTP, redirect loop, an overlong stream line): the agent's
            # fault, not the gateway's, so the user gets the fallback instead of a 500.
            raise AgentError("bad_response", f"{type(exc).__name__}: {exc}"[:300]) from None
        if not isinstance(data, dict):
            raise AgentError("bad_response", "agent answer is not a JSON object")
        text = data.get("response")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise AgentError("bad_response", "agent answer's 'response' is not a string")
        if on_delta is not None and text:
            await on_delta(text)
        files, actions = rich.parse_parts(data)
        if files or actions:
            return AgentAnswer(text, None, files, actions)
        return text


async def _read_stream(
    resp: aiohttp.ClientResponse, on_delta: DeltaSink | None
) -> str | AgentAnswer:
    """Read an NDJSON answer: lines of {"delta": "..."}; an optional {"error": "..."} ends it;
    a line with `attachments` or `actions` (usually the last) gives the answer's files and
    buttons."""
    parts: list[str] = []
    extra: dict[str, Any] = {}
    async for raw in resp.content:
        line = raw.strip()
        if not line:
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise AgentError("bad_response", "agent stream line is not JSON") from None
        if not isinstance(item, dict):
            raise AgentError("bad_response", "agent stream line is not an object")
        if "error" in item:
            raise AgentError("agent_error", str(item["error"])[:200])
        delta = item.get("delta")
        if isinstance(delta, str) and delta:
            parts.append(delta)
            if on_delta is not None:
                await on_delta(delta)
        for key in ("attachments", "actions"):
            if key in item:
                extra[key] = item[key]
    if extra:
        files, actions = rich.parse_parts(extra)
        if files or actions:
            return AgentAnswer("".join(parts), None, files, actions)
    return "".join(parts)


def make_invoker(config: AgentConfig) -> AgentInvoker:
    """Build the invoker a tenant's agent config asks for (`agent.protocol`)."""
    if config.builtin == "echo":
        return EchoAgent()
    if config.protocol == "openai":
        from chatgateway.invoker_openai import OpenAIInvoker

        return OpenAIInvoker(config)
    if config.protocol == "a2a":
        # Imported only when a tenant uses it: the A2A SDK is large (protobuf, httpx).
        from chatgateway.invoker_a2a import A2AInvoker

        return A2AInvoker(config)
    return HttpAgentInvoker(config)
