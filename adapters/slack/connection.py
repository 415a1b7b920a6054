"""One Slack app's connection: Socket Mode with slack-bolt, authentication, the watchdog and
the lifecycle (run, stop, alive) of the adapter.

The ack path does nothing slow: the listeners run before the ack and only hand the payload to
`_on_event` / `_on_command` (the conversation code in conversation.py), which start a task.
A watchdog in `run` replaces a socket that went silent or whose client wedged
(python-slack-sdk #1913/#1922).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import structlog
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.adapter.socket_mode.async_internals import send_async_response
from slack_bolt.adapter.socket_mode.internals import build_headers
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.blocks import ACTION_ID_PATTERN
from adapters.slack.convert import BotIdentity
from adapters.slack.outbound import error_code
from chatgateway.adapter import AdapterState, AdapterStatus
from chatgateway.config import SlackAppConfig
from chatgateway.errors import AdapterAuthError, AdapterNotReadyError
from chatgateway.models import Platform, TenantId
from chatgateway.pipeline import Pipeline, Reservation

log = structlog.get_logger("chatgateway.slack")
_sdk_logger = logging.getLogger("slack_sdk.socket_mode")

#: Slack error codes meaning the token itself is refused: park the adapter, do not retry.
AUTH_ERRORS = frozenset(
    {
        "invalid_auth",
        "not_authed",
        "account_inactive",
        "token_revoked",
        "token_expired",
        "not_allowed_token_type",
        "invalid_token",
        "org_login_required",
        "ekm_access_denied",
        "team_access_not_granted",
    }
)
#: How long opening the socket may take before the attempt counts as failed.
CONNECT_TIMEOUT = 30.0
#: How long stop() waits for replies still being posted (the supervisor allows 10 s).
STOP_GRACE = 7.0
#: How long closing a dead handler may take (a silent socket's close handshake never ends).
CLOSE_TIMEOUT = 5.0
#: Where an envelope's pipeline reservation waits for its listener (bolt's context).
RESERVATION = "chatgateway_reservation"

#: Reply tasks of adapters that were restarted while an agent was still working: they finish
#: in the background (a config reload must not lose an acked message).
_DETACHED: set[asyncio.Task[None]] = set()


class _SocketHandler(AsyncSocketModeHandler):
    """bolt's handler, plus: every envelope counts as a sign of life, and envelopes no listener
    matched are acked anyway (bolt leaves them unacked, and Slack would redeliver them).

    While shutting down, envelopes are left unacked instead of accepting work that would be
    dropped: Slack then redelivers them (to this gateway after its restart). An envelope that
    is acked holds a pipeline reservation from before the ack, so the drain waits for it and
    it is answered even if shutdown begins before it reaches the pipeline (Slack never
    redelivers an acked envelope). A listener that starts work takes the reservation out of
    bolt's context; otherwise it is released here.
    """

    def __init__(
        self,
        on_envelope: Callable[[], None],
        reserve: Callable[[], Reservation | None],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._on_envelope = on_envelope
        self._reserve = reserve

    async def handle(self, client: SocketModeClient, req: SocketModeRequest) -> None:  # type: ignore[override]
        started = time.time()
        self._on_envelope()
        reservation = self._reserve()
        if reservation is None:
            return  # left unacked: Slack redelivers it to the next connection or process
        bolt_req = AsyncBoltRequest(
            mode="socket_mode",
            body=req.payload,
            headers=build_headers(req),
            context={RESERVATION: reservation},
        )
        try:
            # Listeners run inside dispatch (process_before_response): they only start a task.
            response: BoltResponse = await self.app.async_dispatch(bolt_req)
        finally:
            left = bolt_req.context.pop(RESERVATION, None)
            if left is not None:
                left.release()
        if response.status != 200:
            # No listener matched (404) or bolt failed on the payload (500): retrying the same
            # envelope cannot help, so ack it like every other.
            response = BoltResponse(status=200, body="")
        await send_async_response(client, req, response, started)



class SlackConnection:
    """A tenant's Slack app connected over Socket Mode; the conversation code (a subclass)
    provides `_on_event` and `_on_command`."""

    def __init__(self, tenant_id: str, settings: SlackAppConfig, pipeline: Pipeline) -> None:
        self.tenant_id = TenantId(tenant_id)
        self.settings = settings
        self.status = AdapterStatus(self.tenant_id, Platform.SLACK, settings.name)
        self._pipeline = pipeline
        self._log = log.bind(tenant_id=tenant_id, platform="slack", adapter=settings.name)
        base = settings.api_base_url
        self._base_url = base if base.endswith("/") else base + "/"
        self._ping = settings.ping_interval
        self._stopping = False
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._web: AsyncWebClient | None = None
        self._indicator_web: AsyncWebClient | None = None
        self._app_client: AsyncWebClient | None = None
        self._identity: BotIdentity | None = None
        self._auth: AuthorizeResult | None = None
        self._app: AsyncApp | None = None
        self._handler: _SocketHandler | None = None
        self._closing: set[asyncio.Task[None]] = set()
        #: Messages being processed, with their phase ("agent" or "reply").
        self._tasks: dict[asyncio.Task[None], str] = {}
        self._last_life = 0.0
        self._unhealthy_since: float | None = None
        #: Set when Slack refuses a token mid-run (or the app is uninstalled): run() parks.
        self._refusal: str | None = None

    # Lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect and serve until stop(); AdapterAuthError if Slack refuses a token."""
        if self._stopping:
            return
        self.status.state = AdapterState.CONNECTING
        self._ensure_clients()
        try:
            await self._authenticate()
            if self._app is None:
                self._app = self._build_app()
            while not self._stopping:
                await self._open_socket()
                reason = await self._watch()
                if self._refusal is not None:
                    raise AdapterAuthError(self._refusal)
                if reason is None:
                    return
                self.status.reconnects += 1
                self.status.last_error = f"socket replaced: {reason}"
                self.status.state = AdapterState.CONNECTING
                self._log.warning("slack_socket_dead", reason=reason, action="recreate")
                self._retire_handler()
        except AdapterAuthError:
            # Parked until a reload replaces this adapter: close its connections meanwhile.
            self._retire_handler()
            self._app = None  # built on the clients closed here
            await self._wait_closing()
            await self._close_when_idle()
            raise
        finally:
            if not self._stopping:
                self._retire_handler()

    async def stop(self) -> None:
        """Stop intake, let replies being posted finish, close connections. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._wake.set()
        try:
            self._retire_handler()
            await self._wait_closing()
            detached = await self._finish_tasks()
            if not detached:
                await self._close_clients()
        finally:
            self.status.state = AdapterState.STOPPED
            self._stopped.set()
            self._log.info("slack_adapter_stopped")

    def alive(self) -> bool:
        """False when the socket is gone, wedged or silent (the supervisor restarts us)."""
        return self.status.state == AdapterState.CONNECTED and self._socket_problem() is None

    # Connecting ----------------------------------------------------------------------------

    def _ensure_clients(self) -> None:
        if self._session is not None and not self._session.closed:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        retries = [
            AsyncConnectionErrorRetryHandler(max_retry_count=2),
            # A 429 is retried after its Retry-After, so a rate-limited reply is only late.
            AsyncRateLimitErrorRetryHandler(max_retry_count=10),
        ]
        self._web = AsyncWebClient(
            token=self.settings.bot_token.get_secret_value(),
            base_url=self._base_url,
            session=self._session,
            retry_handlers=retries,
        )
        self._indicator_web = AsyncWebClient(
            token=self.settings.bot_token.get_secret_value(),
            base_url=self._base_url,
            session=self._session,
            retry_handlers=[AsyncConnectionErrorRetryHandler(max_retry_count=1)],
        )
        # bolt's own client carries no token: `authorize` hands it the bot token per request.
        self._app_client = AsyncWebClient(
            base_url=self._base_url, session=self._session, retry_handlers=list(retries)
        )

    async def _authenticate(self) -> None:
        assert self._web is not None
        try:
            result = await self._web.auth_test()
        except SlackApiError as exc:
            self._refused("bot_token", exc)
            raise AdapterNotReadyError(f"auth.test failed: {error_code(exc)}") from None
        except (SlackClientError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AdapterNotReadyError(
                f"cannot reach the Slack API at {self._base_url}: {type(exc).__name__}"
            ) from None
        user_id = result.get("user_id")
        if not isinstance(user_id, str):
            raise AdapterNotReadyError("auth.test returned no user_id")
        self._identity = BotIdentity(user_id, result.get("bot_id"), result.get("team_id"))
        self._auth = AuthorizeResult.from_auth_test_response(
            auth_test_response=result, bot_token=self.settings.bot_token.get_secret_value()
        )
        self._log.info(
            "slack_authenticated", team_id=self._identity.team_id, bot_user=user_id
        )

    def _refused(self, which: str, exc: SlackApiError) -> None:
        code = error_code(exc)
        if code in AUTH_ERRORS:
            raise AdapterAuthError(
                f"Slack refused the {which.replace('_', ' ')} ({code}): "
                f"check slack.apps[{self.settings.name}].{which}"
            ) from None

    def _park(self, reason: str) -> None:
        """Slack refused us mid-run: stop serving; run() raises AdapterAuthError (parked)."""
        if self._refusal is None:
            self._refusal = reason
            self._log.error("slack_credentials_refused", reason=reason)
            self._wake.set()

    def _check_refusal(self, exc: BaseException) -> None:
        if isinstance(exc, SlackApiError) and error_code(exc) in AUTH_ERRORS:
            self._park(
                f"Slack refused the bot token ({error_code(exc)}): "
                f"check slack.apps[{self.settings.name}].bot_token"
            )

    async def _open_socket(self) -> None:
        assert self._app is not None and self._app_client is not None
        app_token = self.settings.app_token.get_secret_value()
        self.status.state = AdapterState.CONNECTING
        handler = _SocketHandler(
            self._envelope_seen,
            lambda: None if self._stopping else self._pipeline.reserve(),
            self._app,
            app_token,
            logger=_sdk_logger,
            web_client=self._app_client,
            ping_interval=self._ping,
        )
        try:
            try:
                # Our own apps.connections.open: the SDK would retry a refused token forever.
                opened = await self._app_client.apps_connections_open(app_token=app_token)
            except SlackApiError as exc:
                self._refused("app_token", exc)
                raise AdapterNotReadyError(
                    f"apps.connections.open failed: {error_code(exc)}"
                ) from None
            except (SlackClientError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise AdapterNotReadyError(
                    f"cannot reach the Slack API at {self._base_url}: {type(exc).__name__}"
                ) from None
            handler.client.wss_uri = opened["url"]
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await handler.connect_async()  # type: ignore[no-untyped-call]
            except TimeoutError:
                raise AdapterNotReadyError("the Socket Mode connection did not open") from None
        except BaseException:
            self._spawn_close(handler)
            raise
        if self._stopping:
            self._spawn_close(handler)
            return
        handler.client.on_message_listeners.append(self._ws_message)
        self._handler = handler
        self._last_life = time.time()
        self._unhealthy_since = None
        self.status.state = AdapterState.CONNECTED
        self.status.connected_at = time.time()
        self._log.info("slack_connected", team_id=self._identity and self._identity.team_id)

    def _retire_handler(self) -> None:
        handler, self._handler = self._handler, None
        if handler is not None:
            self._spawn_close(handler)

    def _spawn_close(self, handler: _SocketHandler) -> None:
        task = asyncio.create_task(
            self._close_handler(handler),
            name=f"slack-close:{self.tenant_id}:{self.settings.name}",
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_handler(self, handler: _SocketHandler) -> None:
        client = handler.client
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await handler.close_async()  # type: ignore[no-untyped-call]
        except Exception as exc:
            self._log.debug("slack_socket_close_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            # A silent socket never finishes its close handshake: make sure nothing lingers.
            client.closed = True
            for future in (client.message_receiver, client.current_session_monitor,
                           client.message_processor):
                if future is not None and not future.done():
                    future.cancel()
            if not client.aiohttp_client_session.closed:
                await client.aiohttp_client_session.close()

    async def _wait_closing(self) -> None:
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=CLOSE_TIMEOUT + 1)

    async def _close_clients(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # Watchdog ------------------------------------------------------------------------------

    def _envelope_seen(self) -> None:
        self._last_life = time.time()
        self.status.event_seen()

    async def _ws_message(self, _message: Any) -> None:
        self._last_life = time.time()

    def _socket_problem(self) -> str | None:
        """Why the socket is not healthy, or None. Looks past `is_connected()`, which can
        claim health while the client loops on a closed session (python-slack-sdk #1922)."""
        handler = self._handler
        if handler is None:
            return "no socket"
        client = handler.client
        if client.closed:
            return "socket client closed"
        if client.aiohttp_client_session.closed:
            return "socket client's HTTP session closed"
        session = client.current_session
        if session is None or session.closed:
            return "websocket closed"
        for name, future in (
            ("receive", client.message_receiver),
            ("monitor", client.current_session_monitor),
            ("dispatch", client.message_processor),
        ):
            if future is None or future.done():
                return f"socket {name} loop ended"
        last = max(self._last_life, client.last_ping_pong_time or 0.0)
        silent = time.time() - last
        if silent > 3 * self._ping:
            return f"silent for {silent:.0f}s"
        return None

    async def _watch(self) -> str | None:
        """Return None once stopping, or why the socket must be replaced."""
        interval = min(1.0, self._ping / 2)
        while not self._stopping:
            try:
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if self._stopping or self._refusal is not None:
                return None
            problem = self._socket_problem()
            if problem is None:
                self._unhealthy_since = None
                continue
            if problem.startswith("silent"):
                return problem  # silence already lasted three ping intervals
            now = time.monotonic()
            if self._unhealthy_since is None:
                # Give the SDK's own reconnect (refresh_requested, a closed socket) a chance.
                self._unhealthy_since = now
            elif now - self._unhealthy_since >= 2 * self._ping:
                return problem
        return None

    # bolt ----------------------------------------------------------------------------------

    def _build_app(self) -> AsyncApp:
        app = AsyncApp(
            client=self._app_client,
            authorize=self._authorizer(),
            logger=logging.getLogger("slack_bolt.AsyncApp"),
            name=f"chatgateway:{self.tenant_id}:{self.settings.name}",
            request_verification_enabled=False,  # Socket Mode: the app token authenticates
            # Listeners run before the ack (they only start a task), so _SocketHandler sees
            # whether an envelope started work and its reservation is never left unowned.
            process_before_response=True,
            ssl_check_enabled=False,
            url_verification_enabled=False,
        )
        adapter = self
        async def on_event(body: dict[str, Any], context: dict[str, Any]) -> None:
            # The envelope is acked when this returns: do nothing slow here.
            adapter._on_event(body, context)

        async def on_command(ack: AsyncAck, body: dict[str, Any], context: dict[str, Any]) -> None:
            await adapter._on_command(ack, body, context)

        async def on_action(ack: AsyncAck, body: dict[str, Any], context: dict[str, Any]) -> None:
            await adapter._on_action(ack, body, context)

        app.event(re.compile(".*"))(on_event)
        app.command(re.compile(".*"))(on_command)
        app.action(ACTION_ID_PATTERN)(on_action)  # the gateway's buttons (blocks.py)
        return app

    def _authorizer(self) -> Callable[..., Awaitable[AuthorizeResult]]:
        adapter = self

        async def authorize(team_id: str | None) -> AuthorizeResult:
            # The result of our own auth.test: no Web API call before the ack.
            assert adapter._auth is not None
            return adapter._auth

        return authorize


    # The conversation (conversation.py) -----------------------------------------------------

    def _on_event(self, body: dict[str, Any], context: dict[str, Any]) -> None:
        """An Events API payload arrived (before its ack: start work, never wait)."""
        raise NotImplementedError

    async def _on_command(
        self, ack: AsyncAck, body: dict[str, Any], context: dict[str, Any]
    ) -> None:
        """A slash command arrived: ack it and start work."""
        raise NotImplementedError

    async def _on_action(
        self, ack: AsyncAck, body: dict[str, Any], context: dict[str, Any]
    ) -> None:
        """A click on one of the gateway's buttons arrived: ack it and start work."""
        raise NotImplementedError

    # In-flight messages at stop ------------------------------------------------------------

    async def _finish_tasks(self) -> bool:
        """Deal with in-flight messages; True if some were left to finish in the background."""
        if not self._tasks:
            return False
        if self._pipeline.accepting:
            # Restarted (its config changed, or the supervisor found it dead) while an agent
            # still works: those messages were acked, so finish them in the background and
            # close the HTTP session after them.
            pending = set(self._tasks)
            finisher = asyncio.create_task(
                self._finish_detached(pending), name=f"slack-detached:{self.tenant_id}"
            )
            _DETACHED.add(finisher)
            finisher.add_done_callback(_DETACHED.discard)
            self._log.info("slack_replies_detached", count=len(pending))
            return True
        # The daemon is shutting down and its drain deadline has passed: whatever still waits
        # for the agent is abandoned; replies already being posted get a moment.
        for task, phase in list(self._tasks.items()):
            if phase == "agent":
                task.cancel()
        _, pending = await asyncio.wait(set(self._tasks), timeout=STOP_GRACE)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1)
            self._log.warning("slack_replies_abandoned", count=len(pending))
        return False

    async def _close_when_idle(self) -> None:
        """Close the HTTP session now, or after the replies still in flight (parked)."""
        if not self._tasks:
            await self._close_clients()
            return
        finisher = asyncio.create_task(
            self._finish_detached(set(self._tasks)), name=f"slack-parked:{self.tenant_id}"
        )
        _DETACHED.add(finisher)
        finisher.add_done_callback(_DETACHED.discard)

    async def _finish_detached(self, pending: set[asyncio.Task[None]]) -> None:
        try:
            await asyncio.wait(pending, timeout=900)
        finally:
            for task in pending:
                task.cancel()
            await self._close_clients()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SlackApiError):
        return error_code(exc)
    return f"{type(exc).__name__}: {exc}"
