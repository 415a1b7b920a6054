"""The fake Discord's files and buttons: messages with attachments and components, clicks.

`FakeDiscordRich` is a `FakeDiscord` (tests/fakes/discord.py) that also takes what a bot sends
with files and buttons, and lets a test click a button:

- `POST /channels/{id}/messages` as multipart (`payload_json` plus `files[n]`), or as JSON
  carrying `components` (then `content` may be empty): the message is created with its
  attachments (bytes kept, see `Upload`) and components; nonces work as for text.
- `PATCH /channels/{id}/messages/{mid}` as multipart or with `components`: attachments and
  components are replaced, as Discord does.
- `click(bot, message, custom_id, user=...)` dispatches an INTERACTION_CREATE (component) over
  the bot's gateway session, shaped like Discord's, and returns its `Interaction` record.
- `POST /interactions/{id}/{token}/callback`: the response to a click (type 6, deferred
  update, and the others), recorded with the time since the click was dispatched.
- `PATCH /webhooks/{application_id}/{token}/messages/@original`: edits the message the click
  was on (its content and components), with the interaction's token (valid 15 minutes).

discord.py sends the last two through its webhook adapter, whose base URL is discord.com
whatever `discord.http.Route.BASE` says (see /work/shared/PLATFORMS.md): the gateway's adapter
points them at the bot's `api_base_url` itself.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.fakes.discord import FakeBot, FakeDiscord, Posted, _json, snowflake, user_object

#: Discord's limits: files per message, bytes per file (no boost), bytes per request.
MAX_FILES = 10
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_REQUEST_BYTES = 25 * 1024 * 1024
#: How long an interaction's token is valid.
TOKEN_TTL = 15 * 60
#: The interaction response types (Discord's).
DEFERRED_UPDATE = 6
UPDATE_MESSAGE = 7

_CALLBACK = re.compile(r"^/api/v10/interactions/([0-9]+)/([^/]+)/callback$")
_ORIGINAL = re.compile(r"^/api/v10/webhooks/([0-9]+)/([^/]+)/messages/@original$")


@dataclass
class Upload:
    """A file attached to a message the bot created or edited."""

    filename: str
    content_type: str | None
    data: bytes


@dataclass
class Response:
    """What the bot answered to a click (POST .../callback)."""

    type: int
    data: dict[str, Any] | None
    #: Seconds between the click's dispatch and this response.
    after: float


@dataclass
class Interaction:
    """A click the fake dispatched, and what the bot did with it."""

    id: str
    token: str
    bot: FakeBot
    post: Posted
    custom_id: str
    user: dict[str, Any]
    payload: dict[str, Any]
    dispatched_at: float
    responses: list[Response] = field(default_factory=list)
    #: PATCH .../messages/@original bodies, in order.
    edits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return bool(self.responses)


class FakeDiscordRich(FakeDiscord):
    """A FakeDiscord with attachments, components and clicks (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Every file attached to a message, by message id (the latest attachments win).
        self.uploads: dict[str, list[Upload]] = {}
        self.interactions: dict[str, Interaction] = {}
        #: Guild channels the fake knows as threads: thread id -> parent channel id.
        self.threads: dict[str, str] = {}
        #: Responses to answer with an error status (e.g. 404 Unknown interaction) from now on.
        self.fail_callbacks = 0
        #: Edits that changed attachments or components (any route).
        self.rich_edits = 0

    # Messages with files and buttons -----------------------------------------------------

    async def _read(self, request: web.Request) -> tuple[dict[str, Any], list[Upload]] | None:
        """The payload and files of a multipart request, or None when it is plain JSON."""
        if not request.content_type.startswith("multipart/"):
            return None
        payload: dict[str, Any] = {}
        files: list[Upload] = []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not hasattr(part, "read"):
                continue
            body = await part.read(decode=False)  # type: ignore[union-attr]
            if part.name == "payload_json":  # type: ignore[union-attr]
                payload = json.loads(body)
            elif (part.name or "").startswith("files["):  # type: ignore[union-attr]
                files.append(Upload(
                    part.filename or "file",  # type: ignore[union-attr]
                    part.headers.get("Content-Type"),
                    bytes(body),
                ))
        return payload, files

    def _check_files(self, files: list[Upload]) -> web.Response | None:
        if len(files) > MAX_FILES:
            return _json({"message": "Invalid Form Body (too many files)", "code": 50035}, 400)
        if any(len(f.data) > MAX_FILE_BYTES for f in files) or sum(
            len(f.data) for f in files
        ) > MAX_REQUEST_BYTES:
            return _json({"message": "Request entity too large", "code": 40005}, 413)
        return None

    def _attachments(self, channel_id: str, files: list[Upload]) -> list[dict[str, Any]]:
        return [
            {
                "id": snowflake(),
                "filename": f.filename,
                "size": len(f.data),
                "url": f"http://127.0.0.1:{self.port}/cdn/{channel_id}/{f.filename}",
                "proxy_url": f"http://127.0.0.1:{self.port}/cdn/{channel_id}/{f.filename}",
                "content_type": f.content_type,
            }
            for f in files
        ]

    async def _post_message(self, request: web.Request) -> web.Response:
        read = await self._read(request)
        if read is None:
            if request.content_type == "application/json":
                payload = await request.json()
                if not payload.get("components"):
                    return await super()._post_message(request)  # text only: the base fake
                read = (payload, [])
            else:
                return await super()._post_message(request)
        bot = self._bot_of(request)
        if bot is None:
            return self._unauthorized()
        payload, files = read
        refused = self._check_files(files)
        if refused is not None:
            return refused
        content = str(payload.get("content") or "")
        if (not content and not files and not payload.get("components")) or len(content) > 2000:
            return _json({"message": "Invalid Form Body", "code": 50035}, 400)
        channel_id = request.match_info["channel_id"]

        def keep_files(message: dict[str, Any]) -> None:
            self.uploads[message["id"]] = files

        return await self._create_message(
            request, bot, payload, self._attachments(channel_id, files), keep_files
        )

    async def _edit_message(self, request: web.Request) -> web.Response:
        read = await self._read(request)
        if read is None:
            payload = await request.json() if request.content_type == "application/json" else {}
            response = await super()._edit_message(request)  # the body is read again, cached
            if response.status == 200 and "components" in payload:
                post = self.message_of(request.match_info["message_id"])
                assert post is not None
                post.message["components"] = payload["components"] or []
                self.rich_edits += 1
                await self._notify()
                return _json(post.message)
            return response
        bot = self._bot_of(request)
        if bot is None:
            return self._unauthorized()
        payload, files = read
        post = self.message_of(request.match_info["message_id"])
        if post is None or post.channel_id != request.match_info["channel_id"]:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        if post.token != bot.token:
            return _json({"message": "Cannot edit a message authored by another user",
                          "code": 50005}, 403)
        return await self._apply_edit(post, payload, files)

    async def _apply_edit(
        self, post: Posted, payload: dict[str, Any], files: list[Upload]
    ) -> web.Response:
        refused = self._check_files(files)
        if refused is not None:
            return refused
        if "content" in payload and payload["content"] is not None:
            content = str(payload["content"])
            if len(content) > 2000:
                return _json({"message": "Invalid Form Body", "code": 50035}, 400)
            post.message["content"] = content
        if "components" in payload:
            post.message["components"] = payload["components"] or []
        if "attachments" in payload:
            # The attachments kept are those listed; new files are those uploaded now.
            kept_ids = {str(a.get("id")) for a in payload["attachments"]}
            kept = [a for a in post.message.get("attachments", []) if a["id"] in kept_ids]
            post.message["attachments"] = kept + self._attachments(post.channel_id, files)
            old = self.uploads.get(post.message["id"], [])
            names = {a["filename"] for a in kept}
            self.uploads[post.message["id"]] = [u for u in old if u.filename in names] + files
        post.message["edited_timestamp"] = datetime.now(UTC).isoformat()
        if "components" in payload or "attachments" in payload:
            self.rich_edits += 1
        await self._notify()
        return _json(post.message)

    def files_of(self, post: Posted) -> list[Upload]:
        """The files a message carries now."""
        return self.uploads.get(post.message["id"], [])

    @staticmethod
    def components_of(post: Posted) -> list[dict[str, Any]]:
        return list(post.message.get("components") or [])

    @classmethod
    def buttons_of(cls, post: Posted) -> list[dict[str, Any]]:
        """The buttons a message shows now, in order."""
        return [c for row in cls.components_of(post) for c in row.get("components", [])
                if c.get("type") == 2]

    # Clicks ----------------------------------------------------------------------------------

    async def click(
        self,
        bot: FakeBot,
        post: Posted,
        custom_id: str,
        *,
        user: dict[str, Any] | None = None,
        guild_id: str | None = None,
    ) -> Interaction:
        """A user clicks the button `custom_id` of the bot's message `post`: INTERACTION_CREATE
        goes to the bot's gateway session, as Discord sends it."""
        assert any(b.get("custom_id") == custom_id for b in self.buttons_of(post)), (
            "Discord delivers clicks only on components the message has"
        )
        user = user or user_object("1001", "alice")
        channel_id = post.channel_id
        parent = self.threads.get(channel_id)
        if guild_id is None:
            channel: dict[str, Any] = {"id": channel_id, "type": 1, "recipients": [user]}
        elif parent is not None:
            channel = {
                "id": channel_id, "type": 11, "guild_id": guild_id, "parent_id": parent,
                "name": "a thread", "owner_id": user["id"], "message_count": 1,
                "member_count": 1, "rate_limit_per_user": 0, "flags": 0,
                "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                    "archive_timestamp": datetime.now(UTC).isoformat(),
                                    "locked": False},
            }
        else:
            channel = {"id": channel_id, "type": 0, "guild_id": guild_id, "name": "general",
                       "position": 0, "permission_overwrites": [], "nsfw": False,
                       "parent_id": None, "rate_limit_per_user": 0, "flags": 0}
        interaction_id = snowflake()
        token = f"itok.{secrets.token_urlsafe(24)}"
        payload: dict[str, Any] = {
            "id": interaction_id,
            "application_id": bot.application_id,
            "type": 3,
            "token": token,
            "version": 1,
            "attachment_size_limit": MAX_FILE_BYTES,
            "app_permissions": "0",
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {},
            "context": 0 if guild_id is not None else 1,
            "data": {"custom_id": custom_id, "component_type": 2},
            "channel_id": channel_id,
            "channel": channel,
            "message": dict(post.message),
        }
        if guild_id is not None:
            payload["guild_id"] = guild_id
            payload["guild"] = {"id": guild_id, "locale": "en-US", "features": []}
            payload["member"] = {
                "user": user, "roles": [], "joined_at": datetime.now(UTC).isoformat(),
                "deaf": False, "mute": False, "flags": 0, "permissions": "0", "nick": None,
            }
        else:
            payload["user"] = user
        interaction = Interaction(
            interaction_id, token, bot, post, custom_id, user, payload, time.monotonic()
        )
        self.interactions[token] = interaction
        await self.dispatch(self.current_session(bot), "INTERACTION_CREATE", payload)
        return interaction

    async def wait_acknowledged(self, interaction: Interaction, within: float = 10.0) -> Response:
        await self.wait_for(lambda: interaction.acknowledged, within)
        return interaction.responses[0]

    async def _not_found(self, request: web.Request) -> web.Response:
        # The interaction routes live here: the base fake's catch-all comes before any route
        # a subclass could add.
        if request.method == "POST" and (match := _CALLBACK.match(request.path)):
            return await self._callback(request, match.group(1), match.group(2))
        if request.method == "PATCH" and (match := _ORIGINAL.match(request.path)):
            return await self._edit_original(request, match.group(1), match.group(2))
        return await super()._not_found(request)

    def _interaction(self, token: str) -> Interaction | None:
        interaction = self.interactions.get(token)
        if interaction is None or time.monotonic() - interaction.dispatched_at > TOKEN_TTL:
            return None
        return interaction

    async def _callback(self, request: web.Request, interaction_id: str, token: str) -> web.Response:
        self.rest_calls.append((request.method, request.path, None))
        interaction = self._interaction(token)
        if interaction is None or interaction.id != interaction_id:
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        if self.fail_callbacks > 0:
            self.fail_callbacks -= 1
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        if interaction.responses:
            return _json({"message": "Interaction has already been acknowledged.",
                          "code": 40060}, 400)
        read = await self._read(request)
        body = read[0] if read is not None else await request.json()
        kind = int(body.get("type", 0))
        data = body.get("data")
        interaction.responses.append(
            Response(kind, data, time.monotonic() - interaction.dispatched_at)
        )
        if kind == UPDATE_MESSAGE and isinstance(data, dict):
            await self._apply_edit(interaction.post, data, read[1] if read else [])
        await self._notify()
        return _json({
            "interaction": {"id": interaction.id, "type": 3,
                            "response_message_loading": False,
                            "response_message_ephemeral": False},
            "resource": {"type": kind},
        })

    async def _edit_original(self, request: web.Request, application_id: str,
                             token: str) -> web.Response:
        self.rest_calls.append((request.method, request.path, None))
        interaction = self._interaction(token)
        if interaction is None or interaction.bot.application_id != application_id:
            return _json({"message": "Unknown Webhook", "code": 10015}, 404)
        if not interaction.responses:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        read = await self._read(request)
        payload, files = read if read is not None else (await request.json(), [])
        interaction.edits.append(payload)
        return await self._apply_edit(interaction.post, payload, files)
