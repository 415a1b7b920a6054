"""Slack's Outbound: how an answer reaches a Slack user, streamed or in one piece.

- Native streaming (`chat.startStream` / `chat.appendStream` / `chat.stopStream`): the answer
  grows in one message, a reply in the user's thread, in standard Markdown (`markdown_text`,
  rendered by Slack). Deltas are batched by `EditedStream` to at most one call a second.
- Where Slack refuses the streaming methods, the app falls back (and remembers it) to posting
  and editing: `chat.postMessage`, then `chat.update` at most once a second, in mrkdwn.
- An answer that comes in one piece (a non-streaming agent, a notice) is one `chat.postMessage`
  per 3,900 characters, where answers have always gone.
- A slash command is answered in one piece through its `response_url` (see `SlashOutbound`).

Docs: docs/slack.md ("Streaming" and "Formatting").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import structlog
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from adapters.slack.convert import markdown_to_mrkdwn, split_message
from chatgateway.outbound import EDIT_INTERVAL, Address, EditedStream

log = structlog.get_logger("chatgateway.slack")

#: Errors of chat.startStream meaning this app (its token, scopes, plan or Slack deployment)
#: cannot stream at all: the app posts and edits instead for the rest of its life.
STREAM_REFUSALS = frozenset(
    {
        "unknown_method",
        "method_deprecated",
        "deprecated_endpoint",
        "missing_scope",
        "not_allowed_token_type",
        "not_allowed",
        "feature_not_enabled",
        "access_denied",
        "accesslimited",
        "enterprise_is_restricted",
        "is_bot",
    }
)
#: How long a first delta waits for a second one before its stream starts. An agent that does
#: not stream hands its whole answer over as one delta just before it is stored: it is then
#: posted in one piece, as always. A streaming agent's second delta ends the wait at once.
FIRST_WORDS_HOLD = 0.15
#: Shown in a message that a shorter final answer no longer needs.
_BLANK = "…"


class SlackApp(Protocol):
    """What an outbound needs from its adapter."""

    @property
    def web(self) -> AsyncWebClient: ...

    def check_refusal(self, exc: BaseException) -> None:
        """Park the adapter if `exc` says Slack refuses its token."""
        ...

    def streaming_refused(self, code: str) -> None:
        """Slack refused the streaming methods to this app: stop using them."""
        ...


@dataclass(frozen=True, slots=True)
class SlackTarget:
    """An Address's target for Slack, typed."""

    channel: str
    #: Where an answer posted in one piece goes (None: the channel itself).
    thread_ts: str | None = None
    #: The user's message: the thread a streamed answer replies in when thread_ts is None.
    message_ts: str | None = None
    user: str | None = None
    team: str | None = None
    #: A slash command's answer (only the asker sees it when `ephemeral`).
    command: bool = False
    ephemeral: bool = False

    @classmethod
    def of(cls, address: Address) -> SlackTarget:
        target = address.target
        channel = target.get("channel")
        if not isinstance(channel, str) or not channel:
            raise ValueError("a Slack address needs a channel")

        def text(key: str) -> str | None:
            value = target.get(key)
            return value if isinstance(value, str) and value else None

        return cls(
            channel=channel,
            thread_ts=text("thread_ts"),
            message_ts=text("message_ts"),
            user=text("user"),
            team=text("team"),
            command=bool(target.get("command")),
            ephemeral=bool(target.get("ephemeral")),
        )

    @property
    def stream_thread(self) -> str | None:
        """The thread a streamed answer goes to (Slack streams replies only)."""
        return self.thread_ts or self.message_ts


def error_code(exc: BaseException) -> str:
    """Slack's error code of a failed call, or the exception's type."""
    if isinstance(exc, SlackApiError):
        response = getattr(exc, "response", None)
        try:
            code = response.get("error") if response is not None else None
        except Exception:
            code = None
        return str(code or "unknown_error")
    return type(exc).__name__


class PostEditor:
    """Messages posted with chat.postMessage and edited with chat.update, in mrkdwn."""

    def __init__(self, app: SlackApp, target: SlackTarget) -> None:
        self._app = app
        self._target = target

    def render(self, text: str) -> list[str]:
        return split_message(markdown_to_mrkdwn(text))

    async def send(self, text: str, index: int) -> Hashable | None:
        target = self._target
        try:
            response = await self._app.web.chat_postMessage(
                channel=target.channel,
                text=text,
                thread_ts=target.thread_ts,
                unfurl_links=False,
                unfurl_media=False,
            )
        except Exception as exc:
            self._app.check_refusal(exc)
            log.error("slack_reply_failed", channel=target.channel, error=error_code(exc))
            return None
        ts = response.get("ts")
        return ts if isinstance(ts, str) else None

    async def edit(self, handle: Hashable, text: str) -> bool:
        try:
            await self._app.web.chat_update(channel=self._target.channel, ts=str(handle), text=text)
        except Exception as exc:
            self._app.check_refusal(exc)
            log.warning("slack_update_failed", channel=self._target.channel, error=error_code(exc))
            return False
        return True


