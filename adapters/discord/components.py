"""Buttons on Discord answers, and clicks on them; pure, no network, no state.

An agent's `actions` become message components: action rows of buttons (at most 5 per row),
each with a `custom_id` that says, within Discord's 100 characters, whose answer it is (the
user the answer was for: only their click counts), which button (1-based) and the action's
value. A value too long to fit is carried as a digest instead; the adapter then takes the value
from the session's stored answer (`value_of`). Discord accepts clicks only on components the
bot posted, so a custom_id that arrives is one the gateway made.

A click (an INTERACTION_CREATE of type 3, component) becomes a `Click`, and `to_normalized`
makes it a message of the same session as the conversation (same channel or thread, same user)
whose text is the action's value and whose `metadata.action` is `{value, label, index, via:
"button"}` (the shape of chatgateway.rich.chosen's). `chosen_rows` gives the components the
message shows afterwards: every button disabled, the chosen one marked.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import discord

from chatgateway.models import (
    Action,
    Conversation,
    ConversationKind,
    NormalizedMessage,
    Platform,
    TenantId,
    Turn,
    User,
)

#: Discord's limit for a component's custom_id.
MAX_CUSTOM_ID = 100
#: Buttons in one action row, and action rows in one message.
ROW_SIZE = 5
MAX_ROWS = 5
#: Discord's limit for a button's label.
MAX_LABEL = 80
#: custom_id prefixes: the value inline, or its digest (looked up in the stored answer).
PREFIX = "cg1"
PREFIX_DIGEST = "cg1h"
#: Who may click when the answer's user is unknown (an answer posted for no particular user).
ANYONE = "0"
#: How the chosen button is marked after a click.
CHOSEN_MARK = "✓ "

COMPONENT_ROW = 1
COMPONENT_BUTTON = 2
#: Discord's button styles.
STYLE_PRIMARY = 1
STYLE_SECONDARY = 2
STYLE_SUCCESS = 3
STYLE_DANGER = 4
_STYLES = {"primary": STYLE_PRIMARY, "danger": STYLE_DANGER}
#: The interaction type of a click on a message component.
INTERACTION_COMPONENT = 3
_CHANNEL_DM = 1
_CHANNEL_GROUP_DM = 3
_THREAD_TYPES = frozenset({10, 11, 12})
_SNOWFLAKE = re.compile(r"^[0-9]{1,20}$")


@dataclass(frozen=True, slots=True)
class ButtonRef:
    """What a custom_id says: whose answer, which button (1-based), the value or its digest."""

    owner: str
    index: int
    value: str | None = None
    digest: str | None = None

    def matches(self, value: str) -> bool:
        """Whether `value` is this button's value."""
        if self.value is not None:
            return self.value == value
        return self.digest == value_digest(value)


def value_digest(value: str) -> str:
    """A short, URL-safe digest of an action's value (for values too long to carry)."""
    raw = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
    return base64.urlsafe_b64encode(raw).decode()[:22]


def custom_id(owner: str | None, index: int, value: str) -> str:
    """The custom_id of button `index` (1-based) of an answer for user `owner`."""
    who = owner if owner is not None and _SNOWFLAKE.match(owner) else ANYONE
    inline = f"{PREFIX}:{who}:{index}:{value}"
    if len(inline) <= MAX_CUSTOM_ID:
        return inline
    return f"{PREFIX_DIGEST}:{who}:{index}:{value_digest(value)}"


def parse_custom_id(raw: Any) -> ButtonRef | None:
    """The ButtonRef of a custom_id the gateway made, else None (another app's, or damaged)."""
    if not isinstance(raw, str) or len(raw) > MAX_CUSTOM_ID:
        return None
    parts = raw.split(":", 3)
    if len(parts) != 4 or parts[0] not in (PREFIX, PREFIX_DIGEST):
        return None
    prefix, owner, index, rest = parts
    if not _SNOWFLAKE.match(owner) or not index.isascii() or not index.isdigit():
        return None
    number = int(index)
    if not 1 <= number <= ROW_SIZE * MAX_ROWS:
        return None
    if prefix == PREFIX:
        return ButtonRef(owner, number, value=rest)
    return ButtonRef(owner, number, digest=rest) if rest else None


def button_style(action: Action) -> int:
    return _STYLES.get(action.style or "", STYLE_SECONDARY)


