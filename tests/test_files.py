"""Files from users to the agent: Slack, Discord and web files reach the agent as gateway links.

Real slack-bolt and discord.py in an in-process daemon against the loopback fakes, which serve
the files (Slack's only to the right bot token); the test plays the agent and fetches the link.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatgateway.daemon import Daemon
from chatgateway.files import FileLinks, UploadStore
from chatgateway.models import (
    Attachment,
    Conversation,
    ConversationKind,
    FileSource,
    NormalizedMessage,
    Platform,
    TenantId,
    User,
)
from tests.conftest import ADMIN_TOKEN, tenant, url
from tests.fakes.discord import FakeDiscord, user_object
from tests.fakes.slack import FakeApp, FakeSlack

MB = 1024 * 1024


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    fake = await FakeDiscord().start()
    yield fake
    await fake.stop()


def slack_tenant(tenant_id: str, agent_url: str, fake: FakeSlack, app: FakeApp,
                 **extra: Any) -> dict[str, Any]:
    return tenant(tenant_id, agent_url, keys=[f"{tenant_id}-key-0123456789abcdef"],
                  slack={"apps": [app.config(fake, ping_interval=1.0)]}, **extra)


async def start_slack(make_gateway: Any, fake: FakeSlack, *tenants: dict[str, Any]) -> Daemon:
    daemon = await make_gateway({"tenants": list(tenants), "admin": {"token": {"value": ADMIN_TOKEN}}})
    for app in fake.apps:
        await fake.wait_connected(app)
    return daemon


async def fetch(http: aiohttp.ClientSession, link: str) -> tuple[int, bytes, dict[str, str]]:
    async with http.get(link) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def error_of(http: aiohttp.ClientSession, link: str) -> tuple[int, str]:
    async with http.get(link) as resp:
        assert resp.content_type == "application/json"
        return resp.status, (await resp.json())["error"]["code"]


def refused(daemon: Daemon, tenant_id: str, platform: str, reason: str) -> float:
    """chatgateway_files_refused_total for these labels (0 when never counted)."""
    value = daemon.metrics.registry.get_sample_value(
        "chatgateway_files_refused_total",
        {"tenant": tenant_id, "platform": platform, "reason": reason},
    )
    return value or 0.0


def links(daemon: Daemon) -> FileLinks:
    assert daemon.pipeline is not None and daemon.pipeline.files is not None
    return daemon.pipeline.files.links


# Slack ----------------------------------------------------------------------------------------


async def test_a_slack_file_reaches_the_agent_as_a_link_it_can_fetch(
    fake_slack, make_agent, make_gateway, http
):
    agent = await make_agent()
    app = fake_slack.add_app()
    daemon = await start_slack(make_gateway, fake_slack, slack_tenant("acme", agent.url,
                                                                      fake_slack, app))
    content = b"%PDF-1.7 quarterly numbers\n" * 100
    file = fake_slack.add_file(app, "report.pdf", data=content, mimetype="application/pdf")
    await fake_slack.dm(app, "U0ALICE", "what does this say?", files=[file],
                        subtype="file_share")
    [call] = await agent.wait_calls(1)

    [attachment] = call.body["message"]["attachments"]
    assert attachment["name"] == "report.pdf"
    assert attachment["contentType"] == "application/pdf"
    assert attachment["size"] == len(content)
    link = attachment["url"]
    assert link.startswith(f"http://127.0.0.1:{daemon.port}/v1/files/")
    # The platform's private URL (and the token it needs) never reaches the agent.
    assert b"files-pri" not in call.raw and app.bot_token.encode() not in call.raw
    assert "data" not in attachment  # inlining is off by default

    status, body, headers = await fetch(http, link)
    assert status == 200 and body == content
    assert headers["Content-Type"] == "application/pdf"
    assert headers["Content-Disposition"].startswith("attachment;")
    assert headers["X-Content-Type-Options"] == "nosniff"
    # Fetched from Slack with this tenant's own bot token.
    [fetched] = fake_slack.file_host.fetches
    assert fetched.authorization == f"Bearer {app.bot_token}" and fetched.status == 200
    await fake_slack.wait_posts(1, channel="DU0ALICE")


async def test_a_link_of_one_tenant_never_uses_another_tenants_credential(
    fake_slack, make_agent, make_gateway, http
):
    agent = await make_agent()
    acme_app, beta_app = fake_slack.add_app(), fake_slack.add_app(team_id="T0002")
    daemon = await start_slack(
        make_gateway, fake_slack,
        slack_tenant("acme", agent.url, fake_slack, acme_app),
        slack_tenant("beta", agent.url, fake_slack, beta_app),
    )
    acme_file = fake_slack.add_file(acme_app, "acme.txt", data=b"acme only", mimetype="text/plain")
    beta_file = fake_slack.add_file(beta_app, "beta.txt", data=b"beta only", mimetype="text/plain")
    await fake_slack.dm(acme_app, "U0ALICE", "mine", files=[acme_file], subtype="file_share")
    await fake_slack.dm(beta_app, "U0BOB", "mine", files=[beta_file], subtype="file_share")
    calls = await agent.wait_calls(2)
    by_tenant = {c.body["tenant"]: c.body["message"]["attachments"][0]["url"] for c in calls}
    acme_link, beta_link = by_tenant["acme"], by_tenant["beta"]

    # Each link fetches its own tenant's file with its own tenant's token (both apps are
    # named "default": the tenant in the signed link decides whose app it is).
    assert (await fetch(http, acme_link))[1] == b"acme only"
    assert (await fetch(http, beta_link))[1] == b"beta only"
    tokens = {f.file_id: f.authorization for f in fake_slack.file_host.fetches}
    assert tokens == {acme_file["id"]: f"Bearer {acme_app.bot_token}",
                      beta_file["id"]: f"Bearer {beta_app.bot_token}"}

    # Rewriting the tenant (or any field) of acme's token breaks its signature.
    base, _, token = acme_link.rpartition("/")
    fields = token.split(".")
    fields[0] = base64.urlsafe_b64encode(b"beta").rstrip(b"=").decode()
    assert await error_of(http, f"{base}/{'.'.join(fields)}") == (403, "invalid_link")
    fields = token.split(".")
    fields[4] = beta_link.rpartition("/")[2].split(".")[4]  # beta's file, acme's signature
    assert await error_of(http, f"{base}/{'.'.join(fields)}") == (403, "invalid_link")
    # A link signed with another secret (another gateway) is refused too.
    other = FileLinks("another-gateway-secret", lambda: f"http://127.0.0.1:{daemon.port}")
    message = slack_message("beta", beta_file["url_private"])
    forged = other.url(other.token(message, message.attachments[0], ttl=60, now=time.time()))
    assert await error_of(http, forged) == (403, "invalid_link")
    assert await error_of(http, f"{base}/garbage") == (403, "invalid_link")
    assert len(fake_slack.file_host.fetches) == 2  # nothing refused reached Slack


def slack_message(tenant_id: str, ref: str, *, adapter: str = "default",
                  platform: Platform = Platform.SLACK) -> NormalizedMessage:
    return NormalizedMessage(
        tenant_id=TenantId(tenant_id), platform=platform,
        conversation=Conversation("D1", ConversationKind.DM), user=User("U1"), text="",
        message_id="Ev1", timestamp=time.time(),
        attachments=(Attachment("f.txt", "text/plain", 3, source=FileSource(adapter, ref)),),
    )


async def test_expired_links_and_foreign_hosts_are_refused(
    fake_slack, make_agent, make_gateway, http
):
    agent = await make_agent()
    app = fake_slack.add_app()
    daemon = await start_slack(make_gateway, fake_slack, slack_tenant("acme", agent.url,
                                                                      fake_slack, app))
    file = fake_slack.add_file(app, "a.txt", data=b"abc", mimetype="text/plain")
    signer = links(daemon)
    message = slack_message("acme", file["url_private"])
    expired = signer.url(signer.token(message, message.attachments[0], ttl=60,
                                      now=time.time() - 120))
    assert await error_of(http, expired) == (410, "link_expired")
    fresh = signer.url(signer.token(message, message.attachments[0], ttl=60, now=time.time()))
    assert (await fetch(http, fresh))[1] == b"abc"

    # Even a link the gateway signed fetches only from the platform's hosts: never the
    # agent, a metadata service, or any other address (no SSRF through a crafted source).
    for ref in (agent.url, "http://169.254.169.254/latest/meta-data/",
                f"https://user:pw@{fake_slack.base_url.removeprefix('http://')}/files-pri/x",
                "file:///etc/passwd"):
        bad = slack_message("acme", ref)
        link = signer.url(signer.token(bad, bad.attachments[0], ttl=60, now=time.time()))
        assert await error_of(http, link) == (403, "forbidden"), ref
    assert agent.calls == []
    # An app that is not (or no longer) configured: nothing to fetch with.
    gone = slack_message("acme", file["url_private"], adapter="removed")
    link = signer.url(signer.token(gone, gone.attachments[0], ttl=60, now=time.time()))
    assert await error_of(http, link) == (404, "not_found")


async def test_a_link_never_serves_more_than_the_cap(fake_slack, make_agent, make_gateway, http):
    """A file can grow past the cap after the message (or its size was not given): a link
    refuses one declared larger (413) and cuts one that turns out larger, never buffering it."""
    agent = await make_agent()
    app = fake_slack.add_app()
    daemon = await start_slack(make_gateway, fake_slack,
                               slack_tenant("acme", agent.url, fake_slack, app,
                                            files={"max_bytes": MB}))
    signer = links(daemon)
    declared = fake_slack.file_host.add("big.bin", size=3 * MB, token=app.bot_token)
    chunked = fake_slack.file_host.add("stream.bin", size=3 * MB, token=app.bot_token,
                                       chunked=True)
    for file in (declared, chunked):
        message = slack_message("acme", fake_slack.base_url + fake_slack.file_host.path(file))
        file_link = signer.url(signer.token(message, message.attachments[0], ttl=60,
                                            now=time.time()))
        if file is declared:
            assert await error_of(http, file_link) == (413, "file_too_large")
            continue
        received = 0
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(file_link) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    received += len(chunk)
        assert received <= MB  # cut at the cap: the agent sees a short, broken body


async def test_a_file_over_the_cap_is_refused_with_a_message_to_the_user(
    fake_slack, make_agent, make_gateway
):
    agent = await make_agent()
    app = fake_slack.add_app()
    daemon = await start_slack(make_gateway, fake_slack,
                               slack_tenant("acme", agent.url, fake_slack, app,
                                            files={"max_bytes": 1000}))
    big = fake_slack.add_file(app, "huge.zip", size=3 * MB, mimetype="application/zip")
    small = fake_slack.add_file(app, "notes.txt", data=b"ok", mimetype="text/plain")
    # A file over the cap with other things: the agent gets the rest, the user both.
    await fake_slack.dm(app, "U0ALICE", "look", files=[big, small], subtype="file_share")
    [call] = await agent.wait_calls(1)
    assert [a["name"] for a in call.body["message"]["attachments"]] == ["notes.txt"]
    [post] = await fake_slack.wait_posts(1, channel="DU0ALICE")
    assert post.text.startswith(
        "I couldn't pass on huge.zip (3 MB): files larger than 1000 bytes are not accepted."
    )
    assert post.text.endswith("agent: look")

    # Only a file over the cap: the agent is not called, the user gets the notice.
    await fake_slack.dm(app, "U0BOB", "", files=[big], subtype="file_share")
    [post] = await fake_slack.wait_posts(1, channel="DU0BOB")
    assert "huge.zip" in post.text and "1000 bytes" in post.text
    assert len(agent.calls) == 1
    assert not fake_slack.file_host.fetches  # nothing was downloaded to refuse it
    assert refused(daemon, "acme", "slack", "too_large") == 2
    assert refused(daemon, "acme", "slack", "type") == 0  # too large first: counted once


async def test_a_slack_file_of_a_type_the_tenant_refuses_is_left_out_with_a_notice(
    fake_slack, make_agent, make_gateway
):
    agent = await make_agent()
    app = fake_slack.add_app()
    daemon = await start_slack(make_gateway, fake_slack,
                               slack_tenant("acme", agent.url, fake_slack, app,
                                            files={"allowed_types": ["text/*", "image/png"]}))
    exe = fake_slack.add_file(app, "setup.exe", data=b"MZ\x90\x00",
                              mimetype="application/x-msdownload")
    notes = fake_slack.add_file(app, "notes.txt", data=b"ok", mimetype="text/plain")
    # No type from the platform: judged by the name's extension, else refused as unknown.
    untyped = fake_slack.add_file(app, "readme.md", data=b"# hi")
    blob = fake_slack.add_file(app, "blob", data=b"\x00\x01")
    del untyped["mimetype"], blob["mimetype"]
    await fake_slack.dm(app, "U0ALICE", "look", files=[exe, notes, untyped, blob],
                        subtype="file_share")
    [call] = await agent.wait_calls(1)
    assert [a["name"] for a in call.body["message"]["attachments"]] == ["notes.txt", "readme.md"]
    [post] = await fake_slack.wait_posts(1, channel="DU0ALICE")
    assert post.text.startswith(
        "I couldn't pass on setup.exe: files of type application/x-msdownload are not accepted "
        "here (allowed: text/*, image/png).\n"
        "I couldn't pass on blob: files of type unknown are not accepted here "
        "(allowed: text/*, image/png)."
    )
    assert post.text.endswith("agent: look")
    assert refused(daemon, "acme", "slack", "type") == 2

    # Only a refused file: the agent is not called, the user gets the notice.
    await fake_slack.dm(app, "U0BOB", "", files=[exe], subtype="file_share")
    [post] = await fake_slack.wait_posts(1, channel="DU0BOB")
    assert post.text.startswith("I couldn't pass on setup.exe: files of type")
    assert len(agent.calls) == 1
    assert refused(daemon, "acme", "slack", "type") == 3
    assert {f.file_id for f in fake_slack.file_host.fetches} <= {notes["id"], untyped["id"]}


async def test_small_images_are_inlined_when_the_tenant_asks(
    fake_slack, make_agent, make_gateway
):
    agent = await make_agent()
    app = fake_slack.add_app()
    await start_slack(make_gateway, fake_slack,
                      slack_tenant("acme", agent.url, fake_slack, app,
                                   files={"inline_images_max_bytes": 1000}))
    png = b"\x89PNG\r\n\x1a\n" + bytes(50)
    files = [fake_slack.add_file(app, "dot.png", data=png, mimetype="image/png"),
             fake_slack.add_file(app, "big.png", data=bytes(2000), mimetype="image/png"),
             fake_slack.add_file(app, "a.txt", data=b"text", mimetype="text/plain")]
    await fake_slack.dm(app, "U0ALICE", "see", files=files, subtype="file_share")
    [call] = await agent.wait_calls(1)
    dot, big, text = call.body["message"]["attachments"]
    assert base64.b64decode(dot["data"]) == png and dot["url"]
    assert "data" not in big and "data" not in text


async def test_memory_stays_flat_while_a_50_mb_file_streams_through_a_link(
    fake_slack, make_agent, make_gateway, http
):
    agent = await make_agent()
    app = fake_slack.add_app()
    await start_slack(make_gateway, fake_slack,
                      slack_tenant("acme", agent.url, fake_slack, app,
                                   files={"max_bytes": 100 * MB,
                                          "allowed_types": ["video/*"]}))
    file = fake_slack.add_file(app, "video.mp4", size=50 * MB, mimetype="video/mp4")
    await fake_slack.dm(app, "U0ALICE", "", files=[file], subtype="file_share")
    [call] = await agent.wait_calls(1)
    link = call.body["message"]["attachments"][0]["url"]

    # tracemalloc sees every Python allocation of this process: the gateway, the fake Slack
    # serving the file and this client reading it, all at once.
    digest = hashlib.sha256()
    received = 0
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        async with http.get(link) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(64 * 1024):
                digest.update(chunk)
                received += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert received == 50 * MB
    assert digest.hexdigest() == fake_slack.file_host.files[file["id"]].digest()
    growth = peak - baseline
    print(f"50 MB through a file link: tracemalloc peak growth {growth / MB:.2f} MB")
    assert growth < 5 * MB


# Discord -----------------------------------------------------------------------------------


async def test_a_discord_attachment_reaches_the_agent_as_a_link_it_can_fetch(
    fake_discord, make_agent, make_gateway, http
):
    agent = await make_agent()
    bot = fake_discord.add_bot("acmebot")
    daemon = await make_gateway({"tenants": [tenant(
        "acme", agent.url, discord={"bots": [fake_discord.bot_settings(bot)]})]})
    await fake_discord.wait_ready(bot)
    content = b"col1,col2\n1,2\n"
    attachment = fake_discord.attachment("data.csv", data=content, content_type="text/csv")
    await fake_discord.message_create(bot, "numbers", channel_id="2001",
                                      author=user_object("1001", "alice"),
                                      extra={"attachments": [attachment]})
    [call] = await agent.wait_calls(1)
    [item] = call.body["message"]["attachments"]
    assert item["name"] == "data.csv" and item["size"] == len(content)
    assert item["url"].startswith(f"http://127.0.0.1:{daemon.port}/v1/files/")
    assert attachment["url"].encode() not in call.raw
    status, body, _ = await fetch(http, item["url"])
    assert status == 200 and body == content
    [fetched] = fake_discord.file_host.fetches
    assert fetched.authorization is None  # Discord's CDN URL is the key: no bot token sent


async def test_a_discord_attachment_of_a_refused_type_is_left_out_with_a_notice(
    fake_discord, make_agent, make_gateway
):
    agent = await make_agent()
    bot = fake_discord.add_bot("acmebot")
    daemon = await make_gateway({"tenants": [tenant(
        "acme", agent.url, discord={"bots": [fake_discord.bot_settings(bot)]})]})
    await fake_discord.wait_ready(bot)
    archive = fake_discord.attachment("backup.zip", data=b"PK\x03\x04",
                                      content_type="application/zip")
    photo = fake_discord.attachment("cat.jpg", data=b"\xff\xd8\xff", content_type="image/jpeg")
    await fake_discord.message_create(bot, "files", channel_id="2001",
                                      author=user_object("1001", "alice"),
                                      extra={"attachments": [archive, photo]})
    [call] = await agent.wait_calls(1)
    assert [a["name"] for a in call.body["message"]["attachments"]] == ["cat.jpg"]
    [post] = await fake_discord.wait_posts(1, token=bot.token)
    assert post.content.startswith(
        "I couldn't pass on backup.zip: files of type application/zip are not accepted here "
        "(allowed: image/*, text/*, application/pdf)."
    )
    assert refused(daemon, "acme", "discord", "type") == 1


# Web uploads -------------------------------------------------------------------------------

ACME_KEY = "acme-key-0123456789abcdef"
BETA_KEY = "beta-key-0123456789abcdef"


async def upload(http: aiohttp.ClientSession, daemon: Daemon, key: str, data: bytes,
                 content_type: str, name: str = "photo.png",
                 user: str = "alice") -> tuple[int, dict[str, Any]]:
    async with http.post(url(daemon, f"/api/files?name={name}&userId={user}"), data=data,
                         headers={"Authorization": f"Bearer {key}",
                                  "Content-Type": content_type}) as resp:
        return resp.status, await resp.json()


async def test_a_web_upload_reaches_the_agent_and_belongs_to_its_user(
    make_agent, make_gateway, http
):
    agent = await make_agent()
    daemon = await make_gateway({"tenants": [
        tenant("acme", agent.url, keys=[ACME_KEY], files={"max_bytes": 1000}),
        tenant("beta", agent.url, keys=[BETA_KEY]),
    ], "admin": {"token": {"value": ADMIN_TOKEN}}})
    png = b"\x89PNG\r\n\x1a\n" + bytes(100)
    status, uploaded = await upload(http, daemon, ACME_KEY, png, "image/png")
    assert status == 201
    assert uploaded["name"] == "photo.png" and uploaded["size"] == len(png)
    assert uploaded["contentType"] == "image/png"

    chat = {"message": "what is this?", "userId": "alice", "files": [uploaded["fileId"]]}
    async with http.post(url(daemon, "/api/chat"), json=chat,
                         headers={"Authorization": f"Bearer {ACME_KEY}"}) as resp:
        assert resp.status == 200, await resp.text()
    [call] = agent.calls
    [item] = call.body["message"]["attachments"]
    assert (item["name"], item["contentType"], item["size"]) == ("photo.png", "image/png", len(png))
    assert (await fetch(http, item["url"]))[1] == png

    # Another user of the tenant, or another tenant, cannot attach it.
    for key, user in ((ACME_KEY, "bob"), (BETA_KEY, "alice")):
        chat = {"message": "mine?", "userId": user, "files": [uploaded["fileId"]]}
        async with http.post(url(daemon, "/api/chat"), json=chat,
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"
    assert len(agent.calls) == 1

    # Refused: a type the tenant does not allow, a file over its cap (with or without a
    # Content-Length), before anything is kept.
    status, body = await upload(http, daemon, ACME_KEY, b"MZ...", "application/x-msdownload",
                                name="setup.exe")
    assert status == 415 and body["error"]["code"] == "file_type_refused"
    assert "setup.exe" in body["error"]["message"]
    status, body = await upload(http, daemon, ACME_KEY, bytes(1001), "image/png")
    assert status == 413 and body["error"]["code"] == "file_too_large"
    assert refused(daemon, "acme", "web", "type") == 1
    assert refused(daemon, "acme", "web", "too_large") == 1

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield bytes(400)

    async with http.post(url(daemon, "/api/files?userId=alice"), data=chunked(),
                         headers={"Authorization": f"Bearer {ACME_KEY}",
                                  "Content-Type": "image/png"}) as resp:
        assert resp.status == 413
    assert refused(daemon, "acme", "web", "too_large") == 2
    root = Path(daemon.config_path).parent / "files" / "acme"
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [uploaded["fileId"], uploaded["fileId"] + ".json"]
    )

    # The user's erasure deletes their uploads: the link now finds nothing.
    async with http.delete(url(daemon, "/api/users/alice"),
                           headers={"Authorization": f"Bearer {ACME_KEY}"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["deleted"]["uploads"] == 1
    assert await error_of(http, item["url"]) == (404, "not_found")
    assert list(root.iterdir()) == []


async def test_a_tenants_purge_deletes_its_uploads(make_agent, make_gateway, http):
    agent = await make_agent()
    daemon = await make_gateway({"tenants": [], "admin": {"token": {"value": ADMIN_TOKEN}}})
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    spec = tenant("temp", agent.url, keys=["temp-key-0123456789abcdef"])
    async with http.post(url(daemon, "/admin/tenants"), json=spec, headers=admin) as resp:
        assert resp.status == 201, await resp.text()
    status, _ = await upload(http, daemon, "temp-key-0123456789abcdef", b"hello", "text/plain",
                             name="a.txt")
    assert status == 201
    root = Path(daemon.config_path).parent / "files" / "temp"
    assert root.is_dir()
    async with http.post(url(daemon, "/admin/tenants/temp/purge"), headers=admin) as resp:
        assert resp.status == 200
        assert (await resp.json())["deleted"]["uploads"] == 1
    assert not root.exists()


async def test_the_daemons_retention_run_deletes_old_uploads_without_another_upload(
    make_agent, make_gateway, http, tmp_path
):
    agent = await make_agent()
    daemon = await make_gateway({"tenants": [
        tenant("acme", agent.url, keys=[ACME_KEY], sessions={"retention_days": 1}),
        tenant("beta", agent.url, keys=[BETA_KEY]),  # 30 days
    ], "storage": {"path": str(tmp_path / "gateway.db"), "prune_interval": 0.1}})
    uploaded_at = time.time()
    ids = {}
    for tenant_id, key in (("acme", ACME_KEY), ("beta", BETA_KEY)):
        status, body = await upload(http, daemon, key, b"hello", "text/plain", name="a.txt")
        assert status == 201
        ids[tenant_id] = body["fileId"]
    root = tmp_path / "files"

    def kept(tenant_id: str) -> bool:
        return (root / tenant_id / ids[tenant_id]).exists()

    runs: list[float] = []

    def real_clock() -> float:
        runs.append(time.time())
        return runs[-1]

    async def wait_for(check: Any) -> None:
        deadline = time.monotonic() + 20
        while not check():
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.05)

    daemon.clock = real_clock
    await wait_for(lambda: len(runs) >= 2)  # two runs on the real clock: nothing is old enough
    assert kept("acme") and kept("beta")
    # A day and a minute later, with no upload since: acme's (1 day) goes, beta's (30) stays.
    daemon.clock = lambda: uploaded_at + 86400 + 60
    await wait_for(lambda: not kept("acme"))
    assert not (root / "acme" / f"{ids['acme']}.json").exists()
    assert kept("beta")
    daemon.clock = lambda: uploaded_at + 30 * 86400 + 60
    await wait_for(lambda: not kept("beta"))


async def test_uploads_past_retention_are_pruned(tmp_path):
    store = UploadStore(tmp_path)

    async def body() -> AsyncIterator[bytes]:
        yield b"x"

    old = await store.save("acme", "alice", "a.txt", "text/plain", body(), max_bytes=10)
    await asyncio.sleep(0.01)
    cutoff = time.time()
    new = await store.save("acme", "alice", "b.txt", "text/plain", body(), max_bytes=10)
    assert store.prune("acme", cutoff) == 1
    assert store.get("acme", old.id) is None and store.get("acme", new.id) is not None
    assert store.get("beta", new.id) is None  # another tenant's id opens nothing
    assert store.get("acme", "../acme/" + new.id) is None
