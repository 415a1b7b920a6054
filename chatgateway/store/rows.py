"""What every SQL backend shares: the session columns, row converters, ids and retention."""

from __future__ import annotations

import secrets
from typing import Any

from chatgateway.models import (
    ConversationKind,
    Platform,
    Role,
    Session,
    SessionId,
    SessionKey,
    TenantId,
    Turn,
)
from chatgateway.rich import stored_turn
from chatgateway.store.base import ApiKeyRecord, SessionTranscript

SESSION_COLUMNS = (
    "id, tenant_id, platform, conversation_id, thread_id, user_id, user_name, kind, "
    "created_at, last_active, message_count"
)

#: How long a processed event id is remembered (Slack retries for about 5 minutes).
DEDUP_RETENTION = 24 * 3600.0


def new_session_id() -> SessionId:
    """An opaque, unguessable session id (144 random bits)."""
    return SessionId("s_" + secrets.token_urlsafe(18))


def session_from_row(row: tuple[Any, ...]) -> Session:
    """A Session from a row of SESSION_COLUMNS."""
    key = SessionKey(
        tenant_id=TenantId(row[1]),
        platform=Platform(row[2]),
        conversation_id=row[3],
        thread_id=row[4],
        user_id=row[5],
    )
    return Session(
        id=SessionId(row[0]),
        key=key,
        user_name=row[6],
        conversation_kind=ConversationKind(row[7]),
        created_at=row[8],
        last_active=row[9],
        message_count=row[10],
    )


def list_sessions_query(
    mark: str,
    tenant_id: TenantId,
    user_id: str | None,
    platform: Platform | None,
    limit: int,
    offset: int,
) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters of `list_sessions`; `mark` is the driver's placeholder."""
    sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant_id = {mark}"
    params: list[Any] = [tenant_id]
    if user_id is not None:
        sql += f" AND user_id = {mark}"
        params.append(user_id)
    if platform is not None:
        sql += f" AND platform = {mark}"
        params.append(platform.value)
    sql += f" ORDER BY last_active DESC LIMIT {mark} OFFSET {mark}"
    return sql, (*params, limit, offset)


def key_from_row(row: tuple[Any, ...]) -> ApiKeyRecord:
    """An ApiKeyRecord from a row of (key_id, tenant_id, key_hash, label, created_at)."""
    return ApiKeyRecord(row[0], TenantId(row[1]), row[2], row[3], row[4])


#: Claim an event unless it was processed or another owner's claim is still fresh; one
#: statement (atomic in both backends), formatted with the backend's placeholder as `p`.
CLAIM_EVENT = (
    "INSERT INTO event_claims AS c (tenant_id, platform, event_id, owner, claimed_at) "
    "SELECT {p}, {p}, {p}, {p}, {p} WHERE NOT EXISTS (SELECT 1 FROM processed_events "
    "WHERE tenant_id = {p} AND platform = {p} AND event_id = {p}) "
    "ON CONFLICT (tenant_id, platform, event_id) DO UPDATE SET "
    "owner = excluded.owner, claimed_at = excluded.claimed_at "
    "WHERE c.claimed_at < {p} OR c.owner = excluded.owner RETURNING 1"
)


#: The answer a processed event points at (`keep_answer`): a turn of the same tenant's session.
PROCESSED_ANSWER = (
    "SELECT t.role, t.text, t.ts, e.session_id FROM processed_events e "
    "JOIN turns t ON t.session_id = e.session_id "
    "AND t.seq = e.answer_seq AND t.tenant_id = e.tenant_id "
    "WHERE e.tenant_id = {p} AND e.platform = {p} AND e.event_id = {p}"
)

#: Forget the answer a processed event points at: it was posted.
ANSWER_POSTED = (
    "UPDATE processed_events SET session_id = NULL, answer_seq = NULL "
    "WHERE tenant_id = {p} AND platform = {p} AND event_id = {p} AND answer_seq IS NOT NULL"
)


def answer_from_row(row: tuple[Any, ...]) -> tuple[SessionId, Turn]:
    """`processed_answer`'s result from a PROCESSED_ANSWER row (files and buttons decoded)."""
    return SessionId(row[3]), stored_turn(row[0], row[1], row[2])


def answer_seq(turns: list[Turn], first: int) -> int | None:
    """The number of the answer among `turns` numbered from `first`: the last agent turn."""
    for index in range(len(turns) - 1, -1, -1):
        if turns[index].role == Role.AGENT:
            return first + index
    return None


def user_sessions_query(
    mark: str, tenant_id: TenantId, user_id: str, platform: Platform | None
) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters selecting one user's sessions, oldest first."""
    sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant_id = {mark} AND user_id = {mark}"
    params: tuple[Any, ...] = (tenant_id, user_id)
    if platform is not None:
        sql += f" AND platform = {mark}"
        params += (platform.value,)
    return sql + " ORDER BY created_at, id", params


def group_turns(sessions: list[Session], rows: list[tuple[Any, ...]]) -> list[SessionTranscript]:
    """Pair each session with its turns, from rows of (session_id, role, text, ts) in order."""
    turns: dict[str, list[Turn]] = {s.id: [] for s in sessions}
    for session_id, role, text, ts in rows:
        if session_id in turns:
            turns[session_id].append(stored_turn(role, text, ts))
    return [SessionTranscript(s, turns[s.id]) for s in sessions]
