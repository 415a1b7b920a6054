"""Turning a Slack app's events into pipeline calls: the message, its working indicator
(a reaction, or an assistant thread's status) and the Outbound its answer goes out through.

The connection (socket, auth, watchdog, lifecycle) is connection.py's; the Slack calls that
show an answer are outbound.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Hashable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from slack_bolt.context.ack.async_ack import AsyncAck
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.blocks import NotYours, chosen_message, click_to_inbound, parse_click
from adapters.slack.connection import RESERVATION, SlackConnection, _describe
from adapters.slack.convert import (
    Ignored,
    Inbound,
    ReplyTarget,
    command_to_inbound,
    event_to_inbound,
    user_display_name,
)
from adapters.slack.files import SlackFileUploader
from adapters.slack.outbound import SlackOutbound, SlashOutbound
from adapters.slack.rich import RichSlackOutbound
from chatgateway.config import SlackAppConfig
from chatgateway.errors import (
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    UnavailableError,
)
from chatgateway.fetch import agent_host
from chatgateway.models import NormalizedMessage, Platform, SessionKey, User
from chatgateway.outbound import Address, Outbound
from chatgateway.pipeline import Pipeline, Reservation

#: Users whose display names are remembered (the map is cleared when it grows past this).
USER_CACHE_SIZE = 10_000
#: How long the working indicator's reactions.add may take (it is not retried on a 429).
REACTION_TIMEOUT = 2.0
#: How long setting an assistant thread's status may take (it is cosmetic, like the reaction).
STATUS_TIMEOUT = 2.0
BUSY_TEXT = "I'm handling too many messages right now. Please try again in a minute."


class _ArrivalOrder:
    """One FIFO lock per key, dropped when unused: keeps a session's messages in order."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)



