"""Files users send to the agent: signed links the gateway serves, the size cap, fetching.

An attachment arrives with its platform's reference (`Attachment.source`: Slack's `url_private`,
a Discord CDN URL, a web upload's id), which never leaves the gateway. Before the agent is
called, `prepare_files` (the pipeline's one place for this) refuses files over the tenant's
`files.max_bytes` or of a type not in its `files.allowed_types`, from every platform, with a
notice for the user (counted in `chatgateway_files_refused_total`), and gives every other file
a link the gateway serves: `GET /v1/files/<token>`, where the token is signed (purpose "file"),
short-lived (`files.link_ttl`) and names the tenant, platform, adapter and message it belongs
to. Serving a link fetches the file with that tenant's own credential from a host of that
platform only, and streams it in chunks under the cap (adapters/web/files.py).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import mimetypes
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from yarl import URL

from chatgateway.models import Attachment, FileSource, NormalizedMessage, Platform
from chatgateway.signing import SignatureError, Signer

if TYPE_CHECKING:
    from chatgateway.config import FilesConfig, TenantConfig
    from chatgateway.metrics import Metrics

log = structlog.get_logger("chatgateway.files")

PURPOSE = "file"
#: The path files are served at (adapters/web/files.py); the token follows.
LINK_PATH = "/v1/files/"
#: Bytes read and written at a time: memory per transfer stays about this size.
CHUNK_BYTES = 64 * 1024
#: Hosts Slack serves `url_private` from (besides the host of the app's `api_base_url`).
SLACK_FILE_HOSTS = frozenset({"files.slack.com"})
#: Hosts Discord serves attachments from (besides the host of the bot's `api_base_url`).
DISCORD_FILE_HOSTS = frozenset({"cdn.discordapp.com", "media.discordapp.net"})
#: Redirects followed at most when fetching from a platform (each checked like the first URL).
MAX_REDIRECTS = 3
_UPLOAD_ID = re.compile(r"^up_[0-9a-f]{32}$")
#: What the user is told about a file whose type the tenant does not accept.
TYPE_NOTICE = (
    "I couldn't pass on {name}: files of type {type} are not accepted here (allowed: {allowed})."
)


class FileError(Exception):
    """A file that cannot be served; `status`, `code` and the message go to the client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class FileClaim:
    """What a verified file link says: whose file, from where."""

    tenant_id: str
    platform: Platform
    adapter: str
    message_id: str
    ref: str
    name: str
    content_type: str | None


class FileLinks:
    """Makes and verifies file links; `base_url()` is the gateway's address as agents see it."""

    def __init__(self, secret: str, base_url: Callable[[], str]) -> None:
        self._signer = Signer(secret, PURPOSE)
        self._base_url = base_url

    def token(
        self, message: NormalizedMessage, attachment: Attachment, *, ttl: float, now: float
    ) -> str:
        source = attachment.source
        assert source is not None
        return self._signer.sign(
            [
                message.tenant_id,
                message.platform.value,
                source.adapter,
                message.message_id,
                source.ref,
                attachment.name,
                attachment.content_type or "",
            ],
            expires_at=int(now + ttl),
        )

    def url(self, token: str) -> str:
        return self._base_url().rstrip("/") + LINK_PATH + token

    def verify(self, token: str, *, now: float) -> FileClaim:
        """The claim of a good link; SignatureError when altered, foreign or expired."""
        tenant, platform, adapter, message_id, ref, name, content_type = self._signer.verify(
            token, now=now, count=7
        )
        try:
            kind = Platform(platform)
        except ValueError:
            raise SignatureError("invalid file token") from None
        return FileClaim(tenant, kind, adapter, message_id, ref, name, content_type or None)


# Web uploads -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upload:
    """A file a web visitor uploaded: kept on disk per tenant until used, erased or expired."""

    id: str
    tenant_id: str
    user_id: str
    name: str
    content_type: str
    size: int
    created_at: float


