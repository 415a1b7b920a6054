"""An answer's files and buttons in Slack: the Slack Outbound's `finish_rich`.

The text goes out as every answer does (streamed, or posted: outbound.py); then the buttons
are put on the answer's last message (chat.update with its text and an `actions` block, see
blocks.py), and each file is uploaded into the answer's thread (files.py). A file that cannot be
uploaded is named in a short message instead (its link when the agent gave one), so the user
always learns of it. Clicks come back through the conversation code (conversation.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any

import structlog

from adapters.slack.blocks import actions_block, answer_blocks
from adapters.slack.convert import markdown_to_mrkdwn
from adapters.slack.files import SlackFileUploader, UploadError
from adapters.slack.outbound import SlackApp, SlackOutbound, SlackTarget, error_code
from chatgateway.models import Action, OutFile
from chatgateway.outbound import EDIT_INTERVAL, Address
from chatgateway.rich import choices_line, fallback_text

log = structlog.get_logger("chatgateway.slack")


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
        await self.finish(text)
        target = SlackTarget.of(self.address)
        # Where the answer went: the streamed reply's thread, or where it was posted.
        thread = target.stream_thread if self.streamed else target.thread_ts
        if actions:
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
