"""Discord's side of a streamed answer: the MessageEditor `chatgateway.outbound.EditedStream`
drives (pacing, continuing past the limit and the final text are EditedStream's).

A part is posted with `channel.send` carrying a nonce derived from the message answered and the
part's number, with `enforce_nonce` (discord.py sets it with any nonce): posting the same part
again within Discord's nonce window returns the message created the first time instead of a
second one, so the outbound is idempotent. Such a message may still show earlier words of a
streamed answer: it is then edited to the part. Edits go through `message.edit`; discord.py's
rate limiter waits out a 429 by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import aiohttp
import discord

from adapters.discord import convert
from chatgateway.outbound import Address, EditedStream

#: Discord's error code for a reply without the Read Message History permission.
NO_HISTORY_PERMISSION = 160002
#: Attempts at one call (post or edit) when the connection fails or Discord answers 5xx.
SEND_ATTEMPTS = 3
SEND_RETRY_DELAY = 1.0
#: Mentions in an answer are shown but never ping anyone; the reply pings its author.
MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)
_TRANSIENT = (discord.DiscordServerError, aiohttp.ClientError, OSError, TimeoutError)


class DiscordEditor:
    """Posts and edits the messages of one answer in one channel (a MessageEditor)."""

    def __init__(
        self,
        channel: discord.abc.Messageable,
        *,
        bot_id: int,
        nonce_key: str | None,
        reference: discord.MessageReference | None,
        log: Any,
        stopping: Callable[[], bool] = lambda: False,
        before_first: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._channel = channel
        self._bot_id = bot_id
        self._nonce_key = nonce_key
        self._reference = reference
        self._log = log
        self._stopping = stopping
        self._before_first = before_first
        #: Set when Discord refused the bot this channel: nothing more is tried.
        self._forbidden = False
        #: Messages posted (or found by their nonce) and edits made, for the logs.
        self.posted = 0
        self.edits = 0

    def render(self, text: str) -> list[str]:
        return convert.split_message(text)

    async def send(
        self, text: str, index: int, *, extra: Callable[[], dict[str, Any]] | None = None
    ) -> Hashable | None:
        """Post part `index`; `extra()` gives more of `channel.send`'s arguments (files, a
        view), made anew for each attempt."""
        if self._forbidden:
            return None
        if self._before_first is not None:
            before, self._before_first = self._before_first, None
            await before()
        nonced: dict[str, Any] = {}
        if self._nonce_key is not None:
            nonced["nonce"] = convert.reply_nonce(self._bot_id, self._nonce_key, index)
        attempt = 0
        while True:
            attempt += 1
            try:
                message = await self._channel.send(
                    text,
                    reference=self._reference if index == 0 else None,  # type: ignore[arg-type]
                    allowed_mentions=MENTIONS,
                    **nonced,
                    **(extra() if extra is not None else {}),
                )
                break
            except _TRANSIENT as exc:
                error = f"{type(exc).__name__}: {exc}"
                if attempt >= SEND_ATTEMPTS or self._stopping():
                    self._log.error("discord_reply_failed", part=index, error=error)
                    return None
                self._log.warning("discord_reply_retry", part=index, attempt=attempt, error=error)
                await asyncio.sleep(SEND_RETRY_DELAY * attempt)
            except discord.HTTPException as exc:
                if exc.code == NO_HISTORY_PERMISSION and index == 0 and self._reference is not None:
                    # Replying needs Read Message History; answer without the reference.
                    self._log.warning(
                        "discord_reply_reference_refused",
                        hint="give the bot Read Message History so answers are replies",
                    )
                    self._reference = None
                    continue
                if isinstance(exc, discord.Forbidden):
                    self._forbidden = True
                    self._log.warning(
                        "discord_reply_forbidden",
                        error=str(exc),
                        hint="give the bot View Channel and Send Messages (and Send Messages "
                        "in Threads) in this channel",
                    )
                    return None
                self._log.error("discord_reply_failed", part=index, status=exc.status,
                                error=str(exc))
                return None
        self.posted += 1
        if message.content != text:
            # The nonce found this part posted before, showing what had been written then.
            if not await self.edit(message, text, extra=extra):
                return None  # posted again (found again by its nonce) on the next try
        return message

    async def edit(
        self, handle: Hashable, text: str, *, extra: Callable[[], dict[str, Any]] | None = None
    ) -> bool:
        if not isinstance(handle, discord.Message):
            return False
        attempt = 0
        while True:
            attempt += 1
            try:
                await handle.edit(
                    content=text,
                    allowed_mentions=MENTIONS,
                    **(extra() if extra is not None else {}),
                )
                self.edits += 1
                return True
            except _TRANSIENT as exc:
                error = f"{type(exc).__name__}: {exc}"
                if attempt >= SEND_ATTEMPTS or self._stopping():
                    self._log.error("discord_edit_failed", error=error)
                    return False
                self._log.warning("discord_edit_retry", attempt=attempt, error=error)
                await asyncio.sleep(SEND_RETRY_DELAY * attempt)
            except discord.HTTPException as exc:
                # Deleted meanwhile, or no longer allowed: the answer is stored either way.
                self._log.warning("discord_edit_failed", status=exc.status, error=str(exc))
                return False


def reply_stream(editor: DiscordEditor, address: Address, *, nonced: bool) -> EditedStream:
    """The Outbound for one answer: idempotent when its posts carry nonces."""
    return EditedStream(editor, address, idempotent=nonced)