class UploadStore:
    """Web chat uploads under `root/<tenant>/`: `<id>` holds the bytes, `<id>.json` the rest.

    The tenant is part of every path, so one tenant's id never opens another tenant's file.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, tenant_id: str) -> Path:
        return self.root / tenant_id

    async def save(
        self,
        tenant_id: str,
        user_id: str,
        name: str,
        content_type: str,
        chunks: AsyncIterator[bytes],
        *,
        max_bytes: int,
    ) -> Upload:
        """Write `chunks` to disk as they come; FileError 413 (nothing kept) past `max_bytes`."""
        directory = self._dir(tenant_id)
        directory.mkdir(parents=True, exist_ok=True)
        upload_id = "up_" + secrets.token_hex(16)
        partial = directory / f"{upload_id}.part"
        size = 0
        try:
            with partial.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileError(
                            413, "file_too_large", f"{name} is larger than {human(max_bytes)}"
                        )
                    out.write(chunk)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        upload = Upload(upload_id, tenant_id, user_id, name, content_type, size, time.time())
        (directory / f"{upload_id}.json").write_text(json.dumps(dataclasses.asdict(upload)))
        partial.rename(directory / upload_id)
        return upload

    def get(self, tenant_id: str, upload_id: str) -> Upload | None:
        """The tenant's upload `upload_id`, or None."""
        if not _UPLOAD_ID.match(upload_id):
            return None
        directory = self._dir(tenant_id)
        try:
            data = json.loads((directory / f"{upload_id}.json").read_text())
        except (OSError, ValueError):
            return None
        if not (directory / upload_id).is_file():
            return None
        return Upload(**data)

    async def chunks(self, upload: Upload) -> AsyncIterator[bytes]:
        with (self._dir(upload.tenant_id) / upload.id).open("rb") as source:
            while chunk := source.read(CHUNK_BYTES):
                yield chunk

    def delete_tenant(self, tenant_id: str) -> int:
        """Delete every upload of a tenant (its purge); how many there were."""
        directory = self._dir(tenant_id)
        count = len(list(directory.glob("up_*.json"))) if directory.is_dir() else 0
        shutil.rmtree(directory, ignore_errors=True)
        return count

    def delete_where(self, tenant_id: str, keep: Callable[[dict[str, Any]], bool]) -> int:
        """Delete the tenant's uploads whose metadata `keep` refuses; how many."""
        directory = self._dir(tenant_id)
        if not directory.is_dir():
            return 0
        deleted = 0
        for meta in directory.glob("up_*.json"):
            try:
                data = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if not keep(data):
                (directory / meta.stem).unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                deleted += 1
        return deleted

    def delete_user(self, tenant_id: str, user_id: str) -> int:
        """Delete one user's uploads (their erasure); how many."""
        return self.delete_where(tenant_id, lambda d: d.get("user_id") != user_id)

    def prune(self, tenant_id: str, older_than: float) -> int:
        """Delete the tenant's uploads made before `older_than` (Unix time), and stale parts."""
        directory = self._dir(tenant_id)
        if directory.is_dir():
            for part in directory.glob("up_*.part"):
                with contextlib.suppress(OSError):
                    if part.stat().st_mtime < older_than:
                        part.unlink()
        return self.delete_where(tenant_id, lambda d: d.get("created_at", 0) >= older_than)


# Fetching ----------------------------------------------------------------------------------


@dataclass(slots=True)
class FileStream:
    """An open file: its size when known, and its bytes in chunks (close when done)."""

    size: int | None
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


