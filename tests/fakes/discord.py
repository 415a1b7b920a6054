"""A fake Discord on 127.0.0.1:0: the REST endpoints and the gateway websocket a bot uses.

Real discord.py talks to it unmodified (see /work/shared/PLATFORMS.md). It records every message
posted (with the token that posted it, its nonce and reference), every edit of one (with its time)
and every typing call, and lets a test inject MESSAGE_CREATE events, force a RESUME to replay events, send op 7 / op 9, and close the
connection with any close code (4004 invalid token, 4014 disallowed intent, 4000 resumable).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.files import FakeFileHost

DISCORD_EPOCH_MS = 1_420_070_400_000
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15

_counter = itertools.count(1)


def snowflake() -> str:
    """A fresh, realistic Discord id (timestamp in the high bits, so created_at is now)."""
    now_ms = int(time.time() * 1000)
    return str(((now_ms - DISCORD_EPOCH_MS) << 22) | (next(_counter) & 0x3FFFFF))


def user_object(user_id: str, username: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": user_id,
        "username": username,
        "discriminator": "0",
        "global_name": None,
        "avatar": None,
        "bot": bot,
    }


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py treats anything but exactly "application/json" as text (web.json_response adds
    # "; charset=utf-8"), so set the header by hand.
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


@dataclass
class FakeBot:
    """A bot account the fake knows: its token, user and whether privileged intents are enabled."""

    token: str
    user_id: str
    username: str
    application_id: str
    message_content_allowed: bool = True
    #: False once the token was reset: REST still answers, the gateway closes with 4004.
    gateway_valid: bool = True

    def user(self) -> dict[str, Any]:
        return user_object(self.user_id, self.username, bot=True)


@dataclass
class Posted:
    """A message a bot created through POST /channels/{id}/messages."""

    token: str
    channel_id: str
    payload: dict[str, Any]
    message: dict[str, Any]
    order: int
    #: When it was created (time.monotonic()).
    at: float = field(default_factory=time.monotonic)

    @property
    def content(self) -> str:
        """The content it was posted with (see `text` for what it shows after edits)."""
        return str(self.payload.get("content") or "")

    @property
    def text(self) -> str:
        """What the message shows now: its content after the last edit."""
        return str(self.message.get("content") or "")

    @property
    def nonce(self) -> str | None:
        return self.payload.get("nonce")

    @property
    def reference(self) -> dict[str, Any] | None:
        """The message_reference sent, ids as strings (discord.py sends them as numbers)."""
        ref = self.payload.get("message_reference")
        if ref is None:
            return None
        return {k: str(v) if k.endswith("_id") and v is not None else v for k, v in ref.items()}


@dataclass
class Edit:
    """A PATCH /channels/{id}/messages/{mid} that changed a message's content."""

    token: str
    channel_id: str
    message_id: str
    content: str
    at: float
    order: int


@dataclass
class Typing:
    token: str
    channel_id: str
    order: int


@dataclass
class Connection:
    ws: web.WebSocketResponse
    request: web.Request
    path: str
    session: Session | None = None


@dataclass
class Session:
    """One gateway session (READY ... until invalidated), resumable from any connection."""

    id: str
    bot: FakeBot
    intents: int
    events: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0
    conn: Connection | None = None
    replay_from: int | None = None
    valid: bool = True


@dataclass
class GatewayOp:
    """What a client sent on the gateway (IDENTIFY or RESUME), for assertions."""

    op: int
    token: str
    path: str
    data: dict[str, Any]
    at: float


