"""The Discord adapter: one discord.py client per configured bot, in the daemon's event loop.

discord.py keeps its REST base (`discord.http.Route.BASE`) and gateway URL
(`DiscordWebSocket.DEFAULT_GATEWAY`) in class attributes, i.e. per process, while every bot here
has its own `api_base_url` and `gateway_url`. `_BotHTTPClient` makes both per client without
touching the globals: it rewrites each request's URL from the library's base to the bot's, and
each gateway connection to the library's default gateway to the bot's gateway. URLs the gateway
hands out itself (the `resume_gateway_url` of READY) are used as given, as Discord requires.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import discord
import structlog
import yarl
from discord.gateway import DiscordWebSocket, KeepAliveHandler, ReconnectWebSocket
from discord.http import HTTPClient, Route
from discord.webhook.async_ import AsyncWebhookAdapter, async_context

from adapters.discord import components, convert
from adapters.discord.outbound import DiscordEditor
from adapters.discord.rich import DEFAULT_FILE_BYTES, DiscordReplyStream, reply_stream
from chatgateway.adapter import AdapterState, AdapterStatus
from chatgateway.config import DiscordBotConfig
from chatgateway.errors import (
    AdapterAuthError,
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    UnavailableError,
)
from chatgateway.fetch import agent_host
from chatgateway.models import NormalizedMessage, Platform, SessionKey, TenantId
from chatgateway.outbound import Address, EditedStream, Outbound
from chatgateway.pipeline import Pipeline, Reservation

log = structlog.get_logger("chatgateway.discord")

# The gateway never uses voice; without this every first client logs that PyNaCl is missing.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False

#: Close codes after which reconnecting cannot help: the adapter is parked, not retried.
PARK_REASONS = {
    4004: "Discord rejected the bot token (gateway close code 4004 'authentication failed'): "
    "check the token in the config (Developer Portal > your application > Bot > Reset Token)",
    4010: "Discord rejected the shard settings (close code 4010)",
    4011: "Discord requires sharding for this bot (close code 4011); more than 2,500 servers "
    "are not supported by this gateway",
    4012: "Discord rejected the gateway API version (close code 4012)",
    4013: "Discord rejected the requested intents as invalid (close code 4013)",
    4014: "Discord refused a privileged intent (close code 4014): enable 'Message Content "
    "Intent' for this bot (Developer Portal > your application > Bot > Privileged Gateway "
    "Intents) or set message_content_intent: false for it in the config",
}
#: How long `stop` lets replies that are being sent finish before cancelling them.
STOP_GRACE = 8.0
#: How often the typing indicator is renewed while the agent works (Discord shows it for 10 s).
TYPING_EVERY = 8.0
#: How long the first words wait for the first typing call to complete, so typing precedes
#: them.
TYPING_FIRST_WAIT = 2.0
BUSY_TEXT = "I'm handling too many messages right now. Please try again in a moment."
#: How long acknowledging a click may take (Discord wants the answer within 3 s).
ACK_TIMEOUT = 2.5
#: Turns of a session searched for the answer whose button was clicked (long values).
CLICK_HISTORY_TURNS = 50
RESTARTING_TEXT = "I'm restarting and couldn't take that message. Please send it again in a minute."

#: When each bot (by token hash) last sent IDENTIFY, across adapter restarts in this process.
_last_identify: dict[str, float] = {}


def intents_for(settings: DiscordBotConfig) -> discord.Intents:
    """Exactly the intents the adapter needs: guilds, guild and DM messages, maybe content."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = settings.message_content_intent
    return intents


