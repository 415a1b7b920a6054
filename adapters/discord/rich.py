"""Files and buttons on Discord answers: the Outbound's `finish_rich`.

The answer's text is shown as any answer is (chatgateway.outbound.EditedStream: posted, or
edited to its final text after streaming); then its last message gets the files as attachments
and the buttons as components (adapters/discord/components.py) in one more edit, or, for an
answer without text, they are posted as the reply. Both carry the reply's nonce or edit the same
message, so doing it again shows them once.

Files the agent gave as bytes are sent as they are; files given by URL are fetched with the SSRF
guards of chatgateway/fetch.py (the tenant's agent host may be private), each spooled to disk
past SPOOL_BYTES rather than held in memory. Discord takes at most 10 files per message, each
at most the server's upload limit (10 MiB without boosts) and 25 MB per request: a file that
does not fit or cannot be fetched is not attached, and the answer lists it instead (a link when
the agent gave a URL).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO, Any

import discord
import structlog

from adapters.discord import components
from adapters.discord.outbound import DiscordEditor
from chatgateway.fetch import FetchError, fetch
from chatgateway.models import Action, OutFile
from chatgateway.outbound import Address, EditedStream
from chatgateway.rich import MARK, fallback_text, stored_turn

log = structlog.get_logger("chatgateway.discord")

#: Files per message (Discord's limit).
MAX_FILES = 10
#: Bytes of one file when the server's own limit is not known (Discord's default, no boosts).
DEFAULT_FILE_BYTES = discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES
#: Bytes of all files of one message (Discord's request size limit).
MAX_REQUEST_BYTES = 25 * 1000 * 1000
#: A fetched file is kept in memory up to this size, on disk past it.
SPOOL_BYTES = 1024 * 1024


@dataclass
class _Ready:
    """A file ready to attach: its name and an open, seekable body."""

    name: str
    body: IO[bytes]
    size: int

    def file(self) -> discord.File:
        # A fresh discord.File per attempt: discord.py seeks it back only on its own retries.
        self.body.seek(0)
        return discord.File(self.body, filename=self.name)  # type: ignore[arg-type]


class DiscordReplyStream(EditedStream):
    """The Discord Outbound of one answer: EditedStream plus files and buttons (RichOutbound)."""

    def __init__(
        self,
        editor: DiscordEditor,
        address: Address,
        *,
        idempotent: bool,
        owner: str | None,
        trusted_hosts: Callable[[], Collection[str]] = tuple,
        file_limit: int = DEFAULT_FILE_BYTES,
    ) -> None:
        super().__init__(editor, address, idempotent=idempotent)
        self._discord = editor
        #: The user the answer is for: only their clicks count (components.custom_id).
        self.owner = owner
        self._trusted_hosts = trusted_hosts
        self._file_limit = file_limit

    async def post(self, text: str) -> None:
        # A stored answer posted again (the pipeline's replay of a message answered before)
        # comes in its stored form, files and buttons after MARK: shown as they were.
        if MARK in text:
            turn = stored_turn("agent", text, 0.0)
            if turn.files or turn.actions:
                await self.finish_rich(turn.text, turn.files, turn.actions)
                return
        await super().post(text)

    async def finish_rich(
        self, text: str, files: tuple[OutFile, ...], actions: tuple[Action, ...]
    ) -> None:
        with ExitStack() as stack:
            ready, left_out = await self._prepare(files, stack)
            if left_out:
                # What cannot be attached is listed, as links where the agent gave a URL.
                text = fallback_text(text, left_out)
            await self.finish(text)
            rows = components.action_rows(actions, self.owner)
            if not ready and not rows:
                return

            def extra() -> dict[str, Any]:
                found: dict[str, Any] = {}
                if rows:
                    found["view"] = components.view(rows)
                return found

            shown = [(handle, part) for handle, part in self._shown if handle is not None]
            self.calls += 1
            if shown:
                handle, part = shown[-1]

                def edit_extra() -> dict[str, Any]:
                    return {**extra(), "attachments": [r.file() for r in ready]}

                await self._discord.edit(handle, part, extra=edit_extra)
            else:
                # No text: the files and buttons are the reply.

                def send_extra() -> dict[str, Any]:
                    return {**extra(), "files": [r.file() for r in ready]}

                await self._discord.send("", 0, extra=send_extra)

    async def _prepare(
        self, files: tuple[OutFile, ...], stack: ExitStack
    ) -> tuple[list[_Ready], list[OutFile]]:
        """The files that go as attachments (opened) and those left out (listed in the text).
        URLs are fetched at the same time; the request's total is then counted in order."""
        limit = min(self._file_limit, MAX_REQUEST_BYTES)

        async def one(file: OutFile) -> tuple[IO[bytes], int] | str:
            if file.data is None:
                assert file.url is not None
                return await self._fetch(file.url, limit, stack)
            if len(file.data) > limit:
                return "too large for Discord"
            spooled: IO[bytes] = stack.enter_context(
                tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
            )
            spooled.write(file.data)
            return spooled, len(file.data)

        taken = files[:MAX_FILES]
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(file)) for file in taken]
        ready: list[_Ready] = []
        left_out: list[OutFile] = []
        total = 0
        for file, task in zip(taken, tasks, strict=True):
            got = task.result()
            if isinstance(got, str):
                reason = got
            elif total + got[1] > MAX_REQUEST_BYTES:
                reason = "too large for one Discord message with the others"
            else:
                ready.append(_Ready(file.name, got[0], got[1]))
                total += got[1]
                continue
            log.warning("discord_file_left_out", file=file.name, reason=reason)
            left_out.append(file)
        for file in files[MAX_FILES:]:
            log.warning("discord_file_left_out", file=file.name, reason="more than 10 files")
            left_out.append(file)
        return ready, left_out

    async def _fetch(
        self, url: str, limit: int, stack: ExitStack
    ) -> tuple[IO[bytes], int] | str:
        """The file at `url` spooled (at most `limit` bytes), or why it is not."""
        body: IO[bytes] = stack.enter_context(
            tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        )
        size = 0
        try:
            async with fetch(url, trusted_hosts=self._trusted_hosts(), max_bytes=limit) as got:
                async for chunk in got.chunks():
                    body.write(chunk)
                    size += len(chunk)
        except FetchError as exc:
            return str(exc)
        return body, size


def reply_stream(
    editor: DiscordEditor,
    address: Address,
    *,
    nonced: bool,
    owner: str | None = None,
    trusted_hosts: Callable[[], Collection[str]] = tuple,
    file_limit: int = DEFAULT_FILE_BYTES,
) -> DiscordReplyStream:
    """The Outbound for one answer: idempotent when its posts carry nonces."""
    return DiscordReplyStream(
        editor,
        address,
        idempotent=nonced,
        owner=owner,
        trusted_hosts=trusted_hosts,
        file_limit=file_limit,
    )
