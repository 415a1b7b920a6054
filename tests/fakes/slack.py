"""A loopback fake of Slack: the Web API over HTTP and Socket Mode websockets, on 127.0.0.1:0.

It speaks what slack-bolt / slack_sdk use (see ../shared/PLATFORMS.md): `apps.connections.open`
hands out a ws:// URL, the socket carries envelopes and acks, and the Web API records every
message, reaction and response_url post with the token that made it. Streamed messages
(chat.startStream / appendStream / stopStream) are kept with the time and text of every change,
chat.update edits posted and streamed messages, assistant.threads.setStatus calls are recorded,
and an app can be made to refuse the streaming methods (`FakeApp.refuse_streaming`). Like Slack it redelivers
an envelope that is not acked in time, and echoes a bot's own DM replies back as events.

Faults a test can inject: a 429 with Retry-After on a method, `invalid_auth` for any unknown
(or revoked) token, `disconnect refresh_requested`, a server-side close, and a socket that
silently goes dead (no pongs, nothing delivered, TCP left open).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.files import FakeFileHost


@dataclass
class FakeApp:
    """One Slack app installed in one workspace: its tokens and its bot user."""

    name: str
    team_id: str
    bot_user_id: str
    bot_id: str
    app_id: str
    bot_token: str
    app_token: str
    sockets: list[FakeSocket] = field(default_factory=list)
    connections_opened: int = 0
    #: When set, chat.startStream/appendStream/stopStream answer this error (e.g.
    #: "unknown_method" on a Slack without streaming, "missing_scope").
    refuse_streaming: str | None = None
    #: Channels where chat.startStream answers an error (e.g. "channel_type_not_supported").
    refuse_streaming_in: dict[str, str] = field(default_factory=dict)
    #: When set, assistant.threads.setStatus answers this error (e.g. "missing_scope").
    refuse_status: str | None = None

    def config(self, fake: FakeSlack, **extra: Any) -> dict[str, Any]:
        """The `slack.apps[i]` entry of a gateway config for this app."""
        return {
            "name": self.name,
            "bot_token": {"value": self.bot_token},
            "app_token": {"value": self.app_token},
            "api_base_url": fake.api_url,
            **extra,
        }


@dataclass
class FakeSocket:
    id: int
    app: FakeApp
    ws: web.WebSocketResponse
    opened_at: float
    silent: bool = False
    draining: bool = False
    silenced: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def usable(self) -> bool:
        return not self.ws.closed and not self.draining


@dataclass
class Delivery:
    """One envelope written to a socket (a redelivery is a new Delivery)."""

    envelope: dict[str, Any]
    app: FakeApp
    socket_id: int | None
    sent_at: float
    acked_at: float | None = None
    ack: dict[str, Any] | None = None

    @property
    def envelope_id(self) -> str:
        return str(self.envelope["envelope_id"])

    @property
    def ack_latency(self) -> float | None:
        return None if self.acked_at is None else self.acked_at - self.sent_at


@dataclass
class Posted:
    """A message the bot sent: chat.postMessage / chat.postEphemeral or a response_url POST."""

    via: str
    token: str | None
    channel: str | None
    text: str
    thread_ts: str | None
    ts: str | None
    at: float
    response_type: str | None = None
    user: str | None = None
    #: chat.update calls on this message: (time, new text).
    edits: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Streamed:
    """A message the bot streamed (chat.startStream ... stopStream), then perhaps chat.update'd:
    its text now, and every call that changed it as (method, time, text after)."""

    token: str
    channel: str
    thread_ts: str | None
    ts: str
    recipient_user_id: str | None
    recipient_team_id: str | None
    text: str
    streaming: bool = True
    changes: list[tuple[str, float, str]] = field(default_factory=list)


@dataclass
class Status:
    """An assistant.threads.setStatus call ("" clears the status)."""

    token: str
    channel_id: str
    thread_ts: str
    status: str
    at: float


@dataclass
class Reaction:
    action: str  # "add" or "remove"
    token: str
    channel: str
    timestamp: str
    name: str
    at: float


@dataclass
class ApiCall:
    method: str
    token: str | None
    params: dict[str, Any]
    status: int
    error: str | None
    at: float


class FakeSlack:
    """Start with `await FakeSlack().start()`; `add_app()` for each app the tests use."""

    def __init__(self, *, ack_timeout: float = 3.0, max_retries: int = 3,
                 echo_own_messages: bool = True) -> None:
        self.ack_timeout = ack_timeout
        self.max_retries = max_retries
        self.echo_own_messages = echo_own_messages
        self.apps: list[FakeApp] = []
        self.deliveries: list[Delivery] = []
        #: Unacked deliveries by envelope id, in delivery order: an ack finds its own at once
        #: (a scan of every delivery per ack slowed the fake's loop, and so every later ack).
        self._unacked: dict[str, list[Delivery]] = {}
        self.posted: list[Posted] = []
        self.reactions: list[Reaction] = []
        self.streams: list[Streamed] = []
        self.statuses: list[Status] = []
        self.calls: list[ApiCall] = []
        self.rate_limits: dict[str, list[float]] = {}
        self.revoked: set[str] = set()
        self.users: dict[str, dict[str, Any]] = {}
        self.base_url = ""
        #: Files behind url_private, served only to the bot token of the app they were shared
        #: with (tests/fakes/files.py).
        self.file_host = FakeFileHost("/files-pri")
        self._runner: web.AppRunner | None = None
        self._tickets: dict[str, FakeApp] = {}
        self._socket_ids = itertools.count(1)
        self._ids = itertools.count(1)
        self._ts = itertools.count(1)
        self._changed = asyncio.Condition()
        self._timers: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    # Lifecycle -----------------------------------------------------------------------------

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/link/", self._socket)
        app.router.add_post("/response/{token}", self._response_url)
        app.router.add_get("/files-pri/{file_id}/{name}", self.file_host.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/"

    async def stop(self) -> None:
        for timer in list(self._timers):
            timer.cancel()
        for app in self.apps:
            for sock in list(app.sockets):
                sock.release.set()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1):
                        await sock.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def add_app(self, name: str = "default", *, team_id: str = "T0001",
                bot_user_id: str | None = None) -> FakeApp:
        n = len(self.apps) + 1
        app = FakeApp(
            name=name,
            team_id=team_id,
            bot_user_id=bot_user_id or f"UBOT{n:04d}",
            bot_id=f"BBOT{n:04d}",
            app_id=f"A{n:04d}",
            bot_token=f"xoxb-fake-{n}-{secrets.token_hex(12)}",
            app_token=f"xapp-fake-{n}-{secrets.token_hex(12)}",
        )
        self.apps.append(app)
        return app

    def add_file(self, app: FakeApp, name: str, *, data: bytes | None = None,
                 size: int | None = None, mimetype: str = "application/octet-stream",
                 ) -> dict[str, Any]:
        """A file shared with `app` (only its bot token downloads it): an entry for an event's
        `files` (e.g. `dm(..., files=[...], subtype="file_share")`)."""
        file = self.file_host.add(name, data=data, size=size, mimetype=mimetype,
                                  token=app.bot_token)
        return {"id": file.id, "name": name, "title": name, "mimetype": mimetype,
                "filetype": name.rpartition(".")[2], "size": file.size,
                "url_private": self.base_url + self.file_host.path(file),
                "url_private_download": self.base_url + self.file_host.path(file)}

    # Waiting -------------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], Any], within: float = 10.0) -> Any:
        """Wait until predicate() is truthy (checked on every change) and return its value."""
        async with asyncio.timeout(within):
            async with self._changed:
                while True:
                    value = predicate()
                    if value:
                        return value
                    await self._changed.wait()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def posts(self, *, channel: str | None = None, via: str | None = None) -> list[Posted]:
        return [
            p for p in self.posted
            if (channel is None or p.channel == channel) and (via is None or p.via == via)
        ]

    async def wait_posts(self, count: int, within: float = 10.0, **filters: Any) -> list[Posted]:
        return await self.wait_for(
            lambda: (found if len(found := self.posts(**filters)) >= count else None), within
        )

    async def wait_ack(self, delivery: Delivery, within: float = 5.0) -> Delivery:
        await self.wait_for(lambda: delivery.acked_at is not None, within)
        return delivery

    async def wait_connected(self, app: FakeApp, count: int = 1, within: float = 10.0) -> None:
        """Wait until `count` sockets have been opened for the app in total, one is usable."""
        await self.wait_for(
            lambda: app.connections_opened >= count and any(s.usable for s in app.sockets), within
        )

    def deliveries_of(self, event_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if _event_id(d.envelope) == event_id]

    # Injecting envelopes -------------------------------------------------------------------

    def new_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts):06d}"

    async def send_event(self, app: FakeApp, event: dict[str, Any], *,
                         event_id: str | None = None) -> Delivery:
        """Deliver an Events API envelope carrying `event`."""
        event.setdefault("event_ts", event.get("ts") or self.new_ts())
        payload = {
            "token": "verification-token",
            "team_id": app.team_id,
            "api_app_id": app.app_id,
            "event": event,
            "type": "event_callback",
            "event_id": event_id or f"Ev{next(self._ids):08d}",
            "event_time": int(time.time()),
            "authorizations": [{"team_id": app.team_id, "user_id": app.bot_user_id,
                                "is_bot": True, "is_enterprise_install": False}],
            "is_ext_shared_channel": False,
        }
        return await self.deliver(app, {
            "envelope_id": self._envelope_id(),
            "type": "events_api",
            "accepts_response_payload": False,
            "retry_attempt": 0,
            "retry_reason": "",
            "payload": payload,
        })

    async def dm(self, app: FakeApp, user: str, text: str, *, channel: str | None = None,
                 thread_ts: str | None = None, **extra: Any) -> Delivery:
        """A user writes to the bot in a direct message (message.im)."""
        event = {"type": "message", "channel_type": "im", "channel": channel or f"D{user}",
                 "user": user, "text": text, "ts": self.new_ts(), "team": app.team_id, **extra}
        if thread_ts:
            event["thread_ts"] = thread_ts
        return await self.send_event(app, event)

    async def mention(self, app: FakeApp, user: str, text: str, *, channel: str = "C0GENERAL",
                      thread_ts: str | None = None) -> Delivery:
        """A user @mentions the bot in a channel (app_mention); `text` follows the mention."""
        event = {"type": "app_mention", "channel": channel, "user": user,
                 "text": f"<@{app.bot_user_id}> {text}", "ts": self.new_ts(), "team": app.team_id}
        if thread_ts:
            event["thread_ts"] = thread_ts
        return await self.send_event(app, event)

    async def slash(self, app: FakeApp, command: str, text: str, *, user: str = "U0ALICE",
                    channel: str = "C0GENERAL") -> Delivery:
        """A user runs a slash command."""
        trigger = f"{next(self._ids)}.{secrets.token_hex(6)}"
        return await self.deliver(app, {
            "envelope_id": self._envelope_id(),
            "type": "slash_commands",
            "accepts_response_payload": True,
            "payload": {
                "token": "verification-token", "team_id": app.team_id, "team_domain": "fake",
                "channel_id": channel, "channel_name": "general", "user_id": user,
                "user_name": user.lower(), "command": command, "text": text,
                "api_app_id": app.app_id, "is_enterprise_install": "false",
                "response_url": f"{self.base_url}/response/{trigger.replace('.', '-')}",
                "trigger_id": trigger,
            },
        })

    async def redeliver(self, delivery: Delivery, *, same_envelope: bool = True,
                        reason: str = "timeout") -> Delivery:
        """Deliver an envelope again: as is, or as Slack's retry (new envelope id, attempt+1)."""
        envelope = json.loads(json.dumps(delivery.envelope))
        if not same_envelope:
            envelope["envelope_id"] = self._envelope_id()
            envelope["retry_attempt"] = int(envelope.get("retry_attempt", 0)) + 1
            envelope["retry_reason"] = reason
        return await self.deliver(delivery.app, envelope, retry=False)

    async def deliver(self, app: FakeApp, envelope: dict[str, Any], *,
                      retry: bool = True) -> Delivery:
        """Write an envelope to the app's newest usable socket (waiting for one if needed)."""
        sock = await self._pick_socket(app)
        delivery = Delivery(envelope, app, sock.id if sock else None, time.monotonic())
        self.deliveries.append(delivery)
        if "envelope_id" in envelope:
            self._unacked.setdefault(delivery.envelope_id, []).append(delivery)
        if sock is not None and not sock.silent:
            with contextlib.suppress(Exception):
                await sock.ws.send_str(json.dumps(envelope))
        # Anything written into a silent socket is lost in the network, as with Slack.
        if retry and self.max_retries > 0 and "envelope_id" in envelope:
            self._spawn(self._retry_unacked(delivery, 0))
        await self._notify()
        return delivery

    async def _pick_socket(self, app: FakeApp, within: float = 10.0) -> FakeSocket | None:
        deadline = time.monotonic() + within
        while True:
            for sock in reversed(app.sockets):
                if sock.usable and not sock.silent:
                    return sock
            silent = [s for s in app.sockets if s.usable]
            if silent or time.monotonic() > deadline:
                return silent[-1] if silent else None
            await asyncio.sleep(0.05)

    async def _retry_unacked(self, delivery: Delivery, attempt: int) -> None:
        """Slack's at-least-once delivery: an envelope not acked in time is sent again."""
        await asyncio.sleep(self.ack_timeout)
        if delivery.acked_at is not None or attempt >= self.max_retries:
            return
        if any(d.acked_at is not None for d in self._same_event(delivery)):
            return
        envelope = json.loads(json.dumps(delivery.envelope))
        envelope["envelope_id"] = self._envelope_id()
        envelope["retry_attempt"] = attempt + 1
        envelope["retry_reason"] = "timeout"
        again = await self.deliver(delivery.app, envelope, retry=False)
        self._spawn(self._retry_unacked(again, attempt + 1))

    def _same_event(self, delivery: Delivery) -> list[Delivery]:
        key = _event_id(delivery.envelope) or _trigger_id(delivery.envelope)
        return [d for d in self.deliveries
                if (_event_id(d.envelope) or _trigger_id(d.envelope)) == key]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    def _envelope_id(self) -> str:
        return f"env-{next(self._ids)}-{secrets.token_hex(4)}"

    # Socket faults -------------------------------------------------------------------------

    async def refresh(self, app: FakeApp, *, close_after: float = 10.0) -> None:
        """Send `disconnect refresh_requested` on every socket; close them `close_after` later."""
        for sock in list(app.sockets):
            if sock.ws.closed:
                continue
            sock.draining = True
            with contextlib.suppress(Exception):
                await sock.ws.send_str(json.dumps({
                    "type": "disconnect", "reason": "refresh_requested",
                    "debug_info": {"host": "fake-slack"},
                }))
            self._spawn(self._close_later(sock, close_after))
        await self._notify()

    async def _close_later(self, sock: FakeSocket, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._close_socket(sock)

    async def drop(self, app: FakeApp) -> None:
        """Close every socket of the app from the server side."""
        for sock in list(app.sockets):
            await self._close_socket(sock)

    async def go_silent(self, app: FakeApp) -> None:
        """Make every current socket silently dead: no pongs, nothing delivered, TCP open."""
        for sock in app.sockets:
            sock.silent = True
            sock.silenced.set()
        await self._notify()

    async def _close_socket(self, sock: FakeSocket) -> None:
        sock.release.set()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await sock.ws.close(code=1001, message=b"going away")

    def revoke(self, token: str) -> None:
        """Make a token invalid from now on (answers invalid_auth)."""
        self.revoked.add(token)

    def rate_limit(self, method: str, *, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next `times` calls of `method` with HTTP 429 and Retry-After."""
        self.rate_limits[method] = [times, retry_after, 0.0]

    # HTTP: Web API -------------------------------------------------------------------------

    def _token_app(self, token: str | None, kind: str) -> FakeApp | None:
        if token is None or token in self.revoked:
            return None
        for app in self.apps:
            if (app.bot_token if kind == "bot" else app.app_token) == token:
                return app
        return None

    async def _api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                body = await request.json()
                if isinstance(body, dict):
                    params.update(body)
            else:
                params.update(dict(await request.post()))
        token = None
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            token = header[7:].strip()
        token = token or params.pop("token", None)
        now = time.monotonic()
        limit = self.rate_limits.get(method)
        if limit is not None and limit[0] > 0:
            limit[0] -= 1
            limit[2] = now
            self.calls.append(ApiCall(method, token, params, 429, "ratelimited", now))
            await self._notify()
            return web.json_response(
                {"ok": False, "error": "ratelimited"}, status=429,
                headers={"Retry-After": str(int(limit[1]))},
            )
        kind = "app" if method == "apps.connections.open" else "bot"
        app = self._token_app(token, kind)
        if app is None:
            result: dict[str, Any] = {"ok": False, "error": "invalid_auth"}
        else:
            result = self._method(method, app, token or "", params, now)
        self.calls.append(ApiCall(method, token, params, 200, result.get("error"), now))
        await self._notify()
        if method == "chat.postMessage" and result.get("ok"):
            await self._echo(app, params, result)
        return web.json_response(result)

    def _method(self, method: str, app: FakeApp, token: str, params: dict[str, Any],
                now: float) -> dict[str, Any]:
        if method == "auth.test":
            return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake Team",
                    "user": "bot", "team_id": app.team_id, "user_id": app.bot_user_id,
                    "bot_id": app.bot_id, "is_enterprise_install": False}
        if method == "apps.connections.open":
            ticket = secrets.token_hex(8)
            self._tickets[ticket] = app
            return {"ok": True, "url": f"ws://{self.base_url[len('http://'):]}/link/"
                                       f"?ticket={ticket}"}
        if method in ("chat.postMessage", "chat.postEphemeral"):
            channel, text = params.get("channel"), params.get("text")
            if not channel:
                return {"ok": False, "error": "channel_not_found"}
            if not text:
                return {"ok": False, "error": "no_text"}
            ts = self.new_ts()
            self.posted.append(Posted(
                via=method, token=token, channel=str(channel), text=str(text),
                thread_ts=params.get("thread_ts"), ts=ts, at=now, user=params.get("user"),
            ))
            return {"ok": True, "channel": channel, "ts": ts,
                    "message": {"type": "message", "text": text, "user": app.bot_user_id,
                                "bot_id": app.bot_id, "ts": ts}}
        if method.startswith("chat.") and method.endswith("Stream"):
            return self._stream_method(method, app, token, params, now)
        if method == "chat.update":
            return self._update(params, now)
        if method == "assistant.threads.setStatus" and app.refuse_status:
            return {"ok": False, "error": app.refuse_status}
        if method == "assistant.threads.setStatus":
            channel_id, thread_ts, status = (params.get(k) for k in
                                             ("channel_id", "thread_ts", "status"))
            if not channel_id or not thread_ts or status is None:
                return {"ok": False, "error": "invalid_arguments"}
            self.statuses.append(Status(token, str(channel_id), str(thread_ts), str(status), now))
            return {"ok": True}
        if method in ("reactions.add", "reactions.remove"):
            self.reactions.append(Reaction(
                method.split(".")[1], token, str(params.get("channel")),
                str(params.get("timestamp")), str(params.get("name")), now,
            ))
            return {"ok": True}
        if method == "users.info":
            user_id = str(params.get("user"))
            user = self.users.get(user_id) or {
                "id": user_id, "name": user_id.lower(), "real_name": f"Real {user_id}",
                "profile": {"display_name": f"{user_id.title()} Display",
                            "real_name": f"Real {user_id}"},
            }
            return {"ok": True, "user": user}
        return {"ok": False, "error": "unknown_method"}

    def stream(self, ts: str) -> Streamed | None:
        return next((m for m in self.streams if m.ts == ts), None)

    def streams_in(self, channel: str | None = None) -> list[Streamed]:
        return [m for m in self.streams if channel is None or m.channel == channel]

    def calls_of(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method]

    def _stream_method(self, method: str, app: FakeApp, token: str, params: dict[str, Any],
                       now: float) -> dict[str, Any]:
        """chat.startStream / appendStream / stopStream, checked like Slack checks them."""
        if method not in ("chat.startStream", "chat.appendStream", "chat.stopStream"):
            return {"ok": False, "error": "unknown_method"}
        if app.refuse_streaming:
            return {"ok": False, "error": app.refuse_streaming}
        channel = params.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        text = params.get("markdown_text")
        chunks = params.get("chunks")
        if text is None and isinstance(chunks, list):
            text = "".join(str(c.get("text", "")) for c in chunks
                           if isinstance(c, dict) and c.get("type") == "markdown_text")
        if method == "chat.startStream":
            if str(channel) in app.refuse_streaming_in:
                return {"ok": False, "error": app.refuse_streaming_in[str(channel)]}
            thread_ts = params.get("thread_ts")
            if not thread_ts:
                return {"ok": False, "error": "invalid_thread_ts"}
            if not str(channel).startswith("D"):
                # Outside a DM Slack must know whom the stream is for.
                if not params.get("recipient_user_id"):
                    return {"ok": False, "error": "missing_recipient_user_id"}
                if not params.get("recipient_team_id"):
                    return {"ok": False, "error": "missing_recipient_team_id"}
            ts = self.new_ts()
            message = Streamed(token, str(channel), str(thread_ts), ts,
                               params.get("recipient_user_id"), params.get("recipient_team_id"),
                               str(text or ""))
            message.changes.append((method, now, message.text))
            self.streams.append(message)
            return {"ok": True, "channel": channel, "ts": ts}
        found = self.stream(str(params.get("ts")))
        if found is None or found.channel != channel:
            return {"ok": False, "error": "message_not_found"}
        if not found.streaming:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        if method == "chat.appendStream" and not text:
            return {"ok": False, "error": "no_text"}
        found.text += str(text or "")
        if method == "chat.stopStream":
            found.streaming = False
        found.changes.append((method, now, found.text))
        return {"ok": True, "channel": channel, "ts": found.ts}

    def _update(self, params: dict[str, Any], now: float) -> dict[str, Any]:
        channel, ts = params.get("channel"), params.get("ts")
        text = params.get("markdown_text") or params.get("text")
        if not text:
            return {"ok": False, "error": "no_text"}
        for posted in self.posted:
            if posted.ts == ts and posted.channel == channel:
                posted.text = str(text)
                posted.edits.append((now, posted.text))
                return {"ok": True, "channel": channel, "ts": ts, "text": text}
        streamed = self.stream(str(ts))
        if streamed is not None and streamed.channel == channel:
            if streamed.streaming:
                return {"ok": False, "error": "cant_update_message"}
            streamed.text = str(text)
            streamed.changes.append(("chat.update", now, streamed.text))
            return {"ok": True, "channel": channel, "ts": ts, "text": text}
        return {"ok": False, "error": "message_not_found"}

    async def _echo(self, app: FakeApp, params: dict[str, Any], result: dict[str, Any]) -> None:
        """Slack sends a bot its own DM replies back as message.im events."""
        channel = str(params.get("channel"))
        if not self.echo_own_messages or not channel.startswith("D"):
            return
        event = {"type": "message", "channel_type": "im", "channel": channel,
                 "user": app.bot_user_id, "bot_id": app.bot_id, "text": params.get("text"),
                 "ts": result["ts"], "team": app.team_id}
        if params.get("thread_ts"):
            event["thread_ts"] = params["thread_ts"]
        self._spawn(self.send_event(app, event))

    async def _response_url(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        now = time.monotonic()
        self.posted.append(Posted(
            via="response_url", token=None, channel=None, text=str(body.get("text")),
            thread_ts=None, ts=None, at=now, response_type=body.get("response_type"),
        ))
        await self._notify()
        return web.Response(text="ok")

    # Socket Mode ---------------------------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        app = self._tickets.pop(request.query.get("ticket", ""), None)
        if app is None:
            raise web.HTTPUnauthorized(text="invalid ticket")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        sock = FakeSocket(next(self._socket_ids), app, ws, time.monotonic())
        app.sockets.append(sock)
        app.connections_opened += 1
        await ws.send_str(json.dumps({
            "type": "hello", "num_connections": len([s for s in app.sockets if s.usable]),
            "debug_info": {"host": "fake-slack", "approximate_connection_time": 18060},
            "connection_info": {"app_id": app.app_id},
        }))
        await self._notify()
        try:
            while not ws.closed:
                if sock.silent:
                    # Dead without a word: no pongs (they are sent from receive()), no reads.
                    await sock.release.wait()
                    break
                receive = asyncio.ensure_future(ws.receive())
                silenced = asyncio.ensure_future(sock.silenced.wait())
                done, _ = await asyncio.wait({receive, silenced},
                                             return_when=asyncio.FIRST_COMPLETED)
                silenced.cancel()
                if receive not in done:
                    receive.cancel()
                    continue
                msg = receive.result()
                if msg.type == WSMsgType.TEXT:
                    await self._on_ack(sock, msg.data)
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                                  WSMsgType.ERROR):
                    break
        finally:
            with contextlib.suppress(ValueError):
                app.sockets.remove(sock)
            await self._notify()
        return ws

    async def _on_ack(self, sock: FakeSocket, data: str) -> None:
        try:
            ack = json.loads(data)
        except ValueError:
            return
        envelope_id = ack.get("envelope_id") if isinstance(ack, dict) else None
        now = time.monotonic()
        waiting = self._unacked.get(str(envelope_id), [])
        if waiting:
            delivery = waiting.pop(0)
            if not waiting:
                del self._unacked[delivery.envelope_id]
            delivery.acked_at = now
            delivery.ack = ack
        await self._notify()


def _event_id(envelope: dict[str, Any]) -> str | None:
    payload = envelope.get("payload")
    return payload.get("event_id") if isinstance(payload, dict) else None


def _trigger_id(envelope: dict[str, Any]) -> str | None:
    payload = envelope.get("payload")
    return payload.get("trigger_id") if isinstance(payload, dict) else None
