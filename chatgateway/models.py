"""The normalized message and the other values that flow between adapters and the core."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NewType

TenantId = NewType("TenantId", str)
SessionId = NewType("SessionId", str)


class Platform(enum.StrEnum):
    WEB = "web"
    SLACK = "slack"
    DISCORD = "discord"


class ConversationKind(enum.StrEnum):
    DM = "dm"
    CHANNEL = "channel"
    WEB = "web"


class Role(enum.StrEnum):
    USER = "user"
    AGENT = "agent"


@dataclass(frozen=True, slots=True)
class Conversation:
    """Where a message was said: a DM, a channel (optionally a thread in it) or a web chat."""

    id: str
    kind: ConversationKind
    thread_id: str | None = None


@dataclass(frozen=True, slots=True)
class User:
    id: str
    display_name: str | None = None


@dataclass(frozen=True, slots=True)
class FileSource:
    """Where a file is on its platform, for the gateway only (never sent to an agent): the
    adapter that received it (Slack app, Discord bot, "web") and its reference there (Slack's
    url_private, a Discord attachment URL, a web upload's id)."""

    adapter: str
    ref: str


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file attached to a message. `url` is what the agent may fetch (a gateway link, see
    chatgateway/files.py); `data` the base64 bytes of a small image when the tenant inlines."""

    name: str
    content_type: str | None = None
    size: int | None = None
    url: str | None = None
    source: FileSource | None = None
    data: str | None = None


@dataclass(frozen=True, slots=True)
class NormalizedMessage:
    """One incoming message, the same shape whatever platform it came from."""

    tenant_id: TenantId
    platform: Platform
    conversation: Conversation
    user: User
    text: str
    message_id: str
    timestamp: float
    attachments: tuple[Attachment, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionKey:
    """What makes two messages part of the same session: one user in one conversation/thread."""

    tenant_id: TenantId
    platform: Platform
    conversation_id: str
    thread_id: str
    user_id: str

    @classmethod
    def of(cls, message: NormalizedMessage) -> SessionKey:
        return cls(
            tenant_id=message.tenant_id,
            platform=message.platform,
            conversation_id=message.conversation.id,
            thread_id=message.conversation.thread_id or "",
            user_id=message.user.id,
        )


@dataclass(frozen=True, slots=True)
class OutFile:
    """A file in an agent's answer: the gateway fetches `url`, or the agent gave the bytes."""

    name: str
    content_type: str
    url: str | None = None
    data: bytes | None = None

    def __repr__(self) -> str:  # never the bytes (logs, test failures)
        size = "url" if self.data is None else f"{len(self.data)} bytes"
        return f"OutFile({self.name!r}, {self.content_type!r}, {size})"


@dataclass(frozen=True, slots=True)
class Action:
    """A button in an agent's answer: `label` shown, `value` sent back when chosen."""

    label: str
    value: str
    #: "primary" or "danger" (platforms that can show it), else None.
    style: str | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    text: str
    timestamp: float
    #: An agent turn's files and buttons (chatgateway.rich), kept with the transcript.
    files: tuple[OutFile, ...] = ()
    actions: tuple[Action, ...] = ()


@dataclass(slots=True)
class Session:
    """A conversation between one user and a tenant's agent; mutable only inside the store."""

    id: SessionId
    key: SessionKey
    created_at: float
    last_active: float
    user_name: str | None = None
    conversation_kind: ConversationKind = ConversationKind.WEB
    message_count: int = 0

    @property
    def tenant_id(self) -> TenantId:
        return self.key.tenant_id

    @property
    def user_id(self) -> str:
        return self.key.user_id

    @property
    def platform(self) -> Platform:
        return self.key.platform
