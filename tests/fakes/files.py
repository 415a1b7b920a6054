"""Files the fake platforms serve: Slack's `url_private` (bot token required) and Discord's CDN.

A file is its name, type and bytes, or just a size: then its bytes are a repeating pattern made
as it is served, so a 50 MB file costs the fake no memory. Every fetch is recorded with the
Authorization it carried, to check whose credential the gateway used.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

from aiohttp import web

PATTERN = bytes(range(256)) * 256  # 64 KiB


@dataclass
class FakeFile:
    id: str
    name: str
    mimetype: str
    size: int
    data: bytes | None = None
    #: The bot token a fetch must carry (Slack); None: anyone with the URL (Discord's CDN).
    token: str | None = None
    #: Sent without Content-Length (chunked), so the size is known only at the end.
    chunked: bool = False

    def digest(self) -> str:
        """SHA-256 of the file's bytes (computed in chunks for a pattern file)."""
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        h = hashlib.sha256()
        left = self.size
        while left > 0:
            piece = PATTERN[: min(left, len(PATTERN))]
            h.update(piece)
            left -= len(piece)
        return h.hexdigest()


@dataclass
class Fetch:
    file_id: str
    authorization: str | None
    status: int


@dataclass
class FakeFileHost:
    """The files of one fake platform and the handler serving them at `.../{file_id}/{name}`."""

    prefix: str
    files: dict[str, FakeFile] = field(default_factory=dict)
    fetches: list[Fetch] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def add(
        self,
        name: str,
        *,
        data: bytes | None = None,
        size: int | None = None,
        mimetype: str = "application/octet-stream",
        token: str | None = None,
        chunked: bool = False,
    ) -> FakeFile:
        file_id = f"F{next(self._ids):08d}"
        length = len(data) if data is not None else size
        assert length is not None, "give data or size"
        file = FakeFile(file_id, name, mimetype, length, data, token, chunked)
        self.files[file_id] = file
        return file

    def path(self, file: FakeFile) -> str:
        return f"{self.prefix}/{file.id}/{file.name}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        file = self.files.get(request.match_info["file_id"])
        authorization = request.headers.get("Authorization")
        if file is None:
            self.fetches.append(Fetch(request.match_info["file_id"], authorization, 404))
            return web.Response(status=404, text="not found")
        if file.token is not None and authorization != f"Bearer {file.token}":
            self.fetches.append(Fetch(file.id, authorization, 403))
            return web.Response(status=403, text="not your file")
        self.fetches.append(Fetch(file.id, authorization, 200))
        response = web.StreamResponse(headers={"Content-Type": file.mimetype})
        if file.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = file.size
        await response.prepare(request)
        if file.data is not None:
            await response.write(file.data)
        else:
            left = file.size
            while left > 0:
                piece = PATTERN[: min(left, len(PATTERN))]
                await response.write(piece)
                left -= len(piece)
        await response.write_eof()
        return response