class FakeDiscord:
    """Start with `await FakeDiscord().start()`; point a bot at `api_base_url` / `gateway_url`."""

    def __init__(self, *, echo_own_messages: bool = True, heartbeat_interval_ms: int = 41_250):
        self.echo_own_messages = echo_own_messages
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.bots: dict[str, FakeBot] = {}
        self.sessions: dict[str, Session] = {}
        self.posted: list[Posted] = []
        self.typing: list[Typing] = []
        self.edits: list[Edit] = []
        #: Edits to answer with 429 (retry_after `rate_limit_retry_after`) before editing.
        self.rate_limit_edits = 0
        self.rate_limit_retry_after = 0.2
        #: Edits answered with 429 so far.
        self.rate_limited_edits = 0
        self.gateway_ops: list[GatewayOp] = []
        self.rest_calls: list[tuple[str, str, str | None]] = []
        self.connections: list[Connection] = []
        #: POSTs to answer with a 500 *after* creating the message.
        self.fail_after_create = 0
        #: POSTs whose connection is cut *after* the message was created (a lost response).
        self.drop_after_create = 0
        #: POSTs answered with an earlier message because their nonce was seen before.
        self.nonce_hits = 0
        #: Channels where the bot may not post at all / may not reply (no Read Message History).
        self.forbidden_channels: set[str] = set()
        self.no_history_channels: set[str] = set()
        self._nonces: dict[tuple[str, str], dict[str, Any]] = {}
        self._order = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Condition | None = None
        self.port = 0
        #: Attachments served CDN-like at /attachments/... (no token: the URL is the key).
        self.file_host = FakeFileHost("/attachments")

    # Lifecycle -----------------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/api/v10/users/@me", self._me)
        app.router.add_get("/api/v10/oauth2/applications/@me", self._application)
        app.router.add_post("/api/v10/channels/{channel_id}/messages", self._post_message)
        app.router.add_patch(
            "/api/v10/channels/{channel_id}/messages/{message_id}", self._edit_message
        )
        app.router.add_post("/api/v10/channels/{channel_id}/typing", self._typing)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/resume", self._gateway)
        app.router.add_get("/attachments/{channel_id}/{file_id}/{name}", self._attachment)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._changed = asyncio.Condition()
        return self

    def attachment(self, name: str, *, data: bytes | None = None, size: int | None = None,
                   content_type: str = "application/octet-stream",
                   channel_id: str = "2001") -> dict[str, Any]:
        """An attachment object for `message_create(extra={"attachments": [...]})`."""
        file = self.file_host.add(name, data=data, size=size, mimetype=content_type)
        url = f"http://127.0.0.1:{self.port}/attachments/{channel_id}/{file.id}/{name}"
        return {"id": snowflake(), "filename": name, "size": file.size, "url": url,
                "proxy_url": url, "content_type": content_type}

    async def _attachment(self, request: web.Request) -> web.StreamResponse:
        return await self.file_host.handle(request)

    async def stop(self) -> None:
        for conn in list(self.connections):
            if not conn.ws.closed:
                await conn.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def api_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    @property
    def resume_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/resume"

    def bot_settings(self, bot: FakeBot, **extra: Any) -> dict[str, Any]:
        """The `discord.bots[]` entry of a gateway config that points this bot at the fake."""
        settings: dict[str, Any] = {
            "name": bot.username,
            "token": {"value": bot.token},
            "api_base_url": self.api_base_url,
            "gateway_url": self.gateway_url,
            "identify_interval": 0,
        }
        settings.update(extra)
        return settings

    # Accounts ------------------------------------------------------------------------------

    def add_bot(self, name: str = "helper", *, token: str | None = None,
                message_content_allowed: bool = True) -> FakeBot:
        token = token or f"{name}.{secrets.token_urlsafe(24)}"
        bot = FakeBot(token, snowflake(), name, snowflake(), message_content_allowed)
        self.bots[token] = bot
        return bot

    # Waiting -------------------------------------------------------------------------------

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], within: float = 10.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked on every change); return its value."""
        assert self._changed is not None
        async with asyncio.timeout(within):
            async with self._changed:
                while not (result := predicate()):
                    await self._changed.wait()
        return result

    async def wait_posts(self, count: int, *, token: str | None = None,
                         within: float = 10.0) -> list[Posted]:
        def enough() -> list[Posted] | None:
            found = self.posts(token)
            return found if len(found) >= count else None

        result: list[Posted] = await self.wait_for(enough, within)
        return result

    async def wait_ready(self, bot: FakeBot, within: float = 15.0) -> Session:
        """Wait until the bot has a live, identified gateway session."""
        result: Session = await self.wait_for(lambda: self.live_session(bot), within)
        return result

    def posts(self, token: str | None = None) -> list[Posted]:
        return [p for p in self.posted if token is None or p.token == token]

    def ops(self, op: int, token: str | None = None) -> list[GatewayOp]:
        return [o for o in self.gateway_ops if o.op == op and (token is None or o.token == token)]

    def live_session(self, bot: FakeBot) -> Session | None:
        for session in reversed(list(self.sessions.values())):
            if session.bot is bot and session.valid and session.conn is not None:
                return session
        return None

    def current_session(self, bot: FakeBot) -> Session:
        for session in reversed(list(self.sessions.values())):
            if session.bot is bot and session.valid:
                return session
        raise AssertionError(f"bot {bot.username} has no gateway session")

    # Injecting events ----------------------------------------------------------------------

    async def message_create(
        self,
        bot: FakeBot,
        content: str,
        *,
        channel_id: str | None = None,
        guild_id: str | None = None,
        author: dict[str, Any] | None = None,
        mentions: list[dict[str, Any]] | None = None,
        message_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Deliver a MESSAGE_CREATE to the bot's session (a DM unless guild_id is given)."""
        author = author or user_object("1001", "alice")
        message: dict[str, Any] = {
            "id": message_id or snowflake(),
            "channel_id": channel_id or "2001",
            "author": author,
            "content": content,
            "timestamp": datetime.now(UTC).isoformat(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": mentions or [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
        }
        if guild_id is not None:
            message["guild_id"] = guild_id
            message["member"] = {"roles": [], "joined_at": message["timestamp"], "deaf": False,
                                 "mute": False, "flags": 0}
        message.update(extra or {})
        session = self.current_session(bot)
        delivered = dict(message)
        mentioned = any(m.get("id") == bot.user_id for m in delivered["mentions"])
        if (
            guild_id is not None
            and not session.intents & INTENT_MESSAGE_CONTENT
            and not mentioned
            and author.get("id") != bot.user_id
        ):
            # What Discord does without the privileged intent: guild messages that do not
            # mention the bot arrive without their content.
            delivered.update(content="", attachments=[], embeds=[])
        await self.dispatch(session, "MESSAGE_CREATE", delivered)
        return message

    async def redeliver(self, bot: FakeBot, message: dict[str, Any]) -> None:
        """Deliver the same MESSAGE_CREATE again (what a replay after a restart looks like)."""
        await self.dispatch(self.current_session(bot), "MESSAGE_CREATE", dict(message))

    async def dispatch(self, session: Session, event: str, data: dict[str, Any]) -> int:
        session.seq += 1
        frame = {"op": 0, "t": event, "s": session.seq, "d": data}
        session.events.append(frame)
        if session.conn is not None and not session.conn.ws.closed:
            try:
                await session.conn.ws.send_str(json.dumps(frame))
            except ConnectionError:
                pass  # delivered on RESUME, like Discord
        return session.seq

    async def force_resume_replay(self, bot: FakeBot, message_id: str | None = None) -> None:
        """Drop the socket and make the next RESUME replay events from this message on
        (from the session's first event without one), as if the client had missed them."""
        session = self.current_session(bot)
        session.replay_from = 1
        if message_id is not None:
            seqs = [f["s"] for f in session.events
                    if f["t"] == "MESSAGE_CREATE" and f["d"]["id"] == message_id]
            assert seqs, f"message {message_id} was never delivered to this session"
            session.replay_from = seqs[0]
        await self.close(bot, 4000)

    async def reconnect(self, bot: FakeBot) -> None:
        """Send op 7 RECONNECT: the client should close and RESUME."""
        conn = self._conn(bot)
        await conn.ws.send_str(json.dumps({"op": 7, "d": None, "s": None, "t": None}))

    async def invalidate(self, bot: FakeBot, *, resumable: bool = False) -> None:
        """Send op 9 INVALID SESSION; unless resumable, the session is gone for good."""
        session = self.current_session(bot)
        conn = self._conn(bot)
        if not resumable:
            session.valid = False
        await conn.ws.send_str(json.dumps({"op": 9, "d": resumable, "s": None, "t": None}))

    async def close(self, bot: FakeBot, code: int, message: bytes = b"") -> None:
        """Close the bot's gateway connection with this close code."""
        conn = self._conn(bot)
        await conn.ws.close(code=code, message=message)

    def _conn(self, bot: FakeBot) -> Connection:
        session = self.current_session(bot)
        if session.conn is None or session.conn.ws.closed:
            raise AssertionError(f"bot {bot.username} is not connected")
        return session.conn

    # REST ----------------------------------------------------------------------------------

    def _bot_of(self, request: web.Request) -> FakeBot | None:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bot ")
        return self.bots.get(token) if auth.startswith("Bot ") else None

    def _unauthorized(self) -> web.Response:
        return _json({"message": "401: Unauthorized", "code": 0}, 401)

    async def _me(self, request: web.Request) -> web.Response:
        bot = self._bot_of(request)
        self.rest_calls.append((request.method, request.path, bot.token if bot else None))
        if bot is None:
            return self._unauthorized()
        return _json({**bot.user(), "flags": 0, "verified": True, "mfa_enabled": False})

    async def _application(self, request: web.Request) -> web.Response:
        bot = self._bot_of(request)
        self.rest_calls.append((request.method, request.path, bot.token if bot else None))
        if bot is None:
            return self._unauthorized()
        return _json({
            "id": bot.application_id,
            "name": bot.username,
            "description": "",
            "icon": None,
            "bot_public": False,
            "bot_require_code_grant": False,
            "owner": user_object("1", "owner"),
            "verify_key": "0" * 64,
            "flags": 0,
        })

    async def _typing(self, request: web.Request) -> web.Response:
        bot = self._bot_of(request)
        if bot is None:
            return self._unauthorized()
        self.typing.append(Typing(bot.token, request.match_info["channel_id"], next(self._order)))
        await self._notify()
        return web.Response(status=204)

    async def _post_message(self, request: web.Request) -> web.Response:
        bot = self._bot_of(request)
        if bot is None:
            return self._unauthorized()
        if request.content_type != "application/json":
            return _json({"message": "Cannot send an empty message", "code": 50006}, 400)
        payload = await request.json()
        content = payload.get("content") or ""
        if not content or len(content) > 2000:
            return _json({"message": "Invalid Form Body", "code": 50035}, 400)
        return await self._create_message(request, bot, payload)

    async def _create_message(
        self,
        request: web.Request,
        bot: FakeBot,
        payload: dict[str, Any],
        attachments: list[dict[str, Any]] | None = None,
        created: Callable[[dict[str, Any]], None] | None = None,
    ) -> web.Response:
        """Create the message a bot posts (its content already checked): the nonce, the
        channel's permissions, recording, the echo on the gateway and the failure switches.
        Subclasses that read other bodies (files, components) call it too; `created` sees
        the new message first."""
        content = str(payload.get("content") or "")
        nonce = payload.get("nonce")
        if nonce is not None and len(str(nonce)) > 25:
            return _json({"message": "Invalid Form Body (nonce)", "code": 50035}, 400)
        if nonce is not None and payload.get("enforce_nonce"):
            existing = self._nonces.get((bot.token, str(nonce)))
            if existing is not None:
                self.nonce_hits += 1
                await self._notify()
                return _json(existing)
        channel_id = request.match_info["channel_id"]
        reference = payload.get("message_reference")
        if channel_id in self.forbidden_channels:
            return _json({"message": "Missing Permissions", "code": 50013}, 403)
        if reference and channel_id in self.no_history_channels:
            return _json({"message": "Cannot reply without permission to read message history",
                          "code": 160002}, 403)
        message = {
            "id": snowflake(),
            "channel_id": channel_id,
            "author": bot.user(),
            "content": content,
            "timestamp": datetime.now(UTC).isoformat(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": attachments or [],
            "embeds": [],
            "components": payload.get("components") or [],
            "pinned": False,
            "type": 19 if reference else 0,
            "flags": 0,
        }
        if nonce is not None:
            message["nonce"] = nonce
        if reference:
            message["message_reference"] = reference
        if created is not None:
            created(message)
        self.posted.append(Posted(bot.token, channel_id, payload, message, next(self._order)))
        if nonce is not None:
            self._nonces[(bot.token, str(nonce))] = message
        await self._notify()
        if self.echo_own_messages:
            # Discord echoes a bot's own messages back to it on the gateway.
            session = self.live_session(bot)
            if session is not None:
                await self.dispatch(session, "MESSAGE_CREATE", dict(message))
        if self.drop_after_create > 0:
            self.drop_after_create -= 1
            assert request.transport is not None
            request.transport.abort()
            await self._notify()
            raise asyncio.CancelledError  # nothing can be answered on an aborted connection
        if self.fail_after_create > 0:
            self.fail_after_create -= 1
            await self._notify()
            return _json({"message": "Internal Server Error", "code": 0}, 500)
        return _json(message)

    def message_of(self, message_id: str) -> Posted | None:
        """The posted message with this id."""
        for post in self.posted:
            if post.message["id"] == message_id:
                return post
        return None

    def edits_of(self, message_id: str) -> list[Edit]:
        return [e for e in self.edits if e.message_id == message_id]

    def calls(self, token: str | None = None) -> int:
        """Message posts and edits made by a bot (the REST calls an answer costs)."""
        return len(self.posts(token)) + len([e for e in self.edits
                                             if token is None or e.token == token])

    async def _edit_message(self, request: web.Request) -> web.Response:
        bot = self._bot_of(request)
        if bot is None:
            return self._unauthorized()
        if self.rate_limit_edits > 0:
            # Discord's 429: discord.py waits retry_after and repeats the request (it treats
            # a 429 without a Via header as a Cloudflare ban).
            self.rate_limit_edits -= 1
            self.rate_limited_edits += 1
            await self._notify()
            response = _json({"message": "You are being rate limited.",
                              "retry_after": self.rate_limit_retry_after, "global": False}, 429)
            response.headers["Via"] = "1.1 google"
            return response
        channel_id, message_id = request.match_info["channel_id"], request.match_info["message_id"]
        post = self.message_of(message_id)
        if post is None or post.channel_id != channel_id:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        if post.token != bot.token:
            return _json({"message": "Cannot edit a message authored by another user",
                          "code": 50005}, 403)
        payload = await request.json()
        content = payload.get("content")
        if content is not None:
            if not content or len(content) > 2000:
                return _json({"message": "Invalid Form Body", "code": 50035}, 400)
            # Updated in place: a later POST with this message's nonce returns it as it is now.
            post.message["content"] = content
            post.message["edited_timestamp"] = datetime.now(UTC).isoformat()
            self.edits.append(Edit(bot.token, channel_id, message_id, content, time.monotonic(),
                                   next(self._order)))
        await self._notify()
        return _json(post.message)

    async def _not_found(self, request: web.Request) -> web.Response:
        self.rest_calls.append((request.method, request.path, None))
        return _json({"message": "404: Not Found", "code": 0}, 404)

    # Gateway -------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = Connection(ws, request, request.path)
        self.connections.append(conn)
        await ws.send_str(json.dumps(
            {"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}, "s": None,
             "t": None}
        ))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op, data = frame.get("op"), frame.get("d")
                if op == 1:
                    await ws.send_str(json.dumps({"op": 11, "d": None, "s": None, "t": None}))
                elif op == 2:
                    await self._identify(conn, data)
                elif op == 6:
                    await self._resume(conn, data)
        finally:
            if conn.session is not None and conn.session.conn is conn:
                conn.session.conn = None
            await self._notify()
        return ws

    async def _identify(self, conn: Connection, data: dict[str, Any]) -> None:
        token = str(data.get("token", ""))
        self.gateway_ops.append(GatewayOp(2, token, conn.path, data, time.monotonic()))
        await self._notify()
        bot = self.bots.get(token)
        if bot is None or not bot.gateway_valid:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = int(data.get("intents", 0))
        if intents & INTENT_MESSAGE_CONTENT and not bot.message_content_allowed:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        session = Session(secrets.token_hex(16), bot, intents)
        self.sessions[session.id] = session
        session.conn = conn
        conn.session = session
        await self.dispatch(session, "READY", {
            "v": 10,
            "user": bot.user(),
            "session_id": session.id,
            "resume_gateway_url": self.resume_url,
            "guilds": [],
            "private_channels": [],
            "relationships": [],
            "application": {"id": bot.application_id, "flags": 0},
        })
        await self._notify()

    async def _resume(self, conn: Connection, data: dict[str, Any]) -> None:
        token = str(data.get("token", ""))
        self.gateway_ops.append(GatewayOp(6, token, conn.path, data, time.monotonic()))
        session = self.sessions.get(str(data.get("session_id")))
        if session is None or not session.valid or session.bot.token != token:
            await conn.ws.send_str(json.dumps({"op": 9, "d": False, "s": None, "t": None}))
            await self._notify()
            return
        previous = session.conn
        session.conn = conn
        conn.session = session
        if previous is not None and previous is not conn and not previous.ws.closed:
            await previous.ws.close(code=4000)
        after = int(data.get("seq") or 0)
        if session.replay_from is not None:
            after = min(after, session.replay_from - 1)
            session.replay_from = None
        for frame in list(session.events):
            if frame["s"] > after and frame["t"] not in ("READY", "RESUMED"):
                await conn.ws.send_str(json.dumps(frame))
        await self.dispatch(session, "RESUMED", {})
        await self._notify()