def human(size: int) -> str:
    """A byte count for people: 25 MB, 300 KB, 12 bytes."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            value = size / scale
            whole = value >= 10 or value == int(value)
            return f"{value:.0f} {unit}" if whole else f"{value:.1f} {unit}"
    return f"{size} bytes"


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.host, url.port


def _allowed(url: URL, hosts: frozenset[str], configured: str) -> bool:
    """Whether `url` is on one of the platform's file hosts (https), or the configured API's
    own origin (a proxy, GovSlack, a test's fake)."""
    if url.scheme == "https" and url.host in hosts and url.user is None:
        return True
    return url.user is None and _origin(url) == _origin(URL(configured))


class FileService:
    """Links, uploads and fetching files from the platforms with each tenant's credential."""

    def __init__(
        self,
        links: FileLinks,
        uploads: UploadStore | None,
        *,
        timeout: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.links = links
        self.uploads = uploads
        #: Where refused files are counted (`chatgateway_files_refused_total`).
        self.metrics = metrics
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self._timeout),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def open(self, tenant: TenantConfig, claim: FileClaim) -> FileStream:
        """Open the file a verified link names, as `tenant` (the link's own tenant)."""
        if claim.platform is Platform.WEB:
            return self._open_upload(claim)
        headers: dict[str, str] = {}
        if claim.platform is Platform.SLACK:
            app = next((a for a in tenant.slack.apps if a.name == claim.adapter), None)
            if app is None:
                raise FileError(404, "not_found", "the file's Slack app is no longer configured")
            hosts, configured = SLACK_FILE_HOSTS, app.api_base_url
            # Slack's private file URLs need the bot token of the app that received the file.
            headers["Authorization"] = f"Bearer {app.bot_token.get_secret_value()}"
        else:
            bot = next((b for b in tenant.discord.bots if b.name == claim.adapter), None)
            if bot is None:
                raise FileError(404, "not_found", "the file's Discord bot is no longer configured")
            # Discord's attachment URLs carry their own signature: no token is sent.
            hosts, configured = DISCORD_FILE_HOSTS, bot.api_base_url
        return await self._fetch(URL(claim.ref), hosts, configured, headers)

    def refused(self, tenant_id: str, platform: Platform, reason: str) -> None:
        """Count a file refused for `reason` (`too_large` or `type`)."""
        if self.metrics is not None:
            self.metrics.files_refused.labels(tenant_id, platform.value, reason).inc()

    def _open_upload(self, claim: FileClaim) -> FileStream:
        upload = self.uploads.get(claim.tenant_id, claim.ref) if self.uploads else None
        if upload is None or self.uploads is None:
            raise FileError(404, "not_found", "the uploaded file no longer exists")

        async def nothing() -> None:
            return None

        return FileStream(upload.size, self.uploads.chunks(upload), nothing)

    async def _fetch(
        self, url: URL, hosts: frozenset[str], configured: str, headers: dict[str, str]
    ) -> FileStream:
        """GET a platform URL, following redirects only to the platform's hosts (no SSRF)."""
        for _ in range(MAX_REDIRECTS + 1):
            if not _allowed(url, hosts, configured):
                log.warning("file_host_refused", host=url.host)
                raise FileError(403, "forbidden", "the file is not on a host of its platform")
            try:
                response = await self._client().get(url, headers=headers, allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise FileError(
                    502, "bad_gateway", f"the platform could not be reached ({type(exc).__name__})"
                ) from None
            if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                location = url.join(URL(response.headers["Location"]))
                response.release()
                url = location
                continue
            if response.status != 200:
                response.release()
                if response.status in (404, 410):
                    raise FileError(404, "not_found", "the platform no longer has this file")
                raise FileError(
                    502, "bad_gateway", f"the platform refused the file (HTTP {response.status})"
                )

            async def chunks(body: aiohttp.ClientResponse = response) -> AsyncIterator[bytes]:
                async for chunk in body.content.iter_chunked(CHUNK_BYTES):
                    yield chunk

            async def close(body: aiohttp.ClientResponse = response) -> None:
                body.close()

            return FileStream(response.content_length, chunks(), close)
        raise FileError(502, "bad_gateway", "the platform redirected too often")

    async def read(self, tenant: TenantConfig, claim: FileClaim, limit: int) -> bytes | None:
        """The whole file if it has at most `limit` bytes (for inlining), else None."""
        stream = await self.open(tenant, claim)
        try:
            if stream.size is not None and stream.size > limit:
                return None
            data = bytearray()
            async for chunk in stream.chunks:
                data += chunk
                if len(data) > limit:
                    return None
            return bytes(data)
        finally:
            await stream.close()


# Before the agent is called ----------------------------------------------------------------


def _claim(message: NormalizedMessage, attachment: Attachment) -> FileClaim:
    assert attachment.source is not None
    return FileClaim(
        message.tenant_id,
        message.platform,
        attachment.source.adapter,
        message.message_id,
        attachment.source.ref,
        attachment.name,
        attachment.content_type,
    )


async def prepare_files(
    message: NormalizedMessage, tenant: TenantConfig, service: FileService | None
) -> tuple[NormalizedMessage, str]:
    """`message` as the agent should see it, and a notice for the user ("" if none).

    Files over the tenant's cap, or of a type not in its `files.allowed_types` (see
    `file_type`), are left out, named in the notice and counted; the others get a gateway
    link in `url` (their platform reference stays in `source`, which is never sent), and small
    images their bytes when `files.inline_images_max_bytes` asks for it. A web message's upload
    ids become the uploads' names, types and sizes (NotFoundError for an id that is not this
    visitor's upload). Without a file service (no web server) nothing gets a link.
    """
    config: FilesConfig = tenant.files
    kept: list[Attachment] = []
    notices: list[str] = []
    reasons: list[str] = []
    now = time.time()
    for attachment in message.attachments:
        source = attachment.source
        if source is not None and message.platform is Platform.WEB:
            attachment = _web_upload(message, attachment, service)
        if attachment.size is not None and attachment.size > config.max_bytes:
            reasons.append("too_large")
            notices.append(
                config.too_large_notice.format(
                    name=attachment.name, size=human(attachment.size), limit=human(config.max_bytes)
                )
            )
            continue
        kind = file_type(attachment)
        if not config.allows(kind):
            reasons.append("type")
            notices.append(
                TYPE_NOTICE.format(
                    name=attachment.name,
                    type=kind or "unknown",
                    allowed=", ".join(config.allowed_types),
                )
            )
            continue
        if source is not None and service is not None:
            token = service.links.token(message, attachment, ttl=config.link_ttl, now=now)
            attachment = dataclasses.replace(attachment, url=service.links.url(token))
            attachment = await _inline(message, attachment, tenant, service)
        kept.append(attachment)
    if reasons:
        log.info("files_refused", count=len(reasons), reasons=reasons, max_bytes=config.max_bytes)
        if service is not None:
            for reason in reasons:
                service.refused(message.tenant_id, message.platform, reason)
    return dataclasses.replace(message, attachments=tuple(kept)), "\n".join(notices)


def file_type(attachment: Attachment) -> str:
    """The media type `files.allowed_types` judges a file by: the one its platform gives, else
    the one its name's extension suggests, else "" (which only `*/*` accepts)."""
    if attachment.content_type:
        return attachment.content_type.partition(";")[0].strip().lower()
    return mimetypes.guess_type(attachment.name, strict=False)[0] or ""


def _web_upload(
    message: NormalizedMessage, attachment: Attachment, service: FileService | None
) -> Attachment:
    from chatgateway.errors import NotFoundError

    assert attachment.source is not None
    upload_id = attachment.source.ref
    uploads = service.uploads if service is not None else None
    upload = uploads.get(message.tenant_id, upload_id) if uploads is not None else None
    if upload is None or upload.user_id != message.user.id:
        raise NotFoundError(f"no uploaded file {upload_id!r}")
    return dataclasses.replace(
        attachment, name=upload.name, content_type=upload.content_type, size=upload.size
    )


async def _inline(
    message: NormalizedMessage, attachment: Attachment, tenant: TenantConfig, service: FileService
) -> Attachment:
    """Add a small image's bytes (base64) when the tenant wants them; the link stays."""
    limit = tenant.files.inline_images_max_bytes
    if (
        not limit
        or not (attachment.content_type or "").startswith("image/")
        or (attachment.size is not None and attachment.size > limit)
    ):
        return attachment
    try:
        data = await service.read(tenant, _claim(message, attachment), limit)
    except FileError as exc:
        log.warning("file_inline_failed", code=exc.code, detail=str(exc))
        return attachment
    if data is None:
        return attachment
    return dataclasses.replace(attachment, data=base64.b64encode(data).decode())


def notice_first(
    on_delta: Callable[[str], Awaitable[None]], notice: str
) -> Callable[[str], Awaitable[None]]:
    """A delta sink that shows `notice` (and a blank line) before the answer's first words."""
    shown = False

    async def sink(delta: str) -> None:
        nonlocal shown
        if not shown:
            shown = True
            delta = f"{notice}\n\n{delta}"
        await on_delta(delta)

    return sink


def uploads_root(store_path: str | None, environ: dict[str, str] | Any) -> Path:
    """Where web uploads are kept: `files/` beside the SQLite database, else in the state
    directory ($STATE_DIRECTORY, else ~/.local/state/chatgateway)."""
    if store_path and store_path != ":memory:":
        return Path(store_path).resolve().parent / "files"
    state = environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "files"
    base = environ.get("XDG_STATE_HOME") or ""
    if not os.path.isabs(base):
        base = str(Path(environ.get("HOME") or str(Path.home())) / ".local" / "state")
    return Path(base) / "chatgateway" / "files"


__all__ = [
    "FileClaim",
    "FileError",
    "FileLinks",
    "FileService",
    "FileSource",
    "FileStream",
    "Upload",
    "UploadStore",
    "file_type",
    "prepare_files",
]
