"""Files and buttons from the agent into Slack, and clicks back (docs/slack.md, "Files and
buttons"): the uploader against the fake Slack's external upload, then the whole path with the
real slack-bolt in the gateway."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.files import SlackFileUploader, UploadError
from chatgateway.models import OutFile
from tests.fakes.slack import FakeApp, FakeSlack
from tests.fakes.slack_files import SlackRich

#: What the big file repeats (64 KiB).
PATTERN = bytes(range(256)) * 256
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def rich(fake_slack: FakeSlack) -> AsyncIterator[SlackRich]:
    extra = await SlackRich(fake_slack).start()
    yield extra
    await extra.stop()


class FileServer:
    """The agent's file server: a small PNG with its length, the same without a length
    (chunked), and `big` bytes of a pattern made as they are sent."""

    def __init__(self, big: int = 0) -> None:
        self.big = big
        self.url = ""
        self.host = "127.0.0.1"
        self._runner: web.AppRunner | None = None

    async def start(self) -> FileServer:
        app = web.Application()
        app.router.add_get("/chart.png", self._png)
        app.router.add_get("/chunked.png", self._chunked)
        app.router.add_get("/big.bin", self._big)
        app.router.add_get("/redirect", self._redirect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _png(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=PNG, content_type="image/png")

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(PNG), 1000):
            await response.write(PNG[start : start + 1000])
        await response.write_eof()
        return response

    async def _big(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = self.big
        await response.prepare(request)
        left = self.big
        while left > 0:
            piece = PATTERN[: min(left, len(PATTERN))]
            await response.write(piece)
            left -= len(piece)
        await response.write_eof()
        return response

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")


@pytest.fixture
async def files() -> AsyncIterator[FileServer]:
    server = await FileServer(big=30 * 1024 * 1024).start()
    yield server
    await server.stop()


@pytest.fixture
async def uploader(fake_slack: FakeSlack) -> AsyncIterator[tuple[SlackFileUploader, FakeApp]]:
    app = fake_slack.add_app()
    async with aiohttp.ClientSession() as session:
        web_client = AsyncWebClient(token=app.bot_token, base_url=fake_slack.api_url,
                                    session=session)
        yield SlackFileUploader(web_client, session, max_bytes=40 * 1024 * 1024), app


def pattern_digest(size: int) -> str:
    digest = hashlib.sha256()
    left = size
    while left > 0:
        piece = PATTERN[: min(left, len(PATTERN))]
        digest.update(piece)
        left -= len(piece)
    return digest.hexdigest()


# The uploader --------------------------------------------------------------------------------


async def test_bytes_from_the_agent_are_uploaded_into_the_thread(rich, uploader):
    upload, app = uploader
    result = await upload.upload(
        OutFile("report.pdf", "application/pdf", data=b"%PDF-1.4 tiny"),
        channel="C0GENERAL", thread_ts="1700000000.000100",
    )
    shared = await rich.wait_shared(1)
    assert shared[0].file_id == result.file_id
    assert (shared[0].channel, shared[0].thread_ts) == ("C0GENERAL", "1700000000.000100")
    assert shared[0].title == "report.pdf" and shared[0].data == b"%PDF-1.4 tiny"
    sent = rich.uploads[result.file_id]
    assert sent.token == app.bot_token  # getUploadURLExternal with the app's bot token
    assert sent.authorization is None  # the bytes go to the pre-signed URL without it
    assert sent.content_type == "application/pdf"
    assert [c.method for c in rich.fake.calls] == [
        "files.getUploadURLExternal", "files.completeUploadExternal"
    ]


async def test_a_url_is_fetched_and_streamed_with_its_length(rich, uploader, files):
    upload, _ = uploader
    await upload.upload(OutFile("chart.png", "image/png", url=f"{files.url}/chart.png"),
                        channel="DU0ALICE", thread_ts=None, trusted_hosts=[files.host])
    shared = await rich.wait_shared(1)
    assert shared[0].data == PNG and shared[0].thread_ts is None
    assert rich.uploads[shared[0].file_id].content_length == str(len(PNG))


async def test_a_url_without_a_length_is_spooled_then_uploaded(rich, uploader, files):
    upload, _ = uploader
    await upload.upload(OutFile("c.png", "image/png", url=f"{files.url}/chunked.png"),
                        channel="C1", thread_ts="1.2", trusted_hosts=[files.host])
    shared = await rich.wait_shared(1)
    assert shared[0].data == PNG
    assert rich.uploads[shared[0].file_id].length == len(PNG)


async def test_private_addresses_are_refused_unless_the_agents_host(rich, uploader, files):
    upload, _ = uploader
    for url in (f"{files.url}/chart.png", f"{files.url}/redirect",
                "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"):
        with pytest.raises(UploadError, match="could not be fetched"):
            await upload.upload(OutFile("x.png", "image/png", url=url),
                                channel="C1", thread_ts=None)
    # Trusting the agent's host does not open the redirect to another private address.
    with pytest.raises(UploadError):
        await upload.upload(OutFile("x.png", "image/png", url=f"{files.url}/redirect"),
                            channel="C1", thread_ts=None, trusted_hosts=[files.host])
    assert rich.shared == [] and rich.uploads == {}


async def test_a_file_over_the_cap_is_refused_before_slack_is_asked(rich, fake_slack, files):
    app = fake_slack.add_app()
    async with aiohttp.ClientSession() as session:
        web_client = AsyncWebClient(token=app.bot_token, base_url=fake_slack.api_url,
                                    session=session)
        small = SlackFileUploader(web_client, session, max_bytes=1024 * 1024)
        with pytest.raises(UploadError, match="larger than"):
            await small.upload(OutFile("big.bin", "application/octet-stream",
                                       url=f"{files.url}/big.bin"),
                               channel="C1", thread_ts=None, trusted_hosts=[files.host])
        with pytest.raises(UploadError, match="larger than"):
            await SlackFileUploader(web_client, session, max_bytes=10).upload(
                OutFile("a.txt", "text/plain", data=b"x" * 11), channel="C1", thread_ts=None)
    assert rich.uploads == {}


async def test_memory_stays_flat_while_a_30_mb_file_streams_through(rich, uploader, files):
    upload, _ = uploader
    tracemalloc.start()
    try:
        await upload.upload(OutFile("big.bin", "application/octet-stream",
                                    url=f"{files.url}/big.bin"),
                            channel="C1", thread_ts=None, trusted_hosts=[files.host])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    shared = await rich.wait_shared(1)
    assert shared[0].size == files.big
    assert shared[0].sha256 == pattern_digest(files.big)
    # The fake Slack and file server run in this process too: all of it stays far below 30 MB.
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    print(f"upload of {files.big / 2**20:.0f} MiB: peak traced memory {peak / 2**20:.1f} MiB")


async def test_a_refused_upload_says_why(rich, uploader):
    upload, _ = uploader
    rich.fake.revoke(uploader[1].bot_token)
    with pytest.raises(UploadError, match="invalid_auth"):
        await upload.upload(OutFile("a.txt", "text/plain", data=b"hello"),
                            channel="C1", thread_ts=None)
