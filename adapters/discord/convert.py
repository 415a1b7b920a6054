"""Pure conversions between Discord messages and the gateway's model; no network, no state.

`route` decides whether a message is for the agent, `to_normalized` builds the NormalizedMessage
(mention stripped), `split_message` cuts a long answer into Discord-sized messages without ever
leaving a code block open, and `reply_nonce` names each reply part so a retried POST is idempotent.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import discord

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
from chatgateway.text import storable_message

#: Discord's limit for the content of one message.
MAX_MESSAGE_LENGTH = 2000
#: Discord accepts a nonce of at most 25 characters.
NONCE_LENGTH = 25
FENCE = "```"

#: Why a message goes to the agent.
Via = Literal["dm", "mention", "reply", "channel"]

_ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)
_USER_MENTION = re.compile(r"<@!?([0-9]{1,20})>")


def route(
    message: discord.Message,
    bot_id: int,
    channels: Collection[str],
    bot_role_ids: Collection[int] = (),
) -> Via | None:
    """Say why this message is for the agent, or None when the bot should ignore it.

    Ignored: the bot's own messages, other bots' and webhooks' messages, system messages.
    Answered: every DM; in guild channels, messages that mention the bot (or its managed role)
    or reply to one of its messages; and every message in a configured channel (or in a thread
    of one).
    """
    author = message.author
    if author.id == bot_id or author.bot or getattr(author, "system", False):
        return None
    if message.webhook_id is not None or message.type not in _ANSWERED_TYPES:
        return None
    if isinstance(message.channel, discord.DMChannel):
        return "dm"
    if any(user.id == bot_id for user in message.mentions):
        return "mention"
    if bot_role_ids and any(role.id in bot_role_ids for role in message.role_mentions):
        return "mention"
    reference = message.reference
    resolved = reference.resolved if reference is not None else None
    if isinstance(resolved, discord.Message) and resolved.author.id == bot_id:
        return "reply"
    channel_id, parent_id = channel_ids(message)
    if channel_id in channels or (parent_id is not None and parent_id in channels):
        return "channel"
    return None


def channel_ids(message: discord.Message) -> tuple[str, str | None]:
    """The id of the channel the message was posted in and, for a thread, its parent's id."""
    channel: Any = message.channel
    parent = getattr(channel, "parent_id", None) if isinstance(channel, discord.Thread) else None
    return str(channel.id), (str(parent) if parent is not None else None)


def strip_mentions(
    content: str,
    bot_id: int,
    *,
    bot_role_ids: Collection[int] = (),
    names: dict[int, str] | None = None,
) -> str:
    """Remove the bot's own mentions; show other users' mentions as @name when known."""
    names = names or {}
    text = re.sub(rf"<@!?{bot_id}>[ \t]?", "", content)
    for role_id in bot_role_ids:
        text = re.sub(rf"<@&{role_id}>[ \t]?", "", text)

    def user_name(match: re.Match[str]) -> str:
        name = names.get(int(match.group(1)))
        return f"@{name}" if name else match.group(0)

    return _USER_MENTION.sub(user_name, text).strip()


def to_normalized(
    message: discord.Message,
    tenant_id: TenantId,
    *,
    bot_id: int,
    via: Via,
    bot_name: str,
    bot_role_ids: Collection[int] = (),
) -> NormalizedMessage:
    """Build the NormalizedMessage for a message `route` accepted."""
    names = {user.id: user.display_name for user in message.mentions}
    text = strip_mentions(message.content, bot_id, bot_role_ids=bot_role_ids, names=names)
    channel_id, parent_id = channel_ids(message)
    guild_id = getattr(message.guild, "id", None) or getattr(message.channel, "guild_id", None)
    if via == "dm":
        conversation = Conversation(id=channel_id, kind=ConversationKind.DM)
    elif parent_id is not None:
        conversation = Conversation(
            id=parent_id, kind=ConversationKind.CHANNEL, thread_id=channel_id
        )
    else:
        conversation = Conversation(id=channel_id, kind=ConversationKind.CHANNEL)
    metadata: dict[str, Any] = {"bot": bot_name, "via": via, "channelId": channel_id}
    if guild_id is not None:
        metadata["guildId"] = str(guild_id)
    normalized = NormalizedMessage(
        tenant_id=tenant_id,
        platform=Platform.DISCORD,
        conversation=conversation,
        user=User(id=str(message.author.id), display_name=message.author.display_name),
        text=text,
        message_id=str(message.id),
        timestamp=message.created_at.timestamp(),
        attachments=tuple(
            # The CDN URL stays with the gateway (its source); the agent gets a gateway link.
            Attachment(
                name=a.filename,
                content_type=a.content_type,
                size=a.size,
                source=FileSource(bot_name, a.url),
            )
            for a in message.attachments
        ),
        metadata=metadata,
    )
    # Discord text may hold a NUL or a lone surrogate, which no store can hold: never let a
    # message reach the agent that cannot be recorded.
    return storable_message(normalized)


