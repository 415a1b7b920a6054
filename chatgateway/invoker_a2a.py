"""The Agent2Agent protocol (`agent.protocol: a2a`) through the official `a2a-sdk` client.

The agent card is read from `{url}/.well-known/agent-card.json`; the SDK picks a transport both
sides speak (JSON-RPC or HTTP+JSON). The session is the A2A context id; a task that asks for
input stays open for the session's next message. The mapping is in docs/agent-protocol.md.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import mimetypes
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import structlog

from chatgateway import rich, tracing
from chatgateway.config import AgentConfig
from chatgateway.errors import AgentError
from chatgateway.invoker import (
    AgentAnswer,
    AgentRequest,
    DeltaSink,
    HttpAgentInvoker,
    _Retryable,
)
from chatgateway.models import Action, OutFile, SessionId

if TYPE_CHECKING:
    import httpx
    from a2a.client import Client
    from a2a.types.a2a_pb2 import AgentCard, Part, StreamResponse

log = structlog.get_logger("chatgateway.invoker")

# At INFO they log every request line and the whole agent card: noise in the gateway's log.
for _name in ("httpx", "a2a"):
    logging.getLogger(_name).setLevel(logging.WARNING)

#: Sessions whose task waits for the user's input, remembered per invoker (oldest dropped).
MAX_OPEN_TASKS = 10_000

# TaskState names (a2a.types.a2a_pb2.TaskState), compared by name to keep the SDK import lazy.
COMPLETED = "TASK_STATE_COMPLETED"
INPUT_REQUIRED = "TASK_STATE_INPUT_REQUIRED"
AUTH_REQUIRED = "TASK_STATE_AUTH_REQUIRED"
FAILED = {"TASK_STATE_FAILED", "TASK_STATE_REJECTED", "TASK_STATE_CANCELED"}


def parts_text(parts: Any) -> str:
    """The text parts of a message or an artifact as chat text, run on (an aggregated stream
    keeps each chunk as a part); files and data are not text (see `parts_items`)."""
    return "".join(str(part.text) for part in parts if part.WhichOneof("content") == "text")


#: An answer's file or button in the chatgateway protocol's form: ("attachments" or "actions",
#: the item), checked by chatgateway.rich like any agent's.
_Item = tuple[str, Any]


def _url_name(url: str) -> str:
    """A file name for a URL given without one: its path's last segment."""
    name = unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])
    return name or "file"


def part_items(part: Part) -> list[_Item]:
    """A part as a file or buttons of the answer: a file part (by `url` or as `raw` bytes, with
    its `filename` and `mediaType`) is an `attachments` item; a data part `{"actions": [...]}`
    brings buttons. Text and other data: nothing."""
    kind = part.WhichOneof("content")
    item: dict[str, Any]
    if kind == "url":
        item = {"name": part.filename or _url_name(part.url), "url": part.url}
    elif kind == "raw":
        if len(part.raw) > rich.MAX_DATA_BYTES:
            # Not encoded to be refused: said here, as chatgateway.rich would.
            reason = f"data: larger than {rich.MAX_DATA_BYTES} bytes (give a url)"
            log.warning("answer_part_dropped", part="attachments", reason=reason)
            return []
        ext = mimetypes.guess_extension(part.media_type) if part.media_type else None
        item = {"name": part.filename or f"file{ext or ''}"}
        item["data"] = base64.b64encode(part.raw).decode()
    elif kind == "data" and part.data.HasField("struct_value"):
        actions = part.data.struct_value.fields.get("actions")
        if actions is None:
            return []
        from google.protobuf.json_format import MessageToDict

        value = MessageToDict(actions)
        return [("actions", a) for a in value] if isinstance(value, list) else [("actions", value)]
    else:
        return []
    if part.media_type:
        item["contentType"] = part.media_type
    return [("attachments", item)]


def parts_items(parts: Any) -> list[_Item]:
    """The files and buttons among parts, in order."""
    return [item for part in parts for item in part_items(part)]


@dataclass
class _Outcome:
    """What the events of one send said: the task, its state, the text gathered so far, and
    the files and buttons of each source (artifacts, a direct message, the status message)."""

    task_id: str = ""
    state: str = ""
    artifacts: dict[str, list[str]] = field(default_factory=dict)
    message: str = ""
    status_text: str = ""
    artifact_items: dict[str, list[_Item]] = field(default_factory=dict)
    message_items: list[_Item] = field(default_factory=list)
    status_items: list[_Item] = field(default_factory=list)

    def text(self) -> str:
        answer = "\n".join("".join(chunks) for chunks in self.artifacts.values() if chunks)
        return answer or self.message or self.status_text

    def parts(self, *, status: bool) -> tuple[tuple[OutFile, ...], tuple[Action, ...]]:
        """The answer's files and buttons: the artifacts' and the message's, and the status
        message's when it is the answer (`status`), checked like the chatgateway protocol's."""
        found: dict[str, list[Any]] = {}
        sources = [*self.artifact_items.values(), self.message_items]
        for key, item in (i for items in sources for i in items):
            found.setdefault(key, []).append(item)
        if status:
            for key, item in self.status_items:
                found.setdefault(key, []).append(item)
        return rich.parse_parts(found) if found else ((), ())


