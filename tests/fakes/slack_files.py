"""Files and buttons for the fake Slack (tests/fakes/slack.py), added from outside it.

`await SlackRich(fake).start()` teaches a running FakeSlack:
- the external upload: `files.getUploadURLExternal` hands out an upload URL on a loopback host
  of its own (Slack's is files.slack.com), which takes the bytes (counted and hashed as they
  stream; kept only when small), and `files.completeUploadExternal` shares the uploaded files
  into a channel / thread, checked like Slack checks them (the id must be this app's, uploaded
  in full with the announced length, shared once);
- the blocks of messages the bot posts, updates or finishes streaming (`messages`), so a test
  can click a button: `click(...)` delivers a `block_actions` envelope over Socket Mode as Slack
  does, carrying the message with its blocks as they are now.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.slack import Delivery, FakeApp, FakeSlack

#: Uploads up to this size are kept whole (bigger ones only counted and hashed).
KEEP_BYTES = 1024 * 1024


@dataclass
class Upload:
    """One upload URL handed out, and what was POSTed to it."""

    file_id: str
    token: str
    filename: str
    length: int
    received: int = 0
    sha256: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    content_length: str | None = None
    authorization: str | None = None
    complete: bool = False
    shared: bool = False


@dataclass
class SharedFile:
    """A file shared with files.completeUploadExternal."""

    file_id: str
    title: str
    filename: str
    channel: str
    thread_ts: str | None
    initial_comment: str | None
    size: int
    sha256: str | None
    data: bytes | None
    content_type: str | None
    at: float


@dataclass
class Message:
    """What a bot message looks like now: where it is, its text and its blocks."""

    channel: str
    ts: str
    thread_ts: str | None
    text: str
    blocks: list[dict[str, Any]] = field(default_factory=list)
    #: (method, blocks) of every call that set its blocks.
    history: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)


class SlackRich:
    """File uploads and buttons on a FakeSlack; start it after the fake."""

    def __init__(self, fake: FakeSlack) -> None:
        self.fake = fake
        self.uploads: dict[str, Upload] = {}
        self.shared: list[SharedFile] = []
        self.messages: dict[str, Message] = {}
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self._inner = fake._method
        fake._method = self._method  # type: ignore[method-assign]

    async def start(self) -> SlackRich:
        app = web.Application(client_max_size=1024**4)
        app.router.add_post("/upload/v1/{file_id}", self._upload)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Waiting -----------------------------------------------------------------------------

    async def wait_shared(self, count: int, within: float = 10.0) -> list[SharedFile]:
        return await self.fake.wait_for(
            lambda: self.shared if len(self.shared) >= count else None, within
        )

    async def wait_message(
        self, predicate: Any, within: float = 10.0
    ) -> Message:
        """The first bot message (by ts order) for which predicate(message) is true."""
        return await self.fake.wait_for(
            lambda: next((m for m in self.messages.values() if predicate(m)), None), within
        )

    # Web API -----------------------------------------------------------------------------

    def _method(self, method: str, app: FakeApp, token: str, params: dict[str, Any],
                now: float) -> dict[str, Any]:
        if method == "files.getUploadURLExternal":
            return self._get_upload_url(token, params)
        if method == "files.completeUploadExternal":
            return self._complete(token, params, now)
        result = self._inner(method, app, token, params, now)
        if result.get("ok") and method in ("chat.postMessage", "chat.update", "chat.stopStream"):
            self._record(method, params, result)
        return result

    def _get_upload_url(self, token: str, params: dict[str, Any]) -> dict[str, Any]:
        filename, length = params.get("filename"), params.get("length")
        if not filename:
            return {"ok": False, "error": "invalid_arguments"}
        try:
            size = int(str(length))
        except ValueError:
            return {"ok": False, "error": "invalid_arguments"}
        if size <= 0:
            return {"ok": False, "error": "invalid_arguments"}
        file_id = f"F0UP{next(self._ids):06d}"
        self.uploads[file_id] = Upload(file_id, token, str(filename), size)
        return {"ok": True, "upload_url": f"{self.base_url}/upload/v1/{file_id}",
                "file_id": file_id}

    def _complete(self, token: str, params: dict[str, Any], now: float) -> dict[str, Any]:
        try:
            files = json.loads(str(params.get("files")))
        except ValueError:
            return {"ok": False, "error": "invalid_arguments"}
        if not isinstance(files, list) or not files:
            return {"ok": False, "error": "invalid_arguments"}
        channel = params.get("channel_id")
        thread_ts = params.get("thread_ts")
        if thread_ts and not channel:
            return {"ok": False, "error": "invalid_arguments"}
        done: list[dict[str, Any]] = []
        for item in files:
            upload = self.uploads.get(str(item.get("id"))) if isinstance(item, dict) else None
            if upload is None or upload.token != token:
                return {"ok": False, "error": "file_not_found"}
            if not upload.complete or upload.shared:
                return {"ok": False, "error": "file_upload_incomplete" if not upload.complete
                        else "already_shared"}
            upload.shared = True
            if channel:
                self.shared.append(SharedFile(
                    upload.file_id, str(item.get("title") or upload.filename), upload.filename,
                    str(channel), str(thread_ts) if thread_ts else None,
                    params.get("initial_comment"), upload.received, upload.sha256, upload.data,
                    upload.content_type, now,
                ))
            done.append({"id": upload.file_id, "title": item.get("title") or upload.filename})
        return {"ok": True, "files": done}

    def _record(self, method: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        ts = str(result.get("ts") or params.get("ts"))
        channel = str(params.get("channel"))
        raw = params.get("blocks")
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError:
                raw = None
        blocks = [b for b in raw if isinstance(b, dict)] if isinstance(raw, list) else []
        message = self.messages.get(ts)
        if message is None:
            streamed = self.fake.stream(ts)
            thread = streamed.thread_ts if streamed is not None else params.get("thread_ts")
            message = Message(channel, ts, str(thread) if thread else None, "")
            self.messages[ts] = message
        streamed = self.fake.stream(ts)
        message.text = streamed.text if streamed is not None and method != "chat.postMessage" \
            else str(params.get("markdown_text") or params.get("text") or message.text)
        if method == "chat.stopStream":
            # Slack shows stopStream's blocks under the streamed text.
            message.blocks = message.blocks + blocks
        else:
            message.blocks = blocks
        message.history.append((method, blocks))

    # The upload host (files.slack.com) -----------------------------------------------------

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        upload = self.uploads.get(request.match_info["file_id"])
        if upload is None:
            return web.Response(status=404, text="unknown upload")
        upload.content_type = request.headers.get("Content-Type")
        upload.content_length = request.headers.get("Content-Length")
        upload.authorization = request.headers.get("Authorization")
        digest = hashlib.sha256()
        kept = bytearray()
        received = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            received += len(chunk)
            digest.update(chunk)
            if received <= KEEP_BYTES:
                kept += chunk
        upload.received = received
        upload.sha256 = digest.hexdigest()
        upload.data = bytes(kept) if received <= KEEP_BYTES else None
        if received != upload.length:
            return web.Response(status=400, text=f"expected {upload.length} bytes")
        upload.complete = True
        await self.fake._notify()
        return web.Response(text=f"OK - {received}")

    # Clicks -------------------------------------------------------------------------------

    async def click(self, app: FakeApp, ts: str, label: str, *, user: str,
                    team: str | None = None) -> Delivery:
        """`user` clicks the button labelled `label` on bot message `ts`."""
        message = self.messages[ts]
        for block in message.blocks:
            if block.get("type") != "actions":
                continue
            for element in block.get("elements", []):
                if element.get("text", {}).get("text") == label:
                    return await self._deliver_click(app, message, block, element, user,
                                                     team or app.team_id)
        raise AssertionError(f"no button {label!r} on message {ts}: {message.blocks}")

    async def _deliver_click(self, app: FakeApp, message: Message, block: dict[str, Any],
                             element: dict[str, Any], user: str, team: str) -> Delivery:
        container: dict[str, Any] = {"type": "message", "message_ts": message.ts,
                                     "channel_id": message.channel, "is_ephemeral": False}
        payload_message: dict[str, Any] = {
            "type": "message", "user": app.bot_user_id, "bot_id": app.bot_id,
            "text": message.text, "ts": message.ts, "blocks": message.blocks,
        }
        if message.thread_ts:
            container["thread_ts"] = message.thread_ts
            payload_message["thread_ts"] = message.thread_ts
        trigger = f"{next(self._ids)}.{secrets.token_hex(6)}"
        payload = {
            "type": "block_actions",
            "user": {"id": user, "username": user.lower(), "name": user.lower(),
                     "team_id": team},
            "api_app_id": app.app_id,
            "token": "verification-token",
            "container": container,
            "trigger_id": trigger,
            "team": {"id": team, "domain": "fake"},
            "enterprise": None,
            "is_enterprise_install": False,
            "channel": {"id": message.channel,
                        "name": "directmessage" if message.channel.startswith("D") else "x"},
            "message": payload_message,
            "state": {"values": {}},
            "response_url": f"{self.fake.base_url}/response/{trigger.replace('.', '-')}",
            "actions": [{
                "action_id": element.get("action_id"),
                "block_id": block.get("block_id"),
                "text": element.get("text"),
                "value": element.get("value"),
                **({"style": element["style"]} if "style" in element else {}),
                "type": element.get("type"),
                "action_ts": f"{time.time():.6f}",
            }],
        }
        return await self.fake.deliver(app, {
            "envelope_id": f"env-click-{trigger}",
            "type": "interactive",
            "accepts_response_payload": False,
            "payload": payload,
        })
