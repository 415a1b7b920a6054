"""Pure Slack conversions: payloads -> NormalizedMessage, Slack text <-> Markdown, splitting.

Nothing here does I/O; the network code in adapter.py calls these functions.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Any

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
from chatgateway.text import storable, storable_message

#: Longest text sent in one Slack message. Slack cuts `text` at 40,000 characters and renders
#: messages past ~4,000 badly; 3,900 leaves room for the fences a split code block gains.
MAX_MESSAGE_CHARS = 3900

#: Message subtypes that are a person saying something; every other subtype (edits, deletions,
#: joins, bot messages, topic changes...) never reaches the agent.
_USER_SUBTYPES = frozenset({None, "file_share", "thread_broadcast"})


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who the bot is in its workspace (from auth.test)."""

    user_id: str
    bot_id: str | None = None
    team_id: str | None = None


@dataclass(frozen=True, slots=True)
class ReplyTarget:
    """Where and how to answer one incoming message."""

    channel: str
    thread_ts: str | None = None
    #: The user's message, for the working-indicator reaction (None for slash commands).
    message_ts: str | None = None
    #: A slash command's response_url (answers go there first).
    response_url: str | None = None
    #: Who asked (for an ephemeral answer when the response_url cannot be used).
    user_id: str | None = None
    #: A message in an assistant thread (an AI app's DM thread): its working indicator is
    #: the thread's status (assistant.threads.setStatus), not a reaction.
    assistant: bool = False
    #: The asker's workspace (a stream's recipient_team_id; in a Slack Connect channel it may
    #: differ from the workspace the event came from).
    team: str | None = None


@dataclass(frozen=True, slots=True)
class Inbound:
    """An incoming Slack message that should reach the agent, and where to answer it."""

    message: NormalizedMessage
    target: ReplyTarget


@dataclass(frozen=True, slots=True)
class Ignored:
    """A payload that never reaches the agent, and why (for debug logs)."""

    reason: str


# Incoming --------------------------------------------------------------------------------


def event_to_inbound(
    tenant_id: TenantId,
    body: dict[str, Any],
    identity: BotIdentity,
    *,
    app_name: str = "default",
) -> Inbound | Ignored:
    """Turn an Events API `event_callback` body into a message for the agent, or say why not.

    DMs (`message` in an `im`) and @mentions (`app_mention`) reach the agent. A mention is
    answered in a thread under it (thread_id = the thread's root ts), so later mentions in that
    thread continue the same session; a DM is one conversation whatever its threads.
    """
    event = body.get("event")
    if not isinstance(event, dict):
        return Ignored("no event")
    event_type = event.get("type")
    event_id = body.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        return Ignored("no event_id")
    if event_type not in ("message", "app_mention"):
        return Ignored(f"event {event_type}")
    subtype = event.get("subtype")
    if subtype not in _USER_SUBTYPES:
        return Ignored(f"subtype {subtype}")
    if event.get("bot_id") or event.get("bot_profile"):
        return Ignored("bot message")
    user = event.get("user")
    channel = event.get("channel")
    ts = event.get("ts")
    if not isinstance(user, str) or not isinstance(channel, str) or not isinstance(ts, str):
        return Ignored("missing user, channel or ts")
    if user == identity.user_id:
        return Ignored("own message")
    if event.get("hidden") or "edited" in event:
        return Ignored("edited or hidden")
    is_dm = event.get("channel_type") == "im" or channel.startswith("D")
    thread_ts = event.get("thread_ts") if isinstance(event.get("thread_ts"), str) else None
    if event_type == "message":
        if not is_dm:
            # Channel messages arrive as app_mention when they mention the bot.
            return Ignored("channel message without mention")
        conversation = Conversation(id=channel, kind=ConversationKind.DM)
        # Slack's AI apps converse in DM threads (bolt's own test for an assistant thread
        # message); some events also carry the thread's `assistant_thread` object.
        assistant = thread_ts is not None or isinstance(event.get("assistant_thread"), dict)
        target = ReplyTarget(
            channel=channel, thread_ts=thread_ts, message_ts=ts, assistant=assistant
        )
    else:
        if is_dm:
            # The same DM also arrives as a `message` event; answer that one only.
            return Ignored("mention in a DM")
        root = thread_ts or ts
        conversation = Conversation(id=channel, kind=ConversationKind.CHANNEL, thread_id=root)
        target = ReplyTarget(channel=channel, thread_ts=root, message_ts=ts)
    user_team = event.get("user_team") or event.get("team") or body.get("team_id")
    if isinstance(user_team, str):
        target = replace(target, team=user_team)
    raw_text = event.get("text")
    text = slack_to_text(raw_text if isinstance(raw_text, str) else "", identity.user_id)
    attachments = _files(event.get("files"), app_name)
    if not text and not attachments:
        return Ignored("empty message")
    message = NormalizedMessage(
        tenant_id=tenant_id,
        platform=Platform.SLACK,
        conversation=conversation,
        user=User(id=user, display_name=_profile_name(event.get("user_profile"))),
        text=text,
        message_id=event_id,
        timestamp=_ts_seconds(ts),
        attachments=attachments,
        metadata={
            "slack": {
                "app": app_name,
                "team": body.get("team_id") or event.get("team"),
                "channel": channel,
                "ts": ts,
                "threadTs": thread_ts,
                "eventId": event_id,
            }
        },
    )
    return Inbound(storable_message(message), target)