def action_rows(actions: Sequence[Action], owner: str | None) -> list[dict[str, Any]]:
    """The message components for `actions`: rows of at most 5 buttons (at most 25 in all)."""
    buttons = [
        {
            "type": COMPONENT_BUTTON,
            "style": button_style(action),
            "label": action.label[:MAX_LABEL],
            "custom_id": custom_id(owner, number, action.value),
        }
        for number, action in enumerate(actions[: ROW_SIZE * MAX_ROWS], 1)
    ]
    return [
        {"type": COMPONENT_ROW, "components": buttons[start : start + ROW_SIZE]}
        for start in range(0, len(buttons), ROW_SIZE)
    ]


def chosen_rows(rows: Sequence[Mapping[str, Any]], chosen_id: str) -> list[dict[str, Any]]:
    """The components after a click on `chosen_id`: every button disabled, the chosen one in
    green with a check mark before its label; other components unchanged."""
    result: list[dict[str, Any]] = []
    for row in rows:
        children = []
        for component in row.get("components") or ():
            item = dict(component)
            if item.get("type") == COMPONENT_BUTTON:
                item["disabled"] = True
                label = str(item.get("label") or "")
                if item.get("custom_id") == chosen_id:
                    item["style"] = STYLE_SUCCESS
                    if not label.startswith(CHOSEN_MARK):
                        item["label"] = (CHOSEN_MARK + label)[:MAX_LABEL]
            children.append(item)
        result.append({**row, "components": children})
    return result


def label_of(rows: Sequence[Mapping[str, Any]], chosen_id: str) -> str | None:
    """The label of the button `chosen_id` among `rows` (without the chosen mark)."""
    for row in rows:
        for component in row.get("components") or ():
            if component.get("custom_id") == chosen_id:
                label = component.get("label")
                return str(label).removeprefix(CHOSEN_MARK) if label is not None else None
    return None


def view(rows: Sequence[Mapping[str, Any]]) -> discord.ui.View:
    """`rows` as the discord.py View that `send`/`edit` take (call in the event loop).

    The view is stopped at once: discord.py then does not keep it to dispatch clicks to it
    (the adapter receives every click itself)."""
    result = discord.ui.View(timeout=None)
    for number, row in enumerate(rows[:MAX_ROWS]):
        for component in row.get("components") or ():
            if component.get("type") != COMPONENT_BUTTON:
                continue
            result.add_item(
                discord.ui.Button(
                    style=discord.ButtonStyle(int(component.get("style") or STYLE_SECONDARY)),
                    label=component.get("label"),
                    custom_id=component.get("custom_id"),
                    disabled=bool(component.get("disabled")),
                    row=number,
                )
            )
    result.stop()
    return result


# Clicks ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Click:
    """A click on a button of the gateway's, as the adapter needs it."""

    interaction_id: str
    custom_id: str
    ref: ButtonRef
    #: The channel clicked in; for a thread its parent is `parent_id`.
    channel_id: str
    parent_id: str | None
    dm: bool
    guild_id: str | None
    user_id: str
    user_name: str | None
    #: The message carrying the buttons, and its components (raw) when Discord sent them.
    message_id: str | None
    rows: tuple[dict[str, Any], ...] = ()

    @property
    def label(self) -> str | None:
        return label_of(self.rows, self.custom_id)

    def allowed(self) -> bool:
        """Whether the one who clicked may choose: the user the answer was for."""
        return self.ref.owner in (ANYONE, self.user_id)


def _id(value: Any) -> str | None:
    return str(value) if value is not None and _SNOWFLAKE.match(str(value)) else None


