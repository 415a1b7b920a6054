"""The OpenAI-compatible Chat Completions protocol (`agent.protocol: openai`).

`POST {url}/chat/completions`, plain or streamed as server-sent events; OpenAI, Azure OpenAI,
vLLM, Ollama, LiteLLM and most model gateways speak it. The mapping is in docs/agent-protocol.md.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError

from chatgateway import codec
from chatgateway.config import AgentConfig
from chatgateway.errors import AgentError
from chatgateway.invoker import (
    AgentAnswer,
    AgentRequest,
    DeltaSink,
    HttpAgentInvoker,
    Usage,
    _Retryable,
)
from chatgateway.models import Role

log = structlog.get_logger("chatgateway.invoker")

SSE = "text/event-stream"
CONTENT_FILTER = "content_filter"


def chat_payload(config: AgentConfig, request: AgentRequest, *, stream: bool) -> dict[str, Any]:
    """The Chat Completions request body: system prompt, the session's history, the message."""
    messages: list[dict[str, str]] = []
    if config.system_prompt:
        messages.append({"role": "system", "content": config.system_prompt})
    for turn in request.history:
        role = "assistant" if turn.role is Role.AGENT else "user"
        messages.append({"role": role, "content": turn.text})
    # Collect mode: the messages that arrived while the agent answered, one user turn each.
    messages.extend({"role": "user", "content": m.text} for m in request.earlier)
    messages.append({"role": "user", "content": request.message.text})
    body: dict[str, Any] = {"model": config.model, "messages": messages}
    if stream:
        body["stream"] = True
        # The usage arrives in a last chunk with no choices (OpenAI, vLLM, Ollama, LiteLLM).
        body["stream_options"] = {"include_usage": True}
    # Helps the provider attribute abuse to one end user without revealing who it is.
    body["user"] = f"{request.message.tenant_id}:{request.session_id}"
    return body


def usage_of(data: Any) -> Usage | None:
    """The `usage` object of a completion or a chunk, if it has one."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return Usage(
        tokens_in if isinstance(tokens_in, int) else 0,
        tokens_out if isinstance(tokens_out, int) else 0,
    )


def first_choice(data: Any) -> dict[str, Any] | None:
    """`choices[0]` of a completion or a chunk (a usage-only chunk has none)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def retry_after(headers: Any, now: float) -> float | None:
    """Seconds the provider asks to wait: `retry-after-ms` (OpenAI, Azure) or `Retry-After`."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def error_message(body: bytes, api_key: str | None) -> str:
    """The provider's error message (OpenAI's {"error": {"message"}}), never the key."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("code") or "")
    elif isinstance(error, str):
        message = error
    else:
        message = body[:200].decode("utf-8", "replace")
    if api_key:
        # OpenAI quotes part of a wrong key back ("Incorrect API key provided: sk-ab***yz").
        message = message.replace(api_key, "***")
    return message[:300]


class OpenAIInvoker(HttpAgentInvoker):
    """One tenant's OpenAI-compatible endpoint, with the pool, deadline and retries of an HTTP
    agent."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__(config)
        assert config.url is not None
        base = config.url.rstrip("/")
        self._url = base + "/chat/completions"
        self._query = dict(config.query)
        self._api_key = (
            config.bearer_token.get_secret_value() if config.bearer_token is not None else None
        )

    async def _call_with_retries(
        self, request: AgentRequest, on_delta: DeltaSink | None, deadline: float
    ) -> AgentAnswer:
        stream = on_delta is not None
        body = codec.dumps(chat_payload(self.config, request, stream=stream))
        headers = dict(self._headers)
        headers["Accept"] = SSE if stream else "application/json"
        return await self._with_retries(
            lambda: self._complete(body, headers, on_delta, deadline)
        )

    async def _complete(
        self, body: bytes, headers: dict[str, str], on_delta: DeltaSink | None, deadline: float
    ) -> AgentAnswer:
        delivered = False

        async def sink(delta: str) -> None:
            nonlocal delivered
            delivered = True
            assert on_delta is not None
            await on_delta(delta)

        try:
            async with self._client().post(
                self._url, data=body, headers=headers, params=self._query
            ) as resp:
                if resp.status == 429 or resp.status >= 500:
                    await self._retryable(resp, deadline)
                if resp.status >= 400:
                    message = error_message(await resp.read(), self._api_key)
                    raise AgentError(
                        "http_4xx", f"provider answered HTTP {resp.status}: {message}"
                    )
                if resp.content_type == SSE:
                    text, finish, usage = await _read_events(resp, sink if on_delta else None)
                else:
                    text, finish, usage = _read_completion(await resp.read())
                    if on_delta is not None and text and finish != CONTENT_FILTER:
                        await on_delta(text)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if delivered:
                raise AgentError("stream_broken", detail) from None
            raise _Retryable("connection_error", detail) from None
        except (aiohttp.ClientError, HttpProcessingError, ValueError) as exc:
            raise AgentError("bad_response", f"{type(exc).__name__}: {exc}"[:300]) from None
        if finish == CONTENT_FILTER:
            notice = self.config.content_filter_notice
            if notice is None:
                raise AgentError("content_filter", "the provider filtered the completion")
            log.info("agent_content_filtered")
            if on_delta is not None and not delivered:
                await on_delta(notice)
            return AgentAnswer(notice, usage)
        return AgentAnswer(text, usage)

    async def _retryable(self, resp: aiohttp.ClientResponse, deadline: float) -> None:
        """Raise the _Retryable a 429 or 5xx answer is, or an AgentError when its Retry-After
        would pass the call's deadline."""
        message = error_message(await resp.read(), self._api_key)
        cause = "http_429" if resp.status == 429 else "http_5xx"
        detail = f"provider answered HTTP {resp.status}: {message}"
        wait = retry_after(resp.headers, time.time())
        if wait is not None and asyncio.get_running_loop().time() + wait >= deadline:
            raise AgentError(cause, f"{detail} (Retry-After {wait:g}s passes the deadline)")
        raise _Retryable(cause, detail, wait)


def _read_completion(raw: bytes) -> tuple[str, str | None, Usage | None]:
    """Text, finish reason and usage of a plain (not streamed) completion."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise AgentError("bad_response", "provider answer is not JSON") from None
    choice = first_choice(data)
    if choice is None:
        raise AgentError("bad_response", "provider answer has no choices")
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if content is not None and not isinstance(content, str):
        raise AgentError("bad_response", "provider answer's content is not a string")
    finish = choice.get("finish_reason")
    return content or "", finish if isinstance(finish, str) else None, usage_of(data)


async def _read_events(
    resp: aiohttp.ClientResponse, on_delta: DeltaSink | None
) -> tuple[str, str | None, Usage | None]:
    """Read a streamed completion: `data: {chunk}` events until `data: [DONE]`."""
    parts: list[str] = []
    finish: str | None = None
    usage: Usage | None = None
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments (": keep-alive"), event names
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise AgentError("bad_response", "provider stream event is not JSON") from None
        if isinstance(chunk, dict) and "error" in chunk:
            raise AgentError("agent_error", error_message(payload, None))
        usage = usage_of(chunk) or usage
        choice = first_choice(chunk)
        if choice is None:
            continue
        if isinstance(choice.get("finish_reason"), str):
            finish = choice["finish_reason"]
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str) and content:
            parts.append(content)
            if on_delta is not None and finish != CONTENT_FILTER:
                await on_delta(content)
    return "".join(parts), finish, usage