def command_to_inbound(
    tenant_id: TenantId,
    payload: dict[str, Any],
    *,
    command: str | None,
    app_name: str = "default",
    delivery_id: str | None = None,
) -> Inbound | Ignored:
    """Turn a slash command payload into a message for the agent, or say why not.

    The message id is the command's `trigger_id` (one per invocation, the same in every
    delivery of it), so a redelivered command is processed once.
    """
    name = payload.get("command")
    if command is None or name != command:
        return Ignored(f"command {name}")
    user = payload.get("user_id")
    channel = payload.get("channel_id")
    if not isinstance(user, str) or not isinstance(channel, str):
        return Ignored("missing user_id or channel_id")
    text = slack_to_text(str(payload.get("text") or ""), None)
    if not text:
        return Ignored("empty command")
    trigger = payload.get("trigger_id") or delivery_id
    if not isinstance(trigger, str) or not trigger:
        return Ignored("no trigger_id")
    is_dm = channel.startswith("D") or payload.get("channel_name") == "directmessage"
    kind = ConversationKind.DM if is_dm else ConversationKind.CHANNEL
    response_url = payload.get("response_url")
    user_name = payload.get("user_name")
    message = NormalizedMessage(
        tenant_id=tenant_id,
        platform=Platform.SLACK,
        conversation=Conversation(id=channel, kind=kind),
        user=User(id=user, display_name=user_name if isinstance(user_name, str) else None),
        text=text,
        message_id=f"command:{trigger}",
        timestamp=time.time(),
        metadata={
            "slack": {
                "app": app_name,
                "team": payload.get("team_id"),
                "channel": channel,
                "command": name,
            }
        },
    )
    target = ReplyTarget(
        channel=channel,
        response_url=response_url if isinstance(response_url, str) else None,
        user_id=user,
    )
    return Inbound(storable_message(message), target)


def strip_mention(text: str, bot_user_id: str | None) -> str:
    """Remove the bot's own @mention(s) from Slack text."""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>", " ", text)
    return re.sub(r"[ \t]+", " ", text).strip()


_SLACK_TOKEN = re.compile(r"<([^<>\n]+)>")