class A2AInvoker(HttpAgentInvoker):
    """One tenant's A2A agent: the SDK's client, the deadline, retries and the concurrency cap
    of an HTTP agent."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__(config)
        assert config.url is not None
        self._base = config.url.rstrip("/")
        self._token = (
            config.bearer_token.get_secret_value() if config.bearer_token is not None else None
        )
        self._a2a: Client | None = None
        self._http: httpx.AsyncClient | None = None
        self._connecting = asyncio.Lock()
        #: session id -> the task that asked for input, continued by the session's next message
        #: (when the request brings no SessionMemory, e.g. an invoker used on its own).
        self._open_tasks: OrderedDict[SessionId, str] = OrderedDict()

    async def close(self) -> None:
        await super().close()
        client, self._a2a = self._a2a, None
        http, self._http = self._http, None
        if client is not None:
            await client.close()
        if http is not None:
            await http.aclose()

    async def _connect(self) -> Client:
        """The SDK's client, built once from the agent card (concurrent first calls wait)."""
        if self._a2a is not None:
            return self._a2a
        async with self._connecting:
            if self._a2a is None:
                self._a2a = await self._read_card()
            return self._a2a

    async def _read_card(self) -> Client:
        """Read the agent card and build the SDK's client for the transport it prefers."""
        import httpx
        from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
        from a2a.utils.constants import TransportProtocol

        if self._http is None:
            self._http = httpx.AsyncClient(
                headers=self.config.header_values(),
                timeout=httpx.Timeout(self.config.timeout),
                limits=httpx.Limits(max_connections=self.config.max_concurrency),
                # The message's `traceparent` when tracing, as HttpAgentInvoker's client sends.
                event_hooks=tracing.httpx_event_hooks(),
            )
        try:
            card = await A2ACardResolver(self._http, self._base).get_agent_card()
        except Exception as exc:
            # Not there yet (starting, a network blip): a retry may find it.
            raise _Retryable("agent_card", f"{type(exc).__name__}: {exc}"[:300]) from None
        self._authenticate(card)
        factory = ClientFactory(
            ClientConfig(
                streaming=True,
                httpx_client=self._http,
                supported_protocol_bindings=[
                    TransportProtocol.JSONRPC,
                    TransportProtocol.HTTP_JSON,
                ],
            )
        )
        try:
            client = factory.create(card)
        except ValueError as exc:
            raise AgentError("bad_response", f"agent card: {exc}") from None
        log.info(
            "a2a_agent_card",
            agent=card.name,
            streaming=bool(card.capabilities.streaming),
            url=self._base,
        )
        return client

    def _authenticate(self, card: AgentCard) -> None:
        """Send the bearer token the way the card's security scheme asks (default: bearer)."""
        if self._token is None or self._http is None:
            return
        for scheme in card.security_schemes.values():
            if scheme.HasField("api_key_security_scheme"):
                api_key = scheme.api_key_security_scheme
                if api_key.location.lower() == "header" and api_key.name:
                    self._http.headers[api_key.name] = self._token
                    return
        self._http.headers["Authorization"] = f"Bearer {self._token}"

    async def _call_with_retries(
        self, request: AgentRequest, on_delta: DeltaSink | None, deadline: float
    ) -> AgentAnswer:
        return await self._with_retries(lambda: self._send(request, on_delta))

    async def _send(self, request: AgentRequest, on_delta: DeltaSink | None) -> AgentAnswer:
        import httpx
        from a2a.client import A2AClientError
        from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest

        client = await self._connect()
        session = request.session_id
        message = Message(
            message_id=f"{request.message.platform.value}:{request.message.message_id}",
            # The gateway's session is the agent's conversation: it keeps its state by it.
            context_id=session,
            role=Role.ROLE_USER,
            # Collect mode: the messages that arrived meanwhile come first, a text part each.
            parts=[
                Part(text=m.text) for m in (*request.earlier, request.message) if m.text
            ],
        )
        for attachment in (a for m in (*request.earlier, request.message) for a in m.attachments):
            if attachment.url:  # the gateway passes files on as links, never their content
                message.parts.append(
                    Part(
                        url=attachment.url,
                        filename=attachment.name,
                        media_type=attachment.content_type or "",
                    )
                )
        memory = request.memory
        open_task = await memory.recall() if memory else self._open_tasks.pop(session, None)
        if open_task:
            message.task_id = open_task
        outcome = _Outcome()
        delivered = False

        async def sink(delta: str) -> None:
            nonlocal delivered
            delivered = True
            if on_delta is not None:
                await on_delta(delta)

        try:
            events: AsyncIterator[StreamResponse] = client.send_message(
                SendMessageRequest(message=message)
            )
            async for event in events:
                await _apply(outcome, event, sink if on_delta is not None else None)
        except (httpx.TransportError, A2AClientError) as exc:
            detail = f"{type(exc).__name__}: {exc}"[:300]
            if delivered:
                raise AgentError("stream_broken", detail) from None
            if isinstance(exc, httpx.TransportError):
                raise _Retryable("connection_error", detail) from None
            raise AgentError("agent_error", detail) from None
        waiting = outcome.state in (INPUT_REQUIRED, AUTH_REQUIRED)
        if memory is not None and (waiting or open_task):
            # Forgotten once the task moved on, whatever its end (a failure raises below).
            await memory.remember(outcome.task_id if waiting else None)
        answer = self._answer(session, outcome, remember=memory is None)
        if on_delta is not None and not delivered and answer.text:
            await on_delta(answer.text)  # an agent that does not stream: one delta
        return answer

    def _answer(self, session: SessionId, outcome: _Outcome, *, remember: bool) -> AgentAnswer:
        text = outcome.text()
        # The status message is the answer when the task asks for input, or when nothing else
        # said anything; its files and buttons come with it then.
        status_answer = outcome.state in (INPUT_REQUIRED, AUTH_REQUIRED) or not (
            any(any(chunks) for chunks in outcome.artifacts.values()) or outcome.message
        )
        if outcome.state in FAILED:
            cause = outcome.state.removeprefix("TASK_STATE_").lower()
            raise AgentError(f"task_{cause}", (outcome.status_text or "no reason given")[:300])
        if outcome.state in (INPUT_REQUIRED, AUTH_REQUIRED):
            # The agent's question is the answer; the user's next message continues the task.
            if remember:
                self._open_tasks[session] = outcome.task_id
                while len(self._open_tasks) > MAX_OPEN_TASKS:
                    self._open_tasks.popitem(last=False)
            text = outcome.status_text or text
        elif outcome.state and outcome.state != COMPLETED:
            # Still working when the stream or the answer ended: nothing would deliver the
            # result later (no callback delivery yet), so the user gets the fallback.
            raise AgentError("task_unfinished", f"the task is {outcome.state} at the end")
        files, actions = outcome.parts(status=status_answer)
        return AgentAnswer(text, None, files, actions)


