"""An answer's files and buttons in Slack: the Slack Outbound's `finish_rich`.

The text goes out as every answer does (streamed, or posted: outbound.py); then the buttons
are put on the answer's last message (chat.update with its text and an `actions` block, see
blocks.py), and each file is uploaded into the answer's thread (files.py). A file that cannot be
uploaded is named in a short message instead (its link when the agent gave one), so the user
always learns of it. Clicks come back through the conversation code (conversation.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Hashable
from typing import Any

import structlog

from adapters.slack.blocks import actions_block, answer_blocks
from adapters.slack.convert import markdown_to_mrkdwn
from adapters.slack.files import SlackFileUploader, UploadError
from adapters.slack.outbound import PostEditor, SlackApp, SlackOutbound, SlackTarget, error_code
from chatgateway.models import Action, OutFile
from chatgateway.outbound import EDIT_INTERVAL, Address
from chatgateway.rich import choices_line, fallback_text

log = structlog.get_logger("chatgateway.slack")


class _PostWithButtons(PostEditor):
    """Posts (and edits) like PostEditor, but the answer's last message carries its buttons:
    an answer posted in one piece needs no second call for them."""

    def __init__(self, app: SlackApp, target: SlackTarget, text: str,
                 actions: tuple[Action, ...]) -> None:
        super().__init__(app, target)
        parts = self.render(text)
        self._count = len(parts)
        self._last = parts[-1] if parts else None
        self._blocks = (
            answer_blocks(self._last, actions, owner=target.user, markdown=False)
            if self._last is not None
            else []
        )
        #: Whether the buttons are on the answer's last message.
        self.delivered = False

    async def send(self, text: str, index: int) -> Hashable | None:
        if index != self._count - 1 or text != self._last:
            return await super().send(text, index)
        target = self._target
        try:
            response = await self._app.web.chat_postMessage(
                channel=target.channel, text=text, thread_ts=target.thread_ts,
                blocks=self._blocks, unfurl_links=False, unfurl_media=False,
            )
        except Exception as exc:
            self._app.check_refusal(exc)
            log.error("slack_reply_failed", channel=target.channel, error=error_code(exc))
            return None
        ts = response.get("ts")
        self.delivered = isinstance(ts, str)
        return ts if isinstance(ts, str) else None

    async def edit(self, handle: Hashable, text: str) -> bool:
        if text != self._last:
            return await super().edit(handle, text)
        try:
            await self._app.web.chat_update(
                channel=self._target.channel, ts=str(handle), text=text, blocks=self._blocks
            )
        except Exception as exc:
            self._app.check_refusal(exc)
            log.warning("slack_update_failed", channel=self._target.channel,
                        error=error_code(exc))
            return False
        self.delivered = True
        return True


class RichSlackOutbound(SlackOutbound):
    """A Slack Outbound that shows an answer's files and buttons (chatgateway.rich.RichOutbound)."""

    def __init__(
        self,
        app: SlackApp,
        address: Address,
        *,
        native: bool,
        uploader: SlackFileUploader | None,
        trusted_hosts: Collection[str] = (),
        interval: float = EDIT_INTERVAL,
        before_first: Callable[[], Awaitable[None]] | None = None,
        on_visible: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(
            app, address, native=native, interval=interval,
            before_first=before_first, on_visible=on_visible,
        )
        self._slack = app
        self._uploader = uploader
        self._trusted_hosts = tuple(trusted_hosts)

    async def finish_rich(
        self, text: str, files: tuple[OutFile, ...], actions: tuple[Action, ...]
    ) -> None:
        target = SlackTarget.of(self.address)
        posts: _PostWithButtons | None = None
        if actions and not self._finished:
            # If the answer is posted (in one piece, or post-and-edit), its last message is
            # posted or edited with the buttons; a streamed one gets them afterwards.
            posts = _PostWithButtons(self._slack, target, text, actions)
            if self._editor is self._posts:
                self._editor = posts
            self._posts = posts
        await self.finish(text)
        # Where the answer went: the streamed reply's thread, or where it was posted.
        thread = target.stream_thread if self.streamed else target.thread_ts
        if actions and not (posts is not None and posts.delivered):
            await self._buttons(target, thread, actions)
        failed: list[OutFile] = []
        for file in files:
            if self._uploader is None:
                failed.append(file)
                continue
            try:
                await self._uploader.upload(
                    file, channel=target.channel, thread_ts=thread,
                    trusted_hosts=self._trusted_hosts,
                )
            except UploadError as exc:
                if exc.__cause__ is not None:
                    self._slack.check_refusal(exc.__cause__)
                log.warning("slack_file_failed", channel=target.channel, error=str(exc))
                failed.append(file)
        if failed:
            # Named (linked when the agent gave a URL), so the user knows a file is missing.
            note = fallback_text("", failed)
            await self._post(target, thread, markdown_to_mrkdwn(note), None)

    async def _buttons(
        self, target: SlackTarget, thread: str | None, actions: tuple[Action, ...]
    ) -> None:
        """Put the buttons on the answer's last message; on a message of their own if there is
        none (an answer of buttons only) or Slack refuses the edit."""
        last = next(((h, part) for h, part in reversed(self._shown) if h is not None), None)
        if last is not None:
            handle, part = last
            blocks = answer_blocks(part, actions, owner=target.user, markdown=self.streamed)
            try:
                await self._slack.web.chat_update(
                    channel=target.channel, ts=str(handle), text=part, blocks=blocks
                )
                return
            except Exception as exc:
                self._slack.check_refusal(exc)
                log.warning("slack_buttons_failed", channel=target.channel, error=error_code(exc))
        block = actions_block(actions, owner=target.user)
        await self._post(target, thread, choices_line(actions), [block])

    async def _post(
        self,
        target: SlackTarget,
        thread: str | None,
        text: str,
        blocks: list[dict[str, Any]] | None,
    ) -> None:
        try:
            await self._slack.web.chat_postMessage(
                channel=target.channel, text=text, thread_ts=thread, blocks=blocks,
                unfurl_links=False, unfurl_media=False,
            )
        except Exception as exc:
            self._slack.check_refusal(exc)
            log.error("slack_reply_failed", channel=target.channel, error=error_code(exc))