def reply_nonce(bot_id: int, message_id: int | str, part: int) -> str:
    """A stable nonce for part `part` of the answer to `message_id` (Discord allows 25 chars)."""
    raw = f"{bot_id}:{message_id}:{part}".encode()
    return hashlib.sha256(raw).hexdigest()[:NONCE_LENGTH]


# Splitting ---------------------------------------------------------------------------------


def split_message(text: str, limit: int = MAX_MESSAGE_LENGTH) -> list[str]:
    """Cut `text` into messages of at most `limit` characters, never inside a code block.

    Breaks fall between lines where possible, else at a space, else anywhere. A code block that
    fits in one message is never divided; one longer than a message is closed at the end of a
    part and reopened (with its language) at the start of the next, so every part renders.
    """
    if len(text) <= limit and not _ends_in_code(text):
        return [text] if text.strip() else []
    chunks: list[str] = []
    current = ""
    for item in _atoms(text, limit):
        if isinstance(item, _LongBlock):
            # It is cut anyway: let its first part fill what is left of the current message.
            room = limit - len(current)
            atoms: Iterator[str] = _code_parts(item, limit, room if room >= limit // 8 else limit)
        else:
            atoms = iter((item,))
        for atom in atoms:
            if len(current) + len(atom) <= limit:
                current += atom
                continue
            if current.strip():
                chunks.append(current)
            current = atom
    if current.strip():
        chunks.append(current)
    return [chunk.strip("\n") for chunk in chunks]


@dataclass(frozen=True, slots=True)
class _LongBlock:
    """A fenced code block longer than one message; its lines include both fence lines."""

    lines: list[str]
    closed: bool


def _toggles_fence(line: str) -> bool:
    return line.count(FENCE) % 2 == 1


def _ends_in_code(text: str) -> bool:
    """Whether a code block is still open at the end of `text`."""
    return sum(_toggles_fence(line) for line in text.splitlines()) % 2 == 1


def _atoms(text: str, limit: int) -> Iterator[str | _LongBlock]:
    """Pieces no longer than `limit` that may be packed together but never cut."""
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        if not _toggles_fence(lines[i]):
            yield from _cut(lines[i], limit)
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not _toggles_fence(lines[j]):
            j += 1
        closed = j < len(lines)
        block = lines[i : j + 1] if closed else lines[i:]
        whole = "".join(block)
        if not closed:
            # The text ends inside a code block (an answer still being streamed, or an agent
            # that forgot the closing fence): shown closed, so it renders as code meanwhile.
            whole += ("" if whole.endswith("\n") else "\n") + FENCE
        yield whole if len(whole) <= limit else _LongBlock(block, closed)
        i = j + 1


def _cut(text: str, limit: int) -> Iterator[str]:
    """Cut prose longer than `limit` at the last space that fits (or anywhere)."""
    while len(text) > limit:
        at = text.rfind(" ", 0, limit)
        at = at + 1 if at > 0 else limit
        yield text[:at]
        text = text[at:]
    if text:
        yield text


def _code_parts(block: _LongBlock, limit: int, first_limit: int) -> Iterator[str]:
    """A long code block as parts that each close the fence and reopen it with its language."""
    lines = block.lines
    opening = lines[0]
    fence_at = opening.rindex(FENCE)
    language = opening[fence_at + len(FENCE) :].strip()
    if " " in language:
        language = ""  # text after the fence, not a language name
    head = f"{FENCE}{language}\n"
    tail = f"{FENCE}\n"
    if opening[:fence_at].strip():
        yield from _cut(opening[:fence_at].rstrip() + "\n", limit)
        first_limit = limit
    body = lines[1:-1] if block.closed else lines[1:]
    closing_rest = lines[-1][lines[-1].index(FENCE) + len(FENCE) :] if block.closed else "\n"
    full_room = limit - len(head) - len(tail)
    room = first_limit - len(head) - len(tail)
    part = ""
    for line in body:
        if not line.endswith("\n"):
            line += "\n"
        pieces = [line] if len(line) <= full_room else [
            piece + "\n" for piece in _hard_cut(line, full_room - 1)
        ]
        for piece in pieces:
            if len(part) + len(piece) > room:
                if part:
                    yield head + part + tail
                part = ""
                room = full_room
            part += piece
    last = head + part + FENCE + closing_rest
    if len(last) <= room + len(tail) and (part or not body):
        yield last
        return
    if part:
        yield head + part + tail
    if closing_rest.strip():
        yield from _cut(closing_rest, limit)


def _hard_cut(text: str, size: int) -> Iterator[str]:
    text = text.rstrip("\n")
    for start in range(0, len(text), size):
        yield text[start : start + size]