class SlackConversations(SlackConnection):
    """DMs, @mentions and a slash command of one Slack app go to the tenant's agent; answers
    go out through a Slack Outbound (streamed when Slack allows it)."""

    def __init__(self, tenant_id: str, settings: SlackAppConfig, pipeline: Pipeline) -> None:
        super().__init__(tenant_id, settings, pipeline)
        self._in_flight: set[str] = set()
        self._order = _ArrivalOrder()
        self._user_names: dict[str, str | None] = {}
        #: Why Slack refused this app the streaming methods (then it posts and edits).
        self.stream_refusal: str | None = None

    # What the outbounds use (adapters.slack.outbound.SlackApp) -------------------------------

    @property
    def web(self) -> AsyncWebClient:
        assert self._web is not None
        return self._web

    def check_refusal(self, exc: BaseException) -> None:
        self._check_refusal(exc)

    def streaming_refused(self, code: str) -> None:
        if self.stream_refusal is None:
            self.stream_refusal = code
            self._log.warning("slack_streaming_unavailable", error=code)

    # Events --------------------------------------------------------------------------------

    def _on_event(self, body: dict[str, Any], context: dict[str, Any]) -> None:
        assert self._identity is not None
        raw = body.get("event")
        event: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if event.get("type") == "app_uninstalled":
            self._park("the Slack app was uninstalled from the workspace: reinstall it")
            return
        if event.get("type") == "tokens_revoked":
            bot_ids = (event.get("tokens") or {}).get("bot") or []
            if self._identity.user_id in bot_ids:
                self._park(
                    "the bot token was revoked in Slack: "
                    f"install a new one in slack.apps[{self.settings.name}].bot_token"
                )
            return
        result = event_to_inbound(self.tenant_id, body, self._identity, app_name=self.settings.name)
        if isinstance(result, Ignored):
            self._log.debug("slack_event_ignored", reason=result.reason,
                            event_id=body.get("event_id"))
            return
        self._start(result, context)

    async def _on_command(
        self, ack: AsyncAck, body: dict[str, Any], context: dict[str, Any]
    ) -> None:
        command = self.settings.slash_command
        result = command_to_inbound(
            self.tenant_id, body, command=command, app_name=self.settings.name
        )
        if isinstance(result, Ignored):
            if command is not None and body.get("command") == command:
                await ack(response_type="ephemeral", text=f"Usage: `{command} <your question>`")
            else:
                await ack()
            self._log.debug("slack_command_ignored", reason=result.reason)
            return
        if self.settings.working_indicator == "none":
            await ack()
        else:
            await ack(
                response_type="ephemeral",
                text=f":{self.settings.working_reaction}: Working on it…",
            )
        self._start(result, context)

    async def _on_action(
        self, ack: AsyncAck, body: dict[str, Any], context: dict[str, Any]
    ) -> None:
        """A click on one of the gateway's buttons (blocks.py): acked at once; the value goes
        to the agent as a message of the session the buttons were shown in, and the buttons
        are replaced by the choice. Another person's click gets an ephemeral note only."""
        await ack()
        click = parse_click(body)
        if isinstance(click, Ignored):
            self._log.debug("slack_action_ignored", reason=click.reason)
            return
        result = click_to_inbound(self.tenant_id, click, app_name=self.settings.name)
        if isinstance(result, NotYours):
            self._log.info("slack_action_refused", reason="not the asker")
            self._side_task(self._post_note(click.channel, click.user, click.thread_ts,
                                            result.notice))
            return
        message_id = result.message.message_id
        replace_buttons = message_id not in self._in_flight
        self._log.info("slack_button_clicked", index=click.index, message_id=message_id)
        self._start(result, context)
        if replace_buttons:
            self._side_task(self._replace_buttons(result.message, *chosen_message(click)))

    def _side_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"slack-click:{self.tenant_id}:{self.settings.name}")
        self._tasks[task] = "reply"
        task.add_done_callback(self._task_done)

    async def _replace_buttons(
        self, message: NormalizedMessage, text: str, blocks: list[dict[str, Any]]
    ) -> None:
        if await self._seen(message):
            return  # chosen before (a redelivery, or a click on stale buttons)
        slack = message.metadata["slack"]
        try:
            await self.web.chat_update(
                channel=slack["channel"], ts=slack["ts"], text=text, blocks=blocks
            )
        except Exception as exc:
            self._check_refusal(exc)
            self._log.warning("slack_update_failed", channel=slack["channel"],
                              error=_describe(exc))

    async def _post_note(self, channel: str, user: str, thread_ts: str | None, text: str) -> None:
        try:
            await self.web.chat_postEphemeral(
                channel=channel, user=user, text=text, thread_ts=thread_ts
            )
        except Exception as exc:
            self._check_refusal(exc)
            self._log.warning("slack_reply_failed", channel=channel, error=_describe(exc))

    def _rich(self) -> dict[str, Any]:
        """What an answer's files need: an uploader on this app's client, the agent's host
        (files it serves from a private address are fetched)."""
        tenant = self._pipeline.tenants.get(self.tenant_id)
        host = agent_host(tenant.config.agent.url) if tenant is not None else None
        assert self._session is not None
        return {
            "uploader": SlackFileUploader(self.web, self._session),
            "trusted_hosts": (host,) if host else (),
        }

    # Processing ----------------------------------------------------------------------------

    def _start(self, inbound: Inbound, context: dict[str, Any]) -> None:
        message_id = inbound.message.message_id
        if message_id in self._in_flight:
            # Redelivered while the first delivery is still being processed here.
            self._log.info("message_duplicate", message_id=message_id, where="in_flight")
            return
        reservation: Reservation = context.pop(RESERVATION)
        self._in_flight.add(message_id)
        task = asyncio.create_task(
            self._process(inbound, reservation),
            name=f"slack:{self.tenant_id}:{self.settings.name}:{message_id}",
        )
        self._tasks[task] = "agent"
        task.add_done_callback(self._task_done)
        # Also when the task is cancelled before it ran.
        task.add_done_callback(lambda _: reservation.release())

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._log.error("slack_message_failed", error=f"{type(exc).__name__}: {exc}")

    async def _process(self, inbound: Inbound, reservation: Reservation) -> None:
        message, target = inbound.message, inbound.target
        showing: asyncio.Task[str | None] | None = None
        cleared = False
        task = asyncio.current_task()

        async def before_first() -> None:
            if task is not None and task in self._tasks:
                self._tasks[task] = "reply"
            if showing is not None:
                # The indicator precedes the answer (it gives up after its short timeout).
                await asyncio.wait({showing})

        async def on_visible() -> None:
            nonlocal cleared
            if showing is not None and showing.done() and not showing.cancelled():
                if showing.result() == "status" and not cleared:
                    cleared = True
                    await self._set_status(target, "")

        outbound: Outbound | None = None
        try:
            # Messages of one session reach the pipeline in arrival order.
            async with self._order.hold(SessionKey.of(message)):
                message = await self._with_user_name(message)
                if self.settings.working_indicator != "none" and not await self._seen(message):
                    # Alongside the agent call: a slow or rate-limited indicator must not
                    # delay the answer.
                    showing = asyncio.create_task(
                        self._indicate(target),
                        name=f"slack-indicator:{self.tenant_id}:{self.settings.name}",
                    )
                outbound = self._outbound(inbound, before_first, on_visible)
                notice = await self._ask_agent(message, reservation, outbound)
                if notice:
                    await outbound.post(notice)
        finally:
            if isinstance(outbound, SlackOutbound):
                outbound.abandon()  # cancelled before its first words: no stream starts late
            self._in_flight.discard(message.message_id)
            reservation.release()
            # After the answer, and never before the indicator was shown: unless Slack
            # refused it.
            shown = None
            if showing is not None and not showing.cancelled():
                shown = await showing
            if shown == "status" and not cleared:
                await self._set_status(target, "")  # the answer failed or was empty
            elif shown == "reaction":
                await self._react("remove", target)

    async def _indicate(self, target: ReplyTarget) -> str | None:
        """Show that the agent works: an assistant thread's status, else the reaction; which
        one was shown (None: neither)."""
        if target.assistant and await self._set_status(target, self.settings.assistant_status):
            return "status"
        if self._reacting(target) and await self._react("add", target):
            return "reaction"
        return None

    def address(self, inbound: Inbound) -> Address:
        """Where the answer to `inbound` goes, as plain data (see `outbound`)."""
        target = inbound.target
        slack = inbound.message.metadata.get("slack")
        team = slack.get("team") if isinstance(slack, dict) else None
        if target.response_url is not None:
            fields: dict[str, Any] = {
                "channel": target.channel,
                "user": target.user_id,
                "command": True,
                "ephemeral": self.settings.slash_response_type == "ephemeral",
            }
        else:
            fields = {
                "channel": target.channel,
                "thread_ts": target.thread_ts,
                "message_ts": target.message_ts,
                "user": inbound.message.user.id,
                "team": target.team or (team if isinstance(team, str) else None),
            }
        return Address(Platform.SLACK, self.settings.name, fields)

    def outbound(self, address: Address) -> Outbound | None:
        """An Outbound for an answer that arrives later (OutboundFactory); None if the address
        is not this app's or the app is not connected."""
        if (
            address.platform != Platform.SLACK
            or address.adapter != self.settings.name
            or self._web is None
        ):
            return None
        try:
            if address.target.get("command"):
                return SlashOutbound(
                    self, address, response_url=None, session=self._session,
                    response_type=self.settings.slash_response_type,
                )
            return RichSlackOutbound(
                self, address, native=self.stream_refusal is None, **self._rich()
            )
        except ValueError:
            return None

    def _outbound(
        self,
        inbound: Inbound,
        before_first: Callable[[], Awaitable[None]],
        on_visible: Callable[[], Awaitable[None]],
    ) -> Outbound:
        address = self.address(inbound)
        if inbound.target.response_url is not None:
            return SlashOutbound(
                self, address, response_url=inbound.target.response_url,
                session=self._session, response_type=self.settings.slash_response_type,
            )
        return RichSlackOutbound(
            self, address, native=self.stream_refusal is None,
            before_first=before_first, on_visible=on_visible, **self._rich(),
        )

    def _reacting(self, target: ReplyTarget) -> bool:
        return self.settings.working_indicator == "reaction" and target.message_ts is not None

    async def _seen(self, message: NormalizedMessage) -> bool:
        """Already processed (a redelivery): then no working indicator is shown."""
        try:
            return await self._pipeline.store.is_processed(
                message.tenant_id, message.platform, message.message_id
            )
        except Exception:
            return False

    async def _ask_agent(
        self, message: NormalizedMessage, reservation: Reservation, outbound: Outbound
    ) -> str:
        """Process one message, its answer streamed through `outbound`; a notice to post
        when the pipeline refused it ("" for nothing)."""
        try:
            await reservation.handle(message, dedup=True, outbound=outbound)
        except OverloadedError:
            self._log.warning("slack_tenant_overloaded", message_id=message.message_id)
            return BUSY_TEXT
        except RateLimitedError as exc:
            # One polite notice per user and notice interval, then silence: never a flood.
            self._log.info(
                "message_rejected",
                reason=exc.reason,
                notice=exc.notice is not None,
                message_id=message.message_id,
            )
            return exc.notice or ""
        except UnavailableError:
            self._log.warning(
                "slack_message_not_processed", reason="shutting down", message_id=message.message_id
            )
            return ""
        except NotFoundError as exc:
            self._log.error(
                "slack_message_not_processed", reason=str(exc), message_id=message.message_id
            )
            return ""
        except Exception as exc:
            self._log.error(
                "slack_message_failed", error=_describe(exc), message_id=message.message_id
            )
            tenant = self._pipeline.tenants.get(message.tenant_id)
            return tenant.config.agent.fallback_text if tenant is not None else ""
        return ""

    async def _with_user_name(self, message: NormalizedMessage) -> NormalizedMessage:
        if message.user.display_name is not None:
            return message
        user_id = message.user.id
        if user_id not in self._user_names:
            name: str | None = None
            try:
                assert self._web is not None
                async with asyncio.timeout(5):
                    result = await self._web.users_info(user=user_id)
                user = result.get("user")
                name = user_display_name(user) if isinstance(user, dict) else None
            except Exception as exc:  # a missing users:read scope must not cost the message
                self._log.debug("slack_user_lookup_failed", error=type(exc).__name__)
            if len(self._user_names) >= USER_CACHE_SIZE:
                self._user_names.clear()
            self._user_names[user_id] = name
        name = self._user_names[user_id]
        if name is None:
            return message
        return replace(message, user=User(user_id, name))

    async def _react(self, action: str, target: ReplyTarget) -> bool:
        """Add or remove the working reaction; False if Slack refused it."""
        assert self._web is not None and self._indicator_web is not None
        assert target.message_ts is not None
        try:
            if action == "add":
                # An indicator shown late is useless: no 429 retries, a short timeout.
                async with asyncio.timeout(REACTION_TIMEOUT):
                    await self._indicator_web.reactions_add(
                        channel=target.channel,
                        timestamp=target.message_ts,
                        name=self.settings.working_reaction,
                    )
            else:
                await self._web.reactions_remove(
                    channel=target.channel,
                    timestamp=target.message_ts,
                    name=self.settings.working_reaction,
                )
        except Exception as exc:  # the indicator is cosmetic: never lose the answer over it
            self._check_refusal(exc)
            self._log.debug("slack_reaction_failed", action=action, error=_describe(exc))
            # A timed-out add may still have landed: then it is removed like a shown one.
            return not isinstance(exc, SlackApiError)
        return True

    async def _set_status(self, target: ReplyTarget, status: str) -> bool:
        """Set (or with "" clear) an assistant thread's status; False if Slack refused it."""
        assert self._indicator_web is not None
        thread = target.thread_ts or target.message_ts
        if thread is None:
            return False
        try:
            # Like the reaction: shown late it is useless, so no 429 retries, a short timeout.
            async with asyncio.timeout(STATUS_TIMEOUT):
                await self._indicator_web.assistant_threads_setStatus(
                    channel_id=target.channel, thread_ts=thread, status=status
                )
        except Exception as exc:  # cosmetic: never lose the answer over it
            self._check_refusal(exc)
            self._log.debug("slack_status_failed", error=_describe(exc))
            return False
        return True