async def _apply(outcome: _Outcome, event: StreamResponse, sink: DeltaSink | None) -> None:
    """Fold one event of a send into `outcome`, streaming new artifact text to `sink`."""
    from a2a.types.a2a_pb2 import TaskState

    kind = event.WhichOneof("payload")
    if kind == "message":
        outcome.message = parts_text(event.message.parts)
        outcome.message_items = parts_items(event.message.parts)
        if sink is not None and outcome.message:
            await sink(outcome.message)
    elif kind == "task":
        task = event.task
        outcome.task_id = task.id
        outcome.state = TaskState.Name(task.status.state)
        outcome.status_text = parts_text(task.status.message.parts)
        outcome.status_items = parts_items(task.status.message.parts)
        for artifact in task.artifacts:
            outcome.artifacts[artifact.artifact_id] = [parts_text(artifact.parts)]
            outcome.artifact_items[artifact.artifact_id] = parts_items(artifact.parts)
    elif kind == "status_update":
        update = event.status_update
        outcome.task_id = update.task_id or outcome.task_id
        outcome.state = TaskState.Name(update.status.state)
        if update.status.HasField("message"):
            outcome.status_text = parts_text(update.status.message.parts)
            outcome.status_items = parts_items(update.status.message.parts)
    elif kind == "artifact_update":
        update = event.artifact_update
        text = parts_text(update.artifact.parts)
        chunks = outcome.artifacts.setdefault(update.artifact.artifact_id, [])
        items = outcome.artifact_items.setdefault(update.artifact.artifact_id, [])
        if not update.append:
            chunks.clear()
            items.clear()
        chunks.append(text)
        items += parts_items(update.artifact.parts)
        if sink is not None and text:
            await sink(text)