@dataclass(slots=True)
class _Stream:
    """One streamed message: what it shows (Markdown) and whether it still streams."""

    ts: str
    text: str
    streaming: bool


class StreamEditor:
    """Messages streamed with chat.startStream / appendStream / stopStream, in Markdown.

    A message's growth is appended; a change that is not a growth (the final answer differs
    from what was streamed, a split moved) stops its stream and rewrites it with chat.update.
    """

    def __init__(self, app: SlackApp, target: SlackTarget) -> None:
        self._app = app
        self._target = target
        self._streams: dict[str, _Stream] = {}
        #: chat.startStream was refused for the first message: post instead.
        self.refused = False
        #: Set by `finish`: an edit now is the last one (stopStream carries it).
        self.finishing = False

    def render(self, text: str) -> list[str]:
        return split_message(text)

    async def send(self, text: str, index: int) -> Hashable | None:
        target = self._target
        # A new message continues the answer: the ones before it are complete.
        for stream in self._streams.values():
            if stream.streaming:
                await self._stop(stream)
        assert target.stream_thread is not None
        try:
            response = await self._app.web.chat_startStream(
                channel=target.channel,
                thread_ts=target.stream_thread,
                markdown_text=text,
                recipient_user_id=target.user,
                recipient_team_id=target.team,
            )
        except SlackApiError as exc:
            code = error_code(exc)
            if code in STREAM_REFUSALS:
                self._app.streaming_refused(code)
            else:
                self._app.check_refusal(exc)
            if index == 0:
                self.refused = True
            log.warning("slack_stream_refused", channel=target.channel, error=code)
            return None
        except Exception as exc:
            log.warning("slack_stream_failed", channel=target.channel, error=error_code(exc))
            return None
        ts = response.get("ts")
        if not isinstance(ts, str):
            return None
        stream = _Stream(ts, text, True)
        self._streams[ts] = stream
        if self.finishing:
            await self._stop(stream)
        return ts

    async def edit(self, handle: Hashable, text: str) -> bool:
        stream = self._streams[str(handle)]
        channel = self._target.channel
        if stream.streaming and text.startswith(stream.text):
            delta = text[len(stream.text) :]
            try:
                if self.finishing:
                    # The last words and the end of the stream in one call.
                    await self._app.web.chat_stopStream(
                        channel=channel, ts=stream.ts, markdown_text=delta or None
                    )
                    stream.streaming = False
                else:
                    await self._app.web.chat_appendStream(
                        channel=channel, ts=stream.ts, markdown_text=delta
                    )
                stream.text = text
                return True
            except SlackApiError as exc:
                # e.g. message_not_in_streaming_state (Slack ended the stream): rewrite it.
                self._app.check_refusal(exc)
                log.warning("slack_stream_broken", channel=channel, error=error_code(exc))
                stream.streaming = False
            except Exception as exc:
                log.warning("slack_stream_failed", channel=channel, error=error_code(exc))
                return False
        if stream.streaming:
            await self._stop(stream)
        try:
            await self._app.web.chat_update(channel=channel, ts=stream.ts, markdown_text=text)
        except Exception as exc:
            self._app.check_refusal(exc)
            log.warning("slack_update_failed", channel=channel, error=error_code(exc))
            return False
        stream.text = text
        return True

    async def close(self) -> None:
        """End every stream still open (the answer is complete)."""
        for stream in self._streams.values():
            if stream.streaming:
                await self._stop(stream)

    async def _stop(self, stream: _Stream) -> None:
        stream.streaming = False
        try:
            await self._app.web.chat_stopStream(channel=self._target.channel, ts=stream.ts)
        except Exception as exc:
            self._app.check_refusal(exc)
            log.warning("slack_stream_stop_failed", channel=self._target.channel,
                        error=error_code(exc))


