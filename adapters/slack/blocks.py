"""Buttons in Slack (pure): an answer's actions as Block Kit, a click back as a message.

An answer with buttons carries an `actions` block (block_id `cg_actions.<user>`: whose answer
it is) of buttons whose action_id is `cg_action_<n>` (n counts from 1) and whose value is the
action's value. A click arrives as a `block_actions` payload over Socket Mode; `click_to_inbound`
makes it a message of the session the buttons were shown in (the same conversation, thread and
user as the message the agent answered, so its SessionKey matches), with the value as text and
`metadata.action = {value, label, index, via: "button"}` (the shape of `rich.chosen`'s). Only
that user may choose: another person's click is refused (`NotYours`), never put in someone
else's session. After a click, `chosen_message` is the message with its buttons replaced by
"✓ <label> chosen by <@user>".

Nothing here does I/O; docs/slack.md ("Files and buttons") describes the behaviour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from adapters.slack.convert import Ignored, Inbound, ReplyTarget, escape, split_message
from chatgateway.models import (
    Action,
    Conversation,
    ConversationKind,
    NormalizedMessage,
    Platform,
    TenantId,
    User,
)
from chatgateway.text import storable_message

#: Slack's limits: a button's text (plain_text) and value, the elements of an actions block,
#: a section's text, a markdown block's text, a block_id.
MAX_BUTTON_TEXT = 75
MAX_BUTTON_VALUE = 2000
MAX_BUTTONS = 25
MAX_SECTION_TEXT = 3000
MAX_MARKDOWN_TEXT = 12000
MAX_BLOCK_ID = 255
#: Ours among a message's blocks and a click's actions (other apps' payloads are ignored).
BLOCK_ID_PREFIX = "cg_actions"
ACTION_ID_PREFIX = "cg_action_"
#: The action_ids bolt routes to the gateway's click listener.
ACTION_ID_PATTERN = re.compile(rf"^{ACTION_ID_PREFIX}\d+$")
#: What the buttons become once one was clicked.
CHOSEN_MARK = "\u2713"


# Outgoing ----------------------------------------------------------------------------------


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def actions_block(
    actions: tuple[Action, ...] | list[Action], *, owner: str | None
) -> dict[str, Any]:
    """The buttons as one Block Kit `actions` block; `owner` is the user whose answer it is."""
    elements: list[dict[str, Any]] = []
    for index, action in enumerate(actions[:MAX_BUTTONS], 1):
        button: dict[str, Any] = {
            "type": "button",
            "action_id": f"{ACTION_ID_PREFIX}{index}",
            "text": {"type": "plain_text", "text": _cut(action.label, MAX_BUTTON_TEXT),
                     "emoji": True},
            "value": action.value[:MAX_BUTTON_VALUE],
        }
        if action.style in ("primary", "danger"):
            button["style"] = action.style
        elements.append(button)
    block_id = BLOCK_ID_PREFIX if owner is None else f"{BLOCK_ID_PREFIX}.{owner}"
    return {"type": "actions", "block_id": block_id[:MAX_BLOCK_ID], "elements": elements}


def text_blocks(text: str, *, markdown: bool) -> list[dict[str, Any]]:
    """A message's text as blocks: one `markdown` block (standard Markdown, as streamed) or
    `section` blocks of mrkdwn, split within Slack's 3,000 characters per section."""
    if not text.strip():
        return []
    if markdown:
        return [{"type": "markdown", "text": _cut(text, MAX_MARKDOWN_TEXT)}]
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": part}}
        for part in split_message(text, MAX_SECTION_TEXT)
    ]


def answer_blocks(
    text: str, actions: tuple[Action, ...] | list[Action], *, owner: str | None, markdown: bool
) -> list[dict[str, Any]]:
    """The blocks of an answer's (last) message: its text, then its buttons."""
    blocks = text_blocks(text, markdown=markdown)
    if actions:
        blocks.append(actions_block(actions, owner=owner))
    return blocks


