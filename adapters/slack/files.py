"""Uploading an agent's file into a Slack channel or thread, streamed.

Slack's external upload: `files.getUploadURLExternal` (the name and the exact length) gives an
upload URL and a file id, the bytes are POSTed to that URL, and `files.completeUploadExternal`
shares the file into the channel (and thread). A file the agent gave as bytes is sent from
memory (they are small: chatgateway.rich caps them); a file given by URL is fetched with the
core's guarded fetch (chatgateway/fetch.py: no private addresses but the agent's own host, a
size cap, a timeout) and streamed through in chunks. Slack needs the length first: when the
agent's server does not send one, the body is spooled to a temporary file (never memory), still
under the cap.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import IO

import aiohttp
import structlog
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.outbound import error_code
from chatgateway.fetch import CHUNK_BYTES, MAX_BYTES, FetchError, fetch
from chatgateway.models import OutFile

log = structlog.get_logger("chatgateway.slack")

#: The largest file uploaded: the core's fetch cap (docs/agent-protocol.md), for bytes too.
MAX_UPLOAD_BYTES = MAX_BYTES
#: Seconds the upload of one file may stall between chunks.
UPLOAD_READ_TIMEOUT = 60.0


class UploadError(Exception):
    """A file that could not be uploaded; the message says why (no secrets, no addresses)."""


@dataclass(frozen=True, slots=True)
class Uploaded:
    """A file shared into Slack: its id and size."""

    file_id: str
    size: int


async def _memory_chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK_BYTES):
        yield data[start : start + CHUNK_BYTES]


async def _spool_chunks(spool: IO[bytes]) -> AsyncIterator[bytes]:
    spool.seek(0)
    while chunk := spool.read(CHUNK_BYTES):
        yield chunk


async def _exactly(chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """The chunks, refusing a body longer than the length announced to Slack."""
    sent = 0
    async for chunk in chunks:
        sent += len(chunk)
        if sent > size:
            raise UploadError("the file is longer than its server said")
        yield chunk
    if sent != size:
        raise UploadError("the file is shorter than its server said")


class SlackFileUploader:
    """Uploads OutFiles with one app's bot token (its Web API client) and HTTP session."""

    def __init__(
        self,
        web: AsyncWebClient,
        session: aiohttp.ClientSession,
        *,
        max_bytes: int = MAX_UPLOAD_BYTES,
    ) -> None:
        self._web = web
        self._session = session
        self._max_bytes = max_bytes

    async def upload(
        self,
        file: OutFile,
        *,
        channel: str,
        thread_ts: str | None,
        trusted_hosts: Collection[str] = (),
        initial_comment: str | None = None,
    ) -> Uploaded:
        """Share `file` into `channel` (in `thread_ts` when given); UploadError says why not."""
        if file.data is not None:
            if len(file.data) > self._max_bytes:
                raise UploadError(f"{file.name} is larger than {self._max_bytes} bytes")
            return await self._send(
                file, len(file.data), _memory_chunks(file.data), channel, thread_ts,
                initial_comment,
            )
        assert file.url is not None
        try:
            async with fetch(
                file.url, trusted_hosts=trusted_hosts, max_bytes=self._max_bytes
            ) as fetched:
                if fetched.size is not None:
                    return await self._send(
                        file, fetched.size, fetched.chunks(), channel, thread_ts, initial_comment
                    )
                # No length from the agent's server: Slack needs one first, so the body goes
                # to disk (under the cap) and is sent from there.
                with tempfile.TemporaryFile(prefix="chatgateway-upload-") as spool:
                    size = 0
                    async for chunk in fetched.chunks():
                        spool.write(chunk)
                        size += len(chunk)
                    return await self._send(
                        file, size, _spool_chunks(spool), channel, thread_ts, initial_comment
                    )
        except FetchError as exc:
            raise UploadError(f"{file.name} could not be fetched: {exc}") from None

    async def _send(
        self,
        file: OutFile,
        size: int,
        chunks: AsyncIterator[bytes],
        channel: str,
        thread_ts: str | None,
        initial_comment: str | None,
    ) -> Uploaded:
        if size <= 0:
            raise UploadError(f"{file.name} is empty")
        try:
            ticket = await self._web.files_getUploadURLExternal(filename=file.name, length=size)
        except SlackApiError as exc:
            raise UploadError(f"files.getUploadURLExternal failed: {error_code(exc)}") from exc
        upload_url, file_id = ticket.get("upload_url"), ticket.get("file_id")
        if not isinstance(upload_url, str) or not isinstance(file_id, str):
            raise UploadError("files.getUploadURLExternal returned no upload_url")
        try:
            # The URL is Slack's and pre-signed: no token goes with the bytes.
            async with self._session.post(
                upload_url,
                data=_exactly(chunks, size),
                headers={"Content-Type": file.content_type, "Content-Length": str(size)},
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=10, sock_read=UPLOAD_READ_TIMEOUT
                ),
            ) as response:
                if response.status != 200:
                    raise UploadError(f"the upload was refused (HTTP {response.status})")
        except FetchError as exc:
            raise UploadError(f"{file.name} could not be fetched: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            # aiohttp wraps what the body generator raised: say the real reason.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, UploadError | FetchError):
                raise UploadError(f"{file.name}: {cause}") from None
            raise UploadError(f"the upload failed ({type(exc).__name__})") from None
        try:
            await self._web.files_completeUploadExternal(
                files=[{"id": file_id, "title": file.name}],
                channel_id=channel,
                thread_ts=thread_ts,
                initial_comment=initial_comment,
            )
        except SlackApiError as exc:
            raise UploadError(f"files.completeUploadExternal failed: {error_code(exc)}") from exc
        log.info("slack_file_uploaded", channel=channel, size=size, content_type=file.content_type)
        return Uploaded(file_id, size)