class SlackOutbound(EditedStream):
    """An answer in a DM, a thread or a channel: streamed natively when `native` (and Slack
    allows it), else posted and edited; an answer in one piece is one post per part.

    `before_first` runs before the first Slack call (the working reaction must precede the
    answer); `on_visible` once the first words are visible (clears the assistant status).
    """

    def __init__(
        self,
        app: SlackApp,
        address: Address,
        *,
        native: bool,
        interval: float = EDIT_INTERVAL,
        before_first: Callable[[], Awaitable[None]] | None = None,
        on_visible: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        target = SlackTarget.of(address)
        self._posts = PostEditor(app, target)
        self._stream = (
            StreamEditor(app, target) if native and target.stream_thread is not None else None
        )
        super().__init__(self._stream or self._posts, address, interval=interval)
        self._held: str | None = None
        self._hold_task: asyncio.Task[None] | None = None
        self._before_first = before_first
        self._on_visible = on_visible

    @property
    def streamed(self) -> bool:
        """Whether the answer went out through Slack's streaming methods."""
        return self._stream is not None and self._editor is self._stream

    async def append(self, delta: str) -> None:
        if self._finished or not delta:
            return
        if self._editor is self._stream and not self._shown and self.first_visible is None:
            if self._held is None and self._hold_task is None:
                # Is this the whole answer (an agent that does not stream) or its first words?
                self._held = delta
                self._hold_task = asyncio.create_task(
                    self._release_held(), name="slack-first-words"
                )
                return
            if self._held is not None:
                delta = self._take_held() + delta  # a second delta: it streams, start now
        await super().append(delta)

    async def finish(self, text: str) -> None:
        if self._finished:
            return
        if self._held is not None:
            self._take_held()
        elif self._hold_task is not None:
            await asyncio.wait({self._hold_task})  # its first call is under way: let it land
        if self._stream is not None:
            if self._editor is self._stream and not self._shown:
                # Nothing was streamed: the answer came in one piece, so it is posted.
                self._editor = self._posts
            self._stream.finishing = True
        await super().finish(text)
        if self._stream is not None:
            await self._stream.close()
        if self._shown:
            log.info(
                "slack_reply_sent",
                parts=len(self._shown),
                sent=sum(handle is not None for handle, _ in self._shown),
                channel=self.address.target.get("channel"),
                streamed=self.streamed,
                calls=self.calls,
            )

    def abandon(self) -> None:
        """The answer will never finish (its message was cancelled): start nothing more."""
        if self._held is not None:
            self._take_held()

    def _take_held(self) -> str:
        held, self._held = self._held or "", None
        task, self._hold_task = self._hold_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        return held

    async def _release_held(self) -> None:
        await asyncio.sleep(FIRST_WORDS_HOLD)
        if self._held is None or self._finished:
            return
        held, self._held = self._held, None
        try:
            await EditedStream.append(self, held)
        finally:
            if self._hold_task is asyncio.current_task():
                self._hold_task = None

    async def _show(self, text: str) -> None:
        if self._before_first is not None:
            first, self._before_first = self._before_first, None
            await first()
        await super()._show(text)
        if (
            self._stream is not None
            and self._editor is self._stream
            and self._stream.refused
            and all(handle is None for handle, _ in self._shown)
        ):
            # Slack refused to stream (remembered by the adapter if it is the app's setting):
            # this answer is posted and edited instead.
            self._shown.clear()
            self._editor = self._posts
            await super()._show(text)
        if self.first_visible is not None and self._on_visible is not None:
            visible, self._on_visible = self._on_visible, None
            await visible()


class SlashOutbound:
    """A slash command's answer: in one piece at `finish`, through the command's response_url
    (who sees it: `slash_response_type`), else chat.postMessage / chat.postEphemeral."""

    idempotent = False

    def __init__(
        self,
        app: SlackApp,
        address: Address,
        *,
        response_url: str | None,
        session: aiohttp.ClientSession | None,
        response_type: str,
    ) -> None:
        self.address = address
        self._app = app
        self._target = SlackTarget.of(address)
        self._response_url = response_url
        self._session = session
        self._response_type = response_type
        self._done = False

    async def post(self, text: str) -> None:
        await self.finish(text)

    async def append(self, delta: str) -> None:
        return None  # a slash command's answer is sent whole (response_url cannot be edited)

    async def finish(self, text: str) -> None:
        if self._done:
            return
        self._done = True
        parts = split_message(markdown_to_mrkdwn(text))
        use_response_url = self._response_url is not None
        sent = 0
        for part in parts:
            if use_response_url and await self._respond(part):
                sent += 1
                continue
            use_response_url = False
            if await self._post(part):
                sent += 1
        log.info("slack_reply_sent", parts=len(parts), sent=sent, channel=self._target.channel)

    async def _respond(self, text: str) -> bool:
        assert self._response_url is not None
        webhook = AsyncWebhookClient(
            self._response_url,
            session=self._session,
            retry_handlers=[
                AsyncConnectionErrorRetryHandler(max_retry_count=2),
                AsyncRateLimitErrorRetryHandler(max_retry_count=10),
            ],
        )
        try:
            response = await webhook.send(
                text=text, response_type=self._response_type, replace_original=False
            )
        except Exception as exc:
            log.warning("slack_response_url_failed", error=error_code(exc))
            return False
        if response.status_code != 200:
            log.warning("slack_response_url_failed", status=response.status_code)
            return False
        return True

    async def _post(self, text: str) -> bool:
        target = self._target
        try:
            if target.ephemeral:
                await self._app.web.chat_postEphemeral(
                    channel=target.channel, user=target.user or "", text=text
                )
            else:
                await self._app.web.chat_postMessage(
                    channel=target.channel, text=text, unfurl_links=False, unfurl_media=False
                )
        except Exception as exc:
            self._app.check_refusal(exc)
            log.error("slack_reply_failed", channel=target.channel, error=error_code(exc))
            return False
        return True