# Incoming: a click -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Click:
    """One click on one of the gateway's buttons, from a `block_actions` payload."""

    user: str
    channel: str
    #: The message holding the buttons, and the thread it is in (None: not in a thread).
    message_ts: str
    thread_ts: str | None
    index: int
    value: str
    label: str
    #: The user whose answer the buttons belong to (from the block_id; None: anyone's).
    owner: str | None
    team: str | None
    is_dm: bool
    action_ts: str | None
    #: The message as Slack sent it along: its text and blocks (for the replacement).
    message_text: str
    message_blocks: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class NotYours:
    """A click on buttons shown to someone else: refused with a note to the clicker."""

    click: Click

    @property
    def notice(self) -> str:
        return f"Only <@{self.click.owner}> can choose here."


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _obj(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    return value if isinstance(value, dict) else {}


def parse_click(body: dict[str, Any]) -> Click | Ignored:
    """What was clicked in a `block_actions` payload, or why it is not ours to handle."""
    if body.get("type") != "block_actions":
        return Ignored(f"interaction {body.get('type')}")
    actions = body.get("actions")
    if not isinstance(actions, list) or not actions or not isinstance(actions[0], dict):
        return Ignored("no action")
    action = actions[0]
    action_id = _str(action.get("action_id")) or ""
    block_id = _str(action.get("block_id")) or ""
    if not ACTION_ID_PATTERN.match(action_id) or not block_id.startswith(BLOCK_ID_PREFIX):
        return Ignored(f"action {action_id or '?'}")
    if action.get("type") != "button":
        return Ignored(f"element {action.get('type')}")
    owner = block_id[len(BLOCK_ID_PREFIX) + 1 :] if block_id.startswith(
        BLOCK_ID_PREFIX + "."
    ) else None
    user_obj, channel_obj = _obj(body, "user"), _obj(body, "channel")
    container, message = _obj(body, "container"), _obj(body, "message")
    user = _str(user_obj.get("id"))
    channel = _str(channel_obj.get("id")) or _str(container.get("channel_id"))
    message_ts = _str(container.get("message_ts")) or _str(message.get("ts"))
    if user is None or channel is None or message_ts is None:
        return Ignored("missing user, channel or message")
    value = action.get("value")
    if not isinstance(value, str):
        return Ignored("button without a value")
    label = _str(_obj(action, "text").get("text")) or value
    team_obj = _obj(body, "team")
    blocks = message.get("blocks")
    return Click(
        user=user,
        channel=channel,
        message_ts=message_ts,
        thread_ts=_str(container.get("thread_ts")) or _str(message.get("thread_ts")),
        index=int(action_id[len(ACTION_ID_PREFIX) :]),
        value=value,
        label=label,
        owner=owner or None,
        team=_str(team_obj.get("id")) or _str(user_obj.get("team_id")),
        is_dm=channel.startswith("D") or channel_obj.get("name") == "directmessage",
        action_ts=_str(action.get("action_ts")),
        message_text=_str(message.get("text")) or "",
        message_blocks=tuple(b for b in blocks if isinstance(b, dict))
        if isinstance(blocks, list)
        else (),
    )


def click_message_id(click: Click) -> str:
    """The click's message id: one choice per message of buttons (a second click on the
    same buttons, or Slack's redelivery of the first, is a duplicate)."""
    return f"action:{click.channel}:{click.message_ts}"


def click_to_inbound(
    tenant_id: TenantId, click: Click, *, app_name: str = "default"
) -> Inbound | NotYours:
    """A click (`parse_click`) as a message of the session the buttons were shown in."""
    if click.owner is not None and click.owner != click.user:
        return NotYours(click)
    if click.is_dm:
        # A DM is one session whatever its threads (as in convert.event_to_inbound).
        conversation = Conversation(id=click.channel, kind=ConversationKind.DM)
    else:
        # A channel answer is in the thread of the mention: its root is the session's thread.
        root = click.thread_ts or click.message_ts
        conversation = Conversation(id=click.channel, kind=ConversationKind.CHANNEL, thread_id=root)
    action_ts = click.action_ts
    try:
        timestamp = float(action_ts) if action_ts else float(click.message_ts)
    except ValueError:
        timestamp = 0.0
    message = NormalizedMessage(
        tenant_id=tenant_id,
        platform=Platform.SLACK,
        conversation=conversation,
        user=User(id=click.user),
        text=click.value,
        message_id=click_message_id(click),
        timestamp=timestamp,
        metadata={
            "action": {
                "value": click.value,
                "label": click.label,
                "index": click.index,
                "via": "button",
            },
            "slack": {
                "app": app_name,
                "team": click.team,
                "channel": click.channel,
                "ts": click.message_ts,
                "threadTs": click.thread_ts,
                "actionTs": action_ts,
            },
        },
    )
    # The answer goes where the buttons are: their thread, or the DM itself.
    target = ReplyTarget(channel=click.channel, thread_ts=click.thread_ts, user_id=click.user)
    return Inbound(storable_message(message), target)


def chosen_message(click: Click) -> tuple[str, list[dict[str, Any]]]:
    """The text and blocks that replace the clicked message: everything as it was, but the
    buttons replaced by "✓ <label> chosen by <@user>"."""
    note = {
        "type": "context",
        "elements": [
            {
                "type": "mrkdwn",
                "text": f"{CHOSEN_MARK} *{escape(click.label)}* chosen by <@{click.user}>",
            }
        ],
    }
    blocks: list[dict[str, Any]] = []
    replaced = False
    for block in click.message_blocks:
        block_id = block.get("block_id")
        if block.get("type") == "actions" and isinstance(block_id, str) and block_id.startswith(
            BLOCK_ID_PREFIX
        ):
            if not replaced:
                blocks.append(note)
                replaced = True
            continue
        blocks.append(block)
    if not replaced:
        if not blocks:
            blocks.extend(text_blocks(click.message_text, markdown=False))
        blocks.append(note)
    text = click.message_text or f"{CHOSEN_MARK} {click.label}"
    return text, blocks