class _BotHTTPClient(HTTPClient):
    """discord.py's HTTP client, pointed at one bot's own REST base and gateway."""

    def __init__(self, *args: Any, api_base_url: str, gateway_url: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.api_base_url = api_base_url.rstrip("/")
        self.gateway_url = yarl.URL(gateway_url)
        self.last_socket: aiohttp.ClientWebSocketResponse | None = None
        #: Set when the adapter stops: the gateway may not be connected again.
        self.fenced = False

    async def request(self, route: Route, **kwargs: Any) -> Any:
        base = Route.BASE
        if route.url.startswith(base) and not getattr(route, "_rebased", False):
            route.url = self.api_base_url + route.url[len(base) :]
            route._rebased = True  # type: ignore[attr-defined]
        return await super().request(route, **kwargs)

    async def ws_connect(self, url: str, *, compress: int = 0) -> aiohttp.ClientWebSocketResponse:
        target = yarl.URL(url)
        if _same_endpoint(target, DiscordWebSocket.DEFAULT_GATEWAY):
            target = self.gateway_url.with_query(target.query)
        if self.fenced:
            raise ConnectionError("the adapter is stopping: no new gateway connection")
        self.last_socket = await super().ws_connect(str(target), compress=compress)
        return self.last_socket


class _BotWebhookAdapter(AsyncWebhookAdapter):
    """discord.py's webhook adapter, pointed at one bot's REST base: interaction responses
    (a click's acknowledgement, the edit of its message) go through it, not through the bot's
    HTTP client, so `_BotHTTPClient` never sees their discord.com URLs."""

    def __init__(self, api_base_url: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.api_base_url = api_base_url.rstrip("/")

    async def request(self, route: Route, *args: Any, **kwargs: Any) -> Any:
        base = Route.BASE
        if route.url.startswith(base) and not getattr(route, "_rebased", False):
            route.url = self.api_base_url + route.url[len(base) :]
            route._rebased = True  # type: ignore[attr-defined]
        return await super().request(route, *args, **kwargs)


@dataclass(slots=True)
class _ResumePoint:
    """What discord.py's reconnect reads from `client.ws` to RESUME a session."""

    session_id: str
    sequence: int
    gateway: yarl.URL


def resume_point(data: dict[str, Any] | None) -> _ResumePoint | None:
    """The gateway session a previous owner of the bot saved with its lease, if usable."""
    if not data:
        return None
    session_id, seq, url = data.get("session_id"), data.get("seq"), data.get("resume_url")
    if not isinstance(session_id, str) or not isinstance(seq, int) or not isinstance(url, str):
        return None
    return _ResumePoint(session_id, seq, yarl.URL(url))


def _same_endpoint(a: yarl.URL, b: yarl.URL) -> bool:
    return (a.scheme, a.host, a.port, a.path.rstrip("/")) == (
        b.scheme,
        b.host,
        b.port,
        b.path.rstrip("/"),
    )


class _BotClient(discord.Client):
    """A discord.Client that reports to its adapter instead of calling on_* handlers."""

    def __init__(self, adapter: DiscordAdapter, settings: DiscordBotConfig) -> None:
        super().__init__(
            intents=intents_for(settings),
            max_messages=None,
            chunk_guilds_at_startup=False,
            member_cache_flags=discord.MemberCacheFlags.none(),
        )
        self._adapter = adapter
        self._bot_http = _BotHTTPClient(
            self.loop,
            api_base_url=settings.api_base_url,
            gateway_url=settings.gateway_url,
        )
        self.http = self._bot_http
        self._connection.http = self.http

    def dispatch(self, event: str, /, *args: Any, **kwargs: Any) -> None:
        adapter = self._adapter
        if event == "socket_event_type":
            adapter.status.event_seen()
        elif event == "message":
            adapter.message_received(args[0])
        elif event == "interaction":
            adapter.interaction_received(args[0])
        elif event == "connect":
            adapter.gateway_state("ready")
        elif event == "resumed":
            adapter.gateway_state("resumed")
        elif event == "disconnect":
            adapter.gateway_state("disconnected")
        super().dispatch(event, *args, **kwargs)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        # discord.py sleeps 5 s before every non-first IDENTIFY. Discord allows one IDENTIFY
        # per 5 s per bot, so wait only for what is left of the bot's interval since its last
        # IDENTIFY (also one from an earlier run of this adapter): a re-IDENTIFY long after the
        # last one goes at once, two in quick succession stay rate-limited.
        point = self._adapter.take_resume_point()
        if point is not None:
            # The bot's previous owner (another instance) died or handed it over: RESUME its
            # session instead, so Discord replays what that owner had not finished. discord.py
            # has no parameter for a first RESUME; its reconnect path reads the session from
            # `self.ws` when ReconnectWebSocket is raised, and falls back to IDENTIFY if the
            # session is no longer valid.
            socket = self._bot_http.last_socket
            if socket is not None:
                # That socket's DiscordWebSocket started its heartbeat thread on HELLO and is
                # dropped here: stop the thread, or it outlives the socket (up to a heartbeat).
                for thread in threading.enumerate():
                    if isinstance(thread, KeepAliveHandler) and thread.ws.socket is socket:
                        thread.stop()
                await socket.close()
            self.ws = cast(DiscordWebSocket, point)
            raise ReconnectWebSocket(shard_id, resume=True)
        await self._adapter.wait_identify_slot()


class DiscordAdapter:
    """One Discord bot of one tenant: connects, answers, reports its status."""

    def __init__(
        self, tenant_id: TenantId, settings: DiscordBotConfig, pipeline: Pipeline
    ) -> None:
        self.tenant_id = tenant_id
        self.settings = settings
        self.pipeline = pipeline
        self.status = AdapterStatus(tenant_id, Platform.DISCORD, settings.name)
        self._token = settings.token.get_secret_value().strip().removeprefix("Bot ").strip()
        self._token_key = hashlib.sha256(self._token.encode()).hexdigest()
        self._channels = frozenset(settings.channels)
        self._client: _BotClient | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._handling: set[int] = set()
        # Gateway sequence number of each message being answered (for the hand-over point).
        self._seqs: dict[int, int] = {}
        #: Gateway session and sequence number of the first message (or click) left unanswered
        #: because it came while stopping: the saved resume point stays before it.
        self._left: tuple[str, int] | None = None
        self._resume_point: _ResumePoint | None = None
        self._save: Callable[[dict[str, Any], bool], None] | None = None
        self._warned_no_content = False
        self._webhook = _BotWebhookAdapter(settings.api_base_url)
        self._log = log.bind(tenant_id=tenant_id, platform="discord", adapter=settings.name)

    # Lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Log in and serve until `stop`; AdapterAuthError when Discord refuses the bot."""
        if self._stopping:
            return
        self.status.state = AdapterState.CONNECTING
        client = _BotClient(self, self.settings)
        self._client = client
        try:
            try:
                await client.login(self._token)
                if self._stopping:
                    return
                user = client.user
                self._log.info("discord_logged_in", bot_user_id=str(user.id) if user else None)
                await client.connect(reconnect=True)
            except discord.LoginFailure:
                raise self._park(4004, "login") from None
            except discord.PrivilegedIntentsRequired:
                raise self._park(4014, "gateway") from None
            except discord.ConnectionClosed as exc:
                if exc.code in PARK_REASONS:
                    raise self._park(exc.code, "gateway") from None
                raise
            except Exception:
                if self._stopping:
                    return
                raise
            if not self._stopping:
                raise ConnectionError("the Discord client stopped on its own")
        finally:
            await self._close_client(client)

    def _park(self, code: int, where: str) -> AdapterAuthError:
        reason = PARK_REASONS[code]
        if where == "login" and code == 4004:
            reason = (
                "Discord rejected the bot token (HTTP 401 on login): check the token in the config "
                "(Developer Portal > your application > Bot > Reset Token)"
            )
        self.status.last_error = reason
        self._log.error("discord_bot_refused", code=code, reason=reason)
        return AdapterAuthError(reason)

    async def _close_client(self, client: _BotClient) -> None:
        try:
            await client.close()
        except Exception as exc:
            self._log.warning("discord_close_failed", error=f"{type(exc).__name__}: {exc}")

    async def stop(self) -> None:
        """Stop taking messages, let replies being sent finish briefly, close the client."""
        self._stopping = True
        client = self._client
        if client is not None and self._tasks:
            # Leave the gateway first (4000: the session stays resumable), so the bot's next
            # owner can take it over while replies still go out over REST; discord.py would
            # reconnect at once, so new connections are refused from here on.
            client._bot_http.fenced = True
            ws = client.ws
            if isinstance(ws, DiscordWebSocket) and ws.open:
                try:
                    await ws.close(4000)
                except Exception as exc:
                    self._log.debug("discord_gateway_close_failed", error=type(exc).__name__)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._client is not None:
            await self._close_client(self._client)

    def alive(self) -> bool:
        """False only when a client that should be connected is closed."""
        client = self._client
        if client is None or self._stopping or self.status.state != AdapterState.CONNECTED:
            return True
        return not client.is_closed()

    # Hand-over between instances ---------------------------------------------------------

    def hand_over(
        self, data: dict[str, Any] | None, save: Callable[[dict[str, Any], bool], None]
    ) -> None:
        """Resume the previous owner's gateway session from `data`; keep ours with `save`."""
        self._resume_point = resume_point(data)
        self._save = save

    def take_resume_point(self) -> _ResumePoint | None:
        """The previous owner's session, once: a later IDENTIFY starts a new session."""
        point, self._resume_point = self._resume_point, None
        if point is not None:
            self._log.info("discord_resuming_handed_over_session", seq=point.sequence)
        return point

    def _leave_for_next_owner(self, client: _BotClient, event_id: int) -> None:
        """A message (or click) came while stopping: it is not answered here, and the resume
        point saved for the next owner stays before it, so that owner's RESUME replays it
        (discord.py has already counted it in `ws.sequence`)."""
        ws = client.ws
        if self._save is None or not isinstance(ws, DiscordWebSocket):
            return
        if ws.session_id is None or ws.sequence is None:
            return
        if self._left is None or self._left[0] != ws.session_id or ws.sequence < self._left[1]:
            self._left = (ws.session_id, ws.sequence)
        self._log.info("discord_left_for_next_owner", event_id=str(event_id), seq=ws.sequence)
        self._checkpoint(now=True)

    def _checkpoint(self, now: bool = False) -> None:
        """Save where a next owner would resume: before the oldest message not yet answered."""
        client = self._client
        ws = client.ws if client is not None else None
        if self._save is None or ws is None or not isinstance(ws, DiscordWebSocket):
            return
        if ws.session_id is None or ws.sequence is None:
            return
        seq = min(self._seqs.values()) - 1 if self._seqs else ws.sequence
        if self._left is not None and self._left[0] == ws.session_id:
            seq = min(seq, self._left[1] - 1)
        self._save(
            {"session_id": ws.session_id, "seq": seq, "resume_url": str(ws.gateway)}, now
        )

    # Gateway state ---------------------------------------------------------------------------

    def gateway_state(self, what: str) -> None:
        status = self.status
        if what in ("ready", "resumed"):
            if status.state == AdapterState.CONNECTING and status.connected_at is not None:
                status.reconnects += 1
            status.state = AdapterState.CONNECTED
            status.connected_at = time.time()
            status.last_error = None
            client = self._client
            user_id = str(client.user.id) if client is not None and client.user else None
            self._log.info(f"discord_{what}", bot_user_id=user_id)
            self._checkpoint(now=True)
        elif what == "disconnected" and status.state == AdapterState.CONNECTED:
            status.state = AdapterState.CONNECTING
            if not self._stopping:
                self._log.info("discord_disconnected")

    async def wait_identify_slot(self) -> None:
        """Wait until `identify_interval` has passed since this bot's last IDENTIFY."""
        now = time.monotonic()
        last = _last_identify.get(self._token_key)
        slot = now if last is None else max(now, last + self.settings.identify_interval)
        _last_identify[self._token_key] = slot  # claimed before sleeping
        if slot > now:
            self._log.info("discord_identify_wait", seconds=round(slot - now, 2))
            await asyncio.sleep(slot - now)

    # Messages ------------------------------------------------------------------------------

    def message_received(self, message: discord.Message) -> None:
        """Called by the client for every MESSAGE_CREATE; must not block."""
        client = self._client
        if client is None or client.user is None:
            return
        bot_id = client.user.id
        role_ids = self._bot_role_ids(message)
        via = convert.route(message, bot_id, self._channels, role_ids)
        if via is None:
            return
        if message.id in self._handling:
            # A replay of a message we are still answering (RESUME during the agent call).
            self._log.info("message_duplicate", message_id=str(message.id))
            return
        normalized = convert.to_normalized(
            message,
            self.tenant_id,
            bot_id=bot_id,
            via=via,
            bot_name=self.settings.name,
            bot_role_ids=role_ids,
        )
        if not normalized.text and not normalized.attachments:
            if via == "channel" and not self.settings.message_content_intent:
                self._warn_no_content()
            return
        if self._stopping:
            self._leave_for_next_owner(client, message.id)
            return
        self._handling.add(message.id)
        if self._save is not None and isinstance(client.ws, DiscordWebSocket):
            # ws.sequence is this MESSAGE_CREATE's: discord.py sets it before dispatching.
            self._seqs[message.id] = client.ws.sequence or 0
            self._checkpoint()
        # Counted as in flight from now on, so a shutdown beginning before it reaches the
        # pipeline still answers it (Discord never delivers it again). None once shutting down.
        reservation = self.pipeline.reserve()
        task = asyncio.create_task(
            self._answer(message, normalized, reservation),
            name=f"discord:{self.tenant_id}:{self.settings.name}:message:{message.id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if reservation is not None:
            # Also when the task is cancelled before it ran.
            task.add_done_callback(lambda _: reservation.release())

    def _bot_role_ids(self, message: discord.Message) -> tuple[int, ...]:
        guild = message.guild
        role = guild.self_role if guild is not None else None
        return (role.id,) if role is not None else ()

    def _warn_no_content(self) -> None:
        if self._warned_no_content:
            return
        self._warned_no_content = True
        self._log.warning(
            "discord_message_content_missing",
            hint="messages in configured channels arrive without text unless the bot has the "
            "Message Content intent; set message_content_intent: true and enable it in the "
            "Developer Portal, or mention the bot",
        )

    # Clicks --------------------------------------------------------------------------------

    def interaction_received(self, interaction: discord.Interaction[Any]) -> None:
        """Called by the client for every INTERACTION_CREATE; must not block. A click on one
        of the gateway's buttons is acknowledged at once, then goes through the pipeline as a
        message of the session whose answer carried the buttons (adapters/discord/components)."""
        client = self._client
        if client is None or client.user is None:
            return
        click = components.click_of(interaction)
        if click is None:
            return  # not a click on our buttons (no slash commands are registered)
        key = interaction.id
        if key in self._handling:
            self._log.info("message_duplicate", message_id=click.interaction_id)
            return
        if self._stopping:
            self._leave_for_next_owner(client, key)
            return
        self._handling.add(key)
        if self._save is not None and isinstance(client.ws, DiscordWebSocket):
            self._seqs[key] = client.ws.sequence or 0
            self._checkpoint()
        reservation = self.pipeline.reserve()
        task = asyncio.create_task(
            self._answer_click(interaction, click, reservation),
            name=f"discord:{self.tenant_id}:{self.settings.name}:click:{key}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if reservation is not None:
            task.add_done_callback(lambda _: reservation.release())

    async def _answer_click(
        self,
        interaction: discord.Interaction[Any],
        click: components.Click,
        reservation: Reservation | None,
    ) -> None:
        bound = self._log.bind(interaction_id=click.interaction_id, channel_id=click.channel_id)
        handed = False
        try:
            # discord.py sends interaction responses through its webhook adapter, which knows
            # only discord.com: this bot's own one, for this task only (a context variable).
            async_context.set(self._webhook)
            acknowledged = await self._acknowledge(interaction, bound)
            if not click.allowed():
                # Someone else's answer: only the user it was for chooses.
                bound.info("discord_click_refused", reason="not_the_answers_user")
                return
            chosen = await self._chosen(click)
            if chosen is None:
                bound.warning("discord_click_expired", reason="the answer is no longer stored")
                return
            value, label = chosen
            if acknowledged and click.rows:
                await self._show_choice(interaction, click, bound)
            normalized = components.to_normalized(
                click, value, self.tenant_id, bot_name=self.settings.name, label=label
            )
            target: dict[str, Any] = {
                "channel_id": click.channel_id,
                # The answer replies to the message with the buttons; its nonces are the
                # click's own.
                "message_id": click.message_id,
                "nonce_key": click.interaction_id,
                "user_id": click.user_id,
            }
            if click.guild_id is not None:
                target["guild_id"] = click.guild_id
            made = self._address_stream(Address(Platform.DISCORD, self.settings.name, target))
            if made is None:
                return
            client = self._client
            assert client is not None
            channel = client.get_partial_messageable(
                int(click.channel_id),
                guild_id=int(click.guild_id) if click.guild_id is not None else None,
            )
            address = made[0].address

            def make_stream(
                log: Any, before_first: Callable[[], Awaitable[None]]
            ) -> tuple[EditedStream, DiscordEditor]:
                stream = self._address_stream(address, before_first)
                assert stream is not None
                return stream

            handed = True
            await self._deliver(interaction.id, channel, normalized, reservation, make_stream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            bound.error("discord_click_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            if not handed:
                if reservation is not None:
                    reservation.release()
                self._handling.discard(interaction.id)
                if self._seqs.pop(interaction.id, None) is not None:
                    self._checkpoint()

    async def _acknowledge(self, interaction: discord.Interaction[Any], bound: Any) -> bool:
        """Answer the click at once with a deferred update (type 6): Discord wants an answer
        within 3 s, and this one changes nothing the user sees."""
        try:
            async with asyncio.timeout(ACK_TIMEOUT):
                await interaction.response.defer()
            return True
        except (discord.DiscordException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            # A replayed click (already acknowledged) or an expired one: it still goes on,
            # and the pipeline's dedup drops a replay.
            bound.warning("discord_click_ack_failed", error=f"{type(exc).__name__}: {exc}")
            return False

    async def _chosen(self, click: components.Click) -> tuple[str, str | None] | None:
        """The value (and label) of the button clicked: carried by its custom_id, or for a long
        value looked up in the session's stored answer by its digest."""
        if click.ref.value is not None:
            return click.ref.value, click.label
        key = SessionKey.of(
            components.to_normalized(click, "", self.tenant_id, bot_name=self.settings.name)
        )
        store = self.pipeline.store
        session = await store.find_active_session(key, idle_since=0.0)
        if session is None:
            return None
        history = await store.history(self.tenant_id, session.id, CLICK_HISTORY_TURNS)
        action = components.value_of(click.ref, history)
        return (action.value, action.label) if action is not None else None

    async def _show_choice(
        self, interaction: discord.Interaction[Any], click: components.Click, bound: Any
    ) -> None:
        """Disable the message's buttons, marking the one chosen (with the click's token)."""
        rows = components.chosen_rows(click.rows, click.custom_id)
        try:
            await interaction.edit_original_response(view=components.view(rows))
        except (discord.DiscordException, aiohttp.ClientError, OSError) as exc:
            bound.warning("discord_click_show_failed", error=f"{type(exc).__name__}: {exc}")

    async def _answer(
        self,
        message: discord.Message,
        normalized: NormalizedMessage,
        reservation: Reservation | None,
    ) -> None:
        await self._deliver(
            message.id,
            message.channel,
            normalized,
            reservation,
            lambda bound, before_first: self._reply_stream(message, bound, before_first),
        )

    async def _deliver(
        self,
        key: int,
        channel: discord.abc.Messageable,
        normalized: NormalizedMessage,
        reservation: Reservation | None,
        make_stream: Callable[
            [Any, Callable[[], Awaitable[None]]], tuple[EditedStream, DiscordEditor]
        ],
    ) -> None:
        """Take a message (or a click) through the pipeline, its answer into `channel`.
        `key` is its id in `_handling`/`_seqs` (the message's, the interaction's)."""
        bound = self._log.bind(
            message_id=normalized.message_id, channel_id=str(getattr(channel, "id", ""))
        )
        typing: asyncio.Task[None] | None = None
        first_typing = asyncio.Event()

        async def stop_typing() -> None:
            # Called just before the first words are posted: the indicator is always seen
            # before the answer it announces, and ends when the answer begins.
            if typing is None:
                return
            try:
                async with asyncio.timeout(TYPING_FIRST_WAIT):
                    await first_typing.wait()
            except TimeoutError:
                pass
            typing.cancel()

        stream, editor = make_stream(bound, stop_typing)
        try:
            if self.settings.typing_indicator and not await self.pipeline.already_processed(
                normalized
            ):
                typing = asyncio.create_task(
                    self._keep_typing(channel, first_typing),
                    name=f"discord:{self.tenant_id}:{self.settings.name}:typing",
                )
            try:
                # The answer is streamed into Discord as the agent writes it, and finished
                # there once stored.
                if reservation is not None:
                    await reservation.handle(normalized, dedup=True, outbound=stream)
                else:
                    await self.pipeline.handle(normalized, dedup=True, outbound=stream)
                notice = ""
            except OverloadedError:
                bound.warning("message_rejected", reason="overloaded")
                notice = BUSY_TEXT
            except RateLimitedError as exc:
                # One polite notice per user and notice interval, then silence: never a flood.
                bound.info("message_rejected", reason=exc.reason, notice=exc.notice is not None)
                notice = exc.notice or ""
            except UnavailableError:
                bound.warning("message_rejected", reason="shutting_down")
                notice = RESTARTING_TEXT
            except NotFoundError as exc:
                bound.warning("message_rejected", reason="not_found", detail=str(exc))
                return
            if notice:
                await stream.post(notice)
            if editor.posted:
                bound.info("discord_reply_sent", parts=editor.posted, edits=editor.edits)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            bound.error("discord_message_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            if reservation is not None:
                reservation.release()
            if typing is not None:
                typing.cancel()
            self._handling.discard(key)
            if self._seqs.pop(key, None) is not None:
                self._checkpoint()

    async def _keep_typing(self, channel: discord.abc.Messageable, first: asyncio.Event) -> None:
        while True:
            try:
                await channel.typing()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # No permission or a hiccup: the answer matters, the indicator does not.
                self._log.debug("discord_typing_failed", error=f"{type(exc).__name__}: {exc}")
            first.set()
            await asyncio.sleep(TYPING_EVERY)

    # Outbound ------------------------------------------------------------------------------

    def _reply_stream(
        self,
        message: discord.Message,
        bound: Any,
        before_first: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[EditedStream, DiscordEditor]:
        """The outbound for the answer to `message`: a reply in its channel."""
        client = self._client
        assert client is not None and client.user is not None
        editor = DiscordEditor(
            message.channel,
            bot_id=client.user.id,
            nonce_key=str(message.id),
            reference=message.to_reference(fail_if_not_exists=False),
            log=bound,
            stopping=lambda: self._stopping,
            before_first=before_first,
        )
        target: dict[str, Any] = {
            "channel_id": str(message.channel.id),
            "message_id": str(message.id),
            # Whose answer it is: only their clicks on its buttons count.
            "user_id": str(message.author.id),
        }
        if message.guild is not None:
            target["guild_id"] = str(message.guild.id)
        address = Address(Platform.DISCORD, self.settings.name, target)
        return self._rich_stream(editor, address, nonced=True), editor

    def _rich_stream(
        self, editor: DiscordEditor, address: Address, *, nonced: bool
    ) -> DiscordReplyStream:
        """The Outbound for `editor`'s answer, showing files and buttons (adapters/discord/
        rich.py): buttons for `address.target["user_id"]`, files up to the server's limit."""
        client = self._client
        guild_id = address.target.get("guild_id")
        guild = client.get_guild(int(guild_id)) if client is not None and guild_id else None
        owner = address.target.get("user_id")
        return reply_stream(
            editor,
            address,
            nonced=nonced,
            owner=str(owner) if owner else None,
            trusted_hosts=self._trusted_hosts,
            file_limit=guild.filesize_limit if guild is not None else DEFAULT_FILE_BYTES,
        )

    def _trusted_hosts(self) -> list[str]:
        """Hosts whose files may be fetched though private: the tenant's agent's."""
        tenant = self.pipeline.tenants.get(self.tenant_id)
        host = agent_host(tenant.config.agent.url) if tenant is not None else None
        return [host] if host else []

    def outbound(self, address: Address) -> Outbound | None:
        """An Outbound for an answer that arrives later (OutboundFactory), or None when this
        instance does not run the bot now (standby, stopping) or the address is not its own.

        `address.target`: `channel_id`; `message_id`, the message answered (the first part is
        a reply to it, and it names the parts' nonces); optionally `guild_id`, and `nonce_key`
        to name the nonces instead of `message_id` (an answer that must not be taken for an
        earlier post to the same message), and `user_id`, the user it answers (whose clicks on
        its buttons count)."""
        made = self._address_stream(address)
        return made[0] if made is not None else None

    def _address_stream(
        self,
        address: Address,
        before_first: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[DiscordReplyStream, DiscordEditor] | None:
        client = self._client
        if (
            address.platform != Platform.DISCORD
            or address.adapter != self.settings.name
            or self._stopping
            or client is None
            or client.user is None
            or client.is_closed()
        ):
            return None
        target = address.target
        try:
            channel_id = int(target["channel_id"])
            message_id = int(target["message_id"]) if target.get("message_id") else None
            guild_id = int(target["guild_id"]) if target.get("guild_id") else None
        except (KeyError, TypeError, ValueError):
            self._log.warning("discord_address_invalid", target=dict(target))
            return None
        nonce_key = target.get("nonce_key") or (str(message_id) if message_id else None)
        reference = (
            discord.MessageReference(
                message_id=message_id,
                channel_id=channel_id,
                guild_id=guild_id,
                fail_if_not_exists=False,
            )
            if message_id is not None
            else None
        )
        editor = DiscordEditor(
            client.get_partial_messageable(channel_id, guild_id=guild_id),
            bot_id=client.user.id,
            nonce_key=None if nonce_key is None else str(nonce_key),
            reference=reference,
            log=self._log.bind(channel_id=str(channel_id), message_id=target.get("message_id")),
            stopping=lambda: self._stopping,
            before_first=before_first,
        )
        return self._rich_stream(editor, address, nonced=nonce_key is not None), editor
