"""Request and response bodies of the web API; the OpenAPI document is generated from these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ChatRequest(Body):
    message: str = Field(min_length=1, max_length=32_000, description="The user's message")
    userId: str = Field(min_length=1, max_length=256, description="The caller's id for the user")
    sessionId: str | None = Field(
        None, description="Continue this session (else the user's active web session, or a new one)"
    )
    tenantId: str | None = Field(None, description="Optional; must be the key's own tenant")
    userName: str | None = Field(None, max_length=256)
    newSession: bool = Field(False, description="Start a new session even if one is active")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Passed to the agent")
    files: list[str] = Field(
        default_factory=list,
        max_length=10,
        description="fileIds of uploads (POST /api/files) to attach to the message",
    )


class AnswerFile(BaseModel):
    """A file of the agent's answer, served through the gateway (docs/api.md)."""

    name: str
    contentType: str
    size: int | None = Field(None, description="Known for bytes the agent gave")
    url: str = Field(description="A signed link (/api/answer-files/...), valid for an hour")


class AnswerAction(BaseModel):
    """A button: show the label; send the value as the next message, with metadata.action."""

    label: str
    value: str
    style: Literal["primary", "danger"] | None = None


class ChatResponse(BaseModel):
    sessionId: str
    response: str
    attachments: list[AnswerFile] | None = Field(None, description="Only when it has files")
    actions: list[AnswerAction] | None = Field(None, description="Only when it has buttons")


class SessionSummary(BaseModel):
    sessionId: str
    tenantId: str
    userId: str
    userName: str | None
    platform: str
    conversationId: str
    threadId: str | None
    createdAt: float
    lastActive: float
    messageCount: int


class TranscriptTurn(BaseModel):
    role: str
    text: str
    timestamp: float
    attachments: list[AnswerFile] | None = Field(None, description="An answer's files")
    actions: list[AnswerAction] | None = Field(None, description="An answer's buttons")


class SessionDetail(SessionSummary):
    transcript: list[TranscriptTurn]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class KeyCreateRequest(Body):
    label: str = Field("", max_length=200)


class KeyCreated(BaseModel):
    keyId: str
    key: str = Field(description="Shown once; only its hash is stored")
    label: str


class KeyInfo(BaseModel):
    keyId: str
    label: str
    createdAt: float


class TenantInfo(BaseModel):
    id: str
    name: str
    source: str = Field(description="config (from the file) or runtime (admin API)")
    agent: str = Field(description="The agent's URL or builtin name")
    web: bool
    slackApps: list[str]
    discordBots: list[str]