def parse_click(payload: Mapping[str, Any]) -> Click | None:
    """The Click of an INTERACTION_CREATE payload, or None when it is not a click on one of the
    gateway's buttons (a slash command, another app's component, a damaged payload)."""
    if payload.get("type") != INTERACTION_COMPONENT:
        return None
    data = payload.get("data")
    if not isinstance(data, Mapping) or data.get("component_type") != COMPONENT_BUTTON:
        return None
    raw_id = data.get("custom_id")
    ref = parse_custom_id(raw_id)
    interaction_id = _id(payload.get("id"))
    channel = payload.get("channel")
    channel = channel if isinstance(channel, Mapping) else {}
    channel_id = _id(payload.get("channel_id")) or _id(channel.get("id"))
    member = payload.get("member")
    user = member.get("user") if isinstance(member, Mapping) else payload.get("user")
    if not isinstance(user, Mapping):
        return None
    user_id = _id(user.get("id"))
    if ref is None or interaction_id is None or channel_id is None or user_id is None:
        return None
    assert isinstance(raw_id, str)
    kind = channel.get("type")
    guild_id = _id(payload.get("guild_id"))
    parent_id = _id(channel.get("parent_id")) if kind in _THREAD_TYPES else None
    name = None
    if isinstance(member, Mapping):
        name = member.get("nick")
    name = name or user.get("global_name") or user.get("username")
    message = payload.get("message")
    message = message if isinstance(message, Mapping) else {}
    rows = tuple(
        dict(row) for row in message.get("components") or () if isinstance(row, Mapping)
    )
    return Click(
        interaction_id=interaction_id,
        custom_id=raw_id,
        ref=ref,
        channel_id=channel_id,
        parent_id=parent_id,
        dm=guild_id is None or kind in (_CHANNEL_DM, _CHANNEL_GROUP_DM),
        guild_id=guild_id,
        user_id=user_id,
        user_name=str(name) if name else None,
        message_id=_id(message.get("id")),
        rows=rows,
    )


def click_of(interaction: discord.Interaction) -> Click | None:
    """The Click of a discord.py Interaction (the fields `parse_click` reads)."""
    channel: Any = interaction.channel
    channel_data: dict[str, Any] = {"id": interaction.channel_id}
    if channel is not None:
        kind = getattr(channel, "type", None)
        channel_data["type"] = kind.value if isinstance(kind, discord.ChannelType) else None
        channel_data["parent_id"] = getattr(channel, "parent_id", None)
    user = interaction.user
    payload: dict[str, Any] = {
        "id": interaction.id,
        "type": interaction.type.value,
        "data": interaction.data,
        "channel_id": interaction.channel_id,
        "channel": channel_data,
        "guild_id": interaction.guild_id,
        "user": {
            "id": getattr(user, "id", None),
            "username": getattr(user, "name", None),
            "global_name": getattr(user, "display_name", None),
        },
    }
    message = interaction.message
    if message is not None:
        payload["message"] = {
            "id": message.id,
            "components": [row.to_dict() for row in message.components],
        }
    return parse_click(payload)


def value_of(ref: ButtonRef, history: Sequence[Turn]) -> Action | None:
    """The action a digest names: button `ref.index` of the latest stored answer whose button
    there has that value (newest first); None when the answer is gone (pruned, erased)."""
    for turn in reversed(history):
        if 1 <= ref.index <= len(turn.actions):
            action = turn.actions[ref.index - 1]
            if ref.matches(action.value):
                return action
    return None


def to_normalized(
    click: Click,
    value: str,
    tenant_id: TenantId,
    *,
    bot_name: str,
    label: str | None = None,
) -> NormalizedMessage:
    """The click as a message of the conversation's session: the value as its text, and
    `metadata.action` saying what was chosen."""
    if click.dm:
        conversation = Conversation(id=click.channel_id, kind=ConversationKind.DM)
    elif click.parent_id is not None:
        conversation = Conversation(
            id=click.parent_id, kind=ConversationKind.CHANNEL, thread_id=click.channel_id
        )
    else:
        conversation = Conversation(id=click.channel_id, kind=ConversationKind.CHANNEL)
    label = label if label is not None else click.label
    metadata: dict[str, Any] = {
        "bot": bot_name,
        "via": "button",
        "channelId": click.channel_id,
        "action": {
            "value": value,
            "label": label if label is not None else value,
            "index": click.ref.index,
            "via": "button",
        },
    }
    if click.guild_id is not None:
        metadata["guildId"] = click.guild_id
    return NormalizedMessage(
        tenant_id=tenant_id,
        platform=Platform.DISCORD,
        conversation=conversation,
        user=User(id=click.user_id, display_name=click.user_name),
        text=value,
        # The interaction's id: unique, and the same when Discord replays the event.
        message_id=click.interaction_id,
        timestamp=discord.utils.snowflake_time(int(click.interaction_id)).timestamp(),
        metadata=metadata,
    )
