"""The one way answers leave the gateway: post, append, finish — on any platform.

The pipeline streams an answer through an `Outbound`: `append` as the agent writes, `finish`
with the whole answer once it is stored (`post` for an answer that comes in one piece). An
adapter provides one per reply; it makes only its platform's API calls. What is the same on every
platform that shows a growing answer by editing a posted message (batching deltas to about one
edit a second, continuing in a new message past the size limit, making the final messages equal
the full answer) is `EditedStream`, here, once.

An `Address` says where a reply goes in plain data, so an answer that arrives later (an agent's
callback, possibly at another instance or after a restart) reaches the same thread or channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from chatgateway.models import Platform

log = structlog.get_logger("chatgateway.outbound")

#: How often a streamed answer's message is edited at most (seconds).
EDIT_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Address:
    """Where a reply goes, as plain JSON-able data: the platform, the adapter's name within the
    tenant (the Slack app or Discord bot; "web" for the web chat) and the platform's target
    (channel, thread, message replied to ...)."""

    platform: Platform
    adapter: str
    target: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform.value,
            "adapter": self.adapter,
            "target": dict(self.target),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Address:
        return cls(Platform(data["platform"]), str(data["adapter"]), dict(data.get("target") or {}))


class Outbound(Protocol):
    """One answer on its way to the user.

    `post(text)` shows an answer that came in one piece. `append(delta)` adds words of an answer
    being streamed (the first call makes it visible). `finish(text)` ends a streamed answer:
    afterwards the user sees exactly `text`, the whole answer (it may differ from the deltas,
    e.g. the fallback text after a stream broke off); without appends before, it is `post`.
    Platform errors are logged by the implementation, not raised: the answer is already stored.
    """

    address: Address
    #: Whether posting the same answer twice shows it once (Discord's nonces): then a replayed
    #: message whose answer was stored but perhaps not posted (a crash between) is posted again.
    idempotent: bool

    async def post(self, text: str) -> None: ...

    async def append(self, delta: str) -> None: ...

    async def finish(self, text: str) -> None: ...


class OutboundFactory(Protocol):
    """What an adapter offers for answers that arrive later: an Outbound for an address."""

    def outbound(self, address: Address) -> Outbound | None: ...


class MessageEditor(Protocol):
    """A platform's calls for showing an answer as messages that are posted and then edited."""

    def render(self, text: str) -> list[str]:
        """`text` as the platform's messages: converted, and split past the size limit without
        cutting a word or a code block. Must be stable: a longer text that starts with `text`
        renders its full parts the same way (the parts before its last one do not change)."""
        ...

    async def send(self, text: str, index: int) -> Hashable | None:
        """Post part `index` of the answer; its handle for `edit`, or None if it failed."""
        ...

    async def edit(self, handle: Hashable, text: str) -> bool:
        """Replace the text of a message posted before; False if it failed."""
        ...


class EditedStream:
    """An Outbound that streams by editing: the first words are posted at once, then the
    message is edited at most once per `interval` with everything that arrived meanwhile; past
    the size limit the answer continues in a new message. `finish` makes the messages show
    exactly the full answer."""

    def __init__(
        self,
        editor: MessageEditor,
        address: Address,
        *,
        interval: float = EDIT_INTERVAL,
        idempotent: bool = False,
    ) -> None:
        self.address = address
        self.idempotent = idempotent
        self._editor = editor
        self._interval = interval
        self._text = ""
        #: What each message shows now, with its handle (None: posting it failed).
        self._shown: list[tuple[Hashable | None, str]] = []
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last = 0.0
        self._finished = False
        #: Platform calls made (sends and edits), for the benchmark and the logs.
        self.calls = 0
        #: When the first words became visible (time.monotonic()), for the benchmark.
        self.first_visible: float | None = None

    async def post(self, text: str) -> None:
        await self.finish(text)

    async def append(self, delta: str) -> None:
        if self._finished or not delta:
            return
        self._text += delta
        if not self._shown and self.first_visible is None and not self._lock.locked():
            # The first words are shown at once: the user waited long enough.
            async with self._lock:
                await self._show(self._text)
            return
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_later(), name="outbound-flush")

    async def finish(self, text: str) -> None:
        if self._finished:
            return
        self._finished = True
        flusher = self._flusher
        if flusher is not None:
            # Never cancelled mid-call (a post cut off may still have landed): woken, it ends.
            self._wake.set()
            await asyncio.wait({flusher})
        self._text = text
        async with self._lock:
            await self._show(text)

    async def _flush_later(self) -> None:
        try:
            while True:
                wait = self._last + self._interval - time.monotonic()
                if wait > 0:
                    try:
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                if self._finished:
                    return
                async with self._lock:
                    text = self._text
                    await self._show(text)
                if self._text == text:
                    return
        finally:
            if self._flusher is asyncio.current_task():
                self._flusher = None

    async def _show(self, text: str) -> None:
        """Make the messages show `text`: edit what changed, post what is new."""
        parts = self._editor.render(text) if text else []
        shown = self._shown
        for index, part in enumerate(parts):
            if index < len(shown):
                handle, current = shown[index]
                if handle is None:
                    # Posting it failed before: try again (an idempotent editor shows it once).
                    self.calls += 1
                    shown[index] = (await self._editor.send(part, index), part)
                elif current != part:
                    self.calls += 1
                    if await self._editor.edit(handle, part):
                        shown[index] = (handle, part)
            else:
                self.calls += 1
                handle = await self._editor.send(part, index)
                shown.append((handle, part))
                if handle is not None and self.first_visible is None:
                    self.first_visible = time.monotonic()
        self._last = time.monotonic()
        if len(parts) < len(shown) and self._finished:
            # The final answer is shorter than what was streamed (a fallback after a broken
            # stream): leftover messages are blanked rather than left saying something else.
            for index in range(len(parts), len(shown)):
                handle, current = shown[index]
                if handle is not None and current != "…":
                    self.calls += 1
                    if await self._editor.edit(handle, "…"):
                        shown[index] = (handle, "…")