def slack_to_text(text: str, bot_user_id: str | None) -> str:
    """Slack message text as plain text for the agent: the bot's mention stripped, other
    mentions, channels and links made readable, HTML entities decoded."""
    text = strip_mention(text, bot_user_id)

    def token(match: re.Match[str]) -> str:
        inner = match.group(1)
        target, _, label = inner.partition("|")
        if target.startswith("@"):
            return f"@{label}" if label else target
        if target.startswith("#"):
            return f"#{label}" if label else target
        if target.startswith("!"):
            if target.startswith("!subteam^"):
                return label or "@group"
            if target.startswith("!date^"):
                return label
            return "@" + target[1:]
        if target.startswith("mailto:"):
            return label or target[len("mailto:") :]
        if label and label != target:
            return f"[{label}]({target})"
        return target

    text = _SLACK_TOKEN.sub(token, text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").strip()


def _profile_name(profile: Any) -> str | None:
    if not isinstance(profile, dict):
        return None
    for key in ("display_name", "real_name", "name"):
        value = profile.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def user_display_name(user: dict[str, Any]) -> str | None:
    """The name to show for a users.info `user` object."""
    profile = user.get("profile")
    name = _profile_name(profile) if isinstance(profile, dict) else None
    if name:
        return storable(name)
    for key in ("real_name", "name"):
        value = user.get(key)
        if isinstance(value, str) and value:
            return storable(value)
    return None


def _files(files: Any, app_name: str) -> tuple[Attachment, ...]:
    """The event's files; `url_private` is kept as the gateway's source only (it needs the
    app's bot token): the agent gets a gateway link instead (chatgateway/files.py)."""
    if not isinstance(files, list):
        return ()
    out = []
    for item in files:
        if not isinstance(item, dict):
            continue
        size, mimetype, url = item.get("size"), item.get("mimetype"), item.get("url_private")
        out.append(
            Attachment(
                name=str(item.get("name") or item.get("title") or "file"),
                content_type=mimetype if isinstance(mimetype, str) else None,
                size=size if isinstance(size, int) else None,
                source=FileSource(app_name, url) if isinstance(url, str) else None,
            )
        )
    return tuple(out)


def _ts_seconds(ts: str) -> float:
    try:
        return float(ts)
    except ValueError:
        return time.time()


# Outgoing: Markdown -> mrkdwn ----------------------------------------------------------

#: A fenced block; a language tag (```python) is dropped, Slack does not use it.
_FENCED = re.compile(r"```(?:[ \t]*[\w+#.-]+[ \t]*(?=\n))?\n?(.*?)(?:\n?```|\Z)", re.S)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_MD_LINK = re.compile(r"\[([^\]\n]+)\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^<>\s]+)>")
_BARE_URL = re.compile(r"(?<![\w/|<])(https?://[^\s<>()\[\]]+[^\s<>()\[\].,;:!?'\"])")
_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
_BULLET = re.compile(r"^([ \t]*)[-*+][ \t]+(?=\S)", re.M)
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)")
_ITALIC = re.compile(r"(?<![*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![*\w])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_HRULE = re.compile(r"^[ \t]*(?:-[ \t]*){3,}$|^[ \t]*(?:\*[ \t]*){3,}$", re.M)
_PLACEHOLDER = re.compile("\x00(\\d+)\x00")
_BOLD_MARK = "\x01"


def escape(text: str) -> str:
    """Escape the three characters Slack treats as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def markdown_to_mrkdwn(text: str) -> str:
    """Convert an agent's basic Markdown (bold, italics, strike, links, code, headings,
    bullets) to Slack mrkdwn, escaping &, < and > everywhere else. Code is kept verbatim."""
    text = text.replace("\x00", "").replace(_BOLD_MARK, "").replace("\r\n", "\n")
    saved: list[str] = []

    def keep(rendered: str) -> str:
        saved.append(rendered)
        return f"\x00{len(saved) - 1}\x00"

    def fenced(match: re.Match[str]) -> str:
        body = match.group(1).rstrip("\n")
        return keep("```\n" + escape(body) + "\n```")

    text = _FENCED.sub(fenced, text)
    text = _INLINE_CODE.sub(lambda m: keep("`" + escape(m.group(1)) + "`"), text)
    text = _MD_LINK.sub(
        lambda m: keep(f"<{escape(m.group(2))}|{escape(m.group(1)).replace('|', '¦')}>"), text
    )
    text = _AUTOLINK.sub(lambda m: keep(f"<{escape(m.group(1))}>"), text)
    text = _BARE_URL.sub(lambda m: keep(f"<{escape(m.group(1))}>"), text)
    text = escape(text)
    text = _HRULE.sub("──────────", text)
    text = _HEADING.sub(
        lambda m: f"{_BOLD_MARK}{m.group(1).replace('**', '')}{_BOLD_MARK}", text
    )
    text = _BULLET.sub(lambda m: f"{m.group(1)}• ", text)
    text = _BOLD.sub(lambda m: f"{_BOLD_MARK}{m.group(1) or m.group(2)}{_BOLD_MARK}", text)
    text = _ITALIC.sub(lambda m: f"_{m.group(1)}_", text)
    text = _STRIKE.sub(lambda m: f"~{m.group(1)}~", text)
    text = text.replace(_BOLD_MARK, "*")
    while _PLACEHOLDER.search(text):
        text = _PLACEHOLDER.sub(lambda m: saved[int(m.group(1))], text)
    return text


# Outgoing: splitting -------------------------------------------------------------------

_FENCE = "```"


def split_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> list[str]:
    """Split mrkdwn into messages of at most `limit` characters.

    Splits fall between paragraphs, then lines, then words, and never inside a code block
    that fits in one message; a code block longer than a message is cut between its lines
    and each piece is closed and reopened, so every message renders on its own.
    """
    if limit < 40:
        raise ValueError("limit is too small")
    text = text.strip("\n")
    if not text.strip():
        return []
    if len(text) <= limit:
        return [text]
    chunks: list[str] = []
    current = ""
    for separator, kind, unit in _units(text):
        pieces = [unit] if len(unit) <= limit else _split_unit(kind, unit, limit)
        for index, piece in enumerate(pieces):
            sep = separator if index == 0 else "\n"
            if current and len(current) + len(sep) + len(piece) <= limit:
                current += sep + piece
            else:
                if current:
                    chunks.append(current)
                current = piece
    if current:
        chunks.append(current)
    return [c.strip("\n") for c in chunks if c.strip()]


def _units(text: str) -> list[tuple[str, str, str]]:
    """(separator before, kind, text) for each paragraph and each whole code block."""
    units: list[tuple[str, str, str]] = []
    pos = 0
    for start, end in _code_spans(text):
        segment = text[pos:start]
        units += [(sep, "text", part) for sep, part in _paragraphs(segment)]
        block = text[start:end]
        if len(block) < 2 * len(_FENCE) or not block.endswith(_FENCE):
            block += "\n" + _FENCE  # an unterminated block is closed
        sep = "\n\n" if re.search(r"\n[ \t]*\n[ \t]*$", segment) else "\n"
        units.append((sep, "code", block))
        pos = end
    units += [(sep, "text", part) for sep, part in _paragraphs(text[pos:])]
    return units


def _paragraphs(segment: str) -> list[tuple[str, str]]:
    out = []
    for index, part in enumerate(re.split(r"\n[ \t]*\n+", segment)):
        part = part.strip("\n")
        if part.strip():
            out.append(("\n\n" if index else "\n", part))
    return out


def _code_spans(text: str) -> list[tuple[int, int]]:
    """Start and end offsets of each ``` block (an unterminated one runs to the end)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while True:
        start = text.find(_FENCE, pos)
        if start < 0:
            return spans
        close = text.find(_FENCE, start + len(_FENCE))
        end = len(text) if close < 0 else close + len(_FENCE)
        spans.append((start, end))
        pos = end


def _split_unit(kind: str, unit: str, limit: int) -> list[str]:
    if kind == "code":
        return _split_code(unit, limit)
    return _split_text(unit, limit)


def _split_text(text: str, limit: int) -> list[str]:
    pieces: list[str] = []
    current = ""
    for line in text.split("\n"):
        for part in [line] if len(line) <= limit else _split_words(line, limit):
            if current and len(current) + 1 + len(part) <= limit:
                current += "\n" + part
            else:
                if current:
                    pieces.append(current)
                current = part
    if current:
        pieces.append(current)
    return pieces


def _split_words(line: str, limit: int) -> list[str]:
    pieces: list[str] = []
    current = ""
    for word in re.split(r"(?<=\s)", line):  # each word keeps its trailing whitespace
        while len(word) > limit:  # one over-long token: cut it, but not inside &amp; or <link>
            if current:
                pieces.append(current.rstrip())
                current = ""
            cut = _safe_cut(word, limit)
            pieces.append(word[:cut])
            word = word[cut:]
        if len(current) + len(word) > limit:
            pieces.append(current.rstrip())
            current = ""
        current += word
    pieces.append(current.rstrip())
    return [p for p in pieces if p.strip()]


def _safe_cut(word: str, at: int) -> int:
    """A cut position <= at that does not split an &entity; or a short <link|label>."""
    amp = word.rfind("&", max(0, at - 5), at)
    if amp > 0 and word.find(";", amp, amp + 6) >= at:
        return amp
    lt = word.rfind("<", max(0, at - 500), at)
    if lt > 0 and word.find(">", lt) >= at:
        return lt
    return at


def _split_code(block: str, limit: int) -> list[str]:
    inner = block[len(_FENCE) : -len(_FENCE)].strip("\n")
    budget = limit - len("```\n\n```")
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in inner.split("\n"):
        chunks = [line[i : i + budget] for i in range(0, len(line), budget)] or [""]
        for chunk in chunks:
            extra = len(chunk) + (1 if current else 0)
            if current and size + extra > budget:
                pieces.append("```\n" + "\n".join(current) + "\n```")
                current, size = [], 0
                extra = len(chunk)
            current.append(chunk)
            size += extra
    if current:
        pieces.append("```\n" + "\n".join(current) + "\n```")
    return pieces
