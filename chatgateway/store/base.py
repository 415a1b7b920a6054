"""The storage interface every backend implements; every method is scoped by tenant."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from chatgateway.models import (
    ConversationKind,
    Platform,
    Session,
    SessionId,
    SessionKey,
    TenantId,
    Turn,
)


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """A tenant registered at runtime through the admin API: its raw (unresolved) definition."""

    tenant_id: TenantId
    spec: dict[str, Any]
    created_at: float
    updated_at: float


#: Adds a day's usage to a tenant's counters (both backends; `{p}` is the placeholder).
ADD_USAGE = (
    "INSERT INTO agent_usage VALUES ({p}, {p}, {p}, {p}, {p}) ON CONFLICT (tenant_id, day) "
    "DO UPDATE SET calls = agent_usage.calls + excluded.calls, "
    "tokens_in = agent_usage.tokens_in + excluded.tokens_in, "
    "tokens_out = agent_usage.tokens_out + excluded.tokens_out"
)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """A tenant's agent usage on one UTC day (`day`: YYYY-MM-DD)."""

    day: str
    calls: int
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str
    tenant_id: TenantId
    key_hash: str
    label: str
    created_at: float


#: The states of an agent callback (chatgateway/callbacks.py). Open: the session's answer is
#: still to be shown, so its next message waits.
CALLBACK_OPEN = ("pending", "received", "delivering")


@dataclass(frozen=True, slots=True)
class CallbackRecord:
    """An answer an agent promised to send later (it answered 202 Accepted).

    `state`: pending (waiting for the agent), received (the final text is here, to be shown),
    delivering (an instance claimed the delivery at `claimed_at`), delivered. `text`: the
    progress so far while pending, then the final answer (the fallback text when `expired`).
    `session_id` is "" for a final that arrived before its message's row was written.
    """

    tenant_id: TenantId
    callback_id: str
    session_id: SessionId
    address: dict[str, Any] | None
    created_at: float
    expires_at: float
    state: str
    text: str | None
    expired: bool
    owner: str | None
    claimed_at: float | None


#: The columns `callback_from_row` reads, in order.
CALLBACK_COLUMNS = (
    "tenant_id, id, session_id, address, created_at, expires_at, state, text, expired, owner, "
    "claimed_at"
)


def callback_from_row(row: tuple[Any, ...]) -> CallbackRecord:
    return CallbackRecord(
        TenantId(row[0]),
        str(row[1]),
        SessionId(row[2]),
        json.loads(row[3]) if row[3] else None,
        float(row[4]),
        float(row[5]),
        str(row[6]),
        row[7],
        bool(row[8]),
        row[9],
        row[10],
    )


@dataclass(frozen=True, slots=True)
class SessionTranscript:
    """One session with every turn the store keeps of it, oldest first (a user's export)."""

    session: Session
    turns: list[Turn]


class SessionStore(Protocol):
    """Persistence for the gateway. No method can return another tenant's rows."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # Sessions and transcripts.
    async def find_active_session(self, key: SessionKey, *, idle_since: float) -> Session | None:
        """Return the key's most recent session if it was active after `idle_since`."""

    async def get_session(self, tenant_id: TenantId, session_id: SessionId) -> Session | None: ...

    async def create_session(
        self, key: SessionKey, *, kind: ConversationKind, user_name: str | None, now: float
    ) -> Session:
        """Create and durably store a new session with an unguessable id."""

    async def record_exchange(
        self,
        tenant_id: TenantId,
        session_id: SessionId,
        turns: list[Turn],
        *,
        max_turns: int,
        processed_event: tuple[Platform, str] | None = None,
        keep_answer: bool = False,
    ) -> None:
        """Append turns, bump the session, mark the event processed; durable on return.

        `keep_answer`: the processed event also points at the exchange's answer (its last agent
        turn), for `processed_answer`."""

    async def history(self, tenant_id: TenantId, session_id: SessionId, limit: int) -> list[Turn]:
        """The last `limit` turns, oldest first."""

    async def list_sessions(
        self,
        tenant_id: TenantId,
        *,
        user_id: str | None = None,
        platform: Platform | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Session]: ...

    async def delete_session(self, tenant_id: TenantId, session_id: SessionId) -> bool:
        """Delete the session with its rows (turns, agent_state, agent_callbacks)."""

    async def count_sessions(self, tenant_id: TenantId, *, active_since: float = 0.0) -> int: ...

    async def count_sessions_by_platform(
        self, tenant_id: TenantId, *, active_since: float = 0.0
    ) -> dict[Platform, int]:
        """Sessions active since `active_since`, by platform (platforms with none are left out)."""

    async def prune(self, tenant_id: TenantId, *, idle_before: float) -> int:
        """Delete sessions last active before `idle_before`, with their rows (turns,
        agent_state, agent_callbacks)."""

    # Exactly-once processing of platform events.
    async def is_processed(
        self, tenant_id: TenantId, platform: Platform, event_id: str
    ) -> bool: ...

    async def processed_answer(
        self, tenant_id: TenantId, platform: Platform, event_id: str
    ) -> tuple[SessionId, Turn] | None:
        """The answer kept with a processed event (`keep_answer`) and its session, while the
        session still has that turn; None if none was kept, the event is unknown or the turn
        is gone."""

    async def answer_posted(self, tenant_id: TenantId, platform: Platform, event_id: str) -> None:
        """The answer kept with the event is out (its post returned): a replay no longer needs
        it (`processed_answer` answers None from now on)."""

    async def claim_event(
        self,
        tenant_id: TenantId,
        platform: Platform,
        event_id: str,
        owner: str,
        now: float,
        *,
        stale_before: float,
    ) -> bool:
        """Claim an event for `owner` (an instance id); False if it was processed, or another
        owner claimed it at or after `stale_before` (an older claim's owner is presumed dead)."""

    # Runtime tenants (the admin API's view spans tenants by design).
    async def list_tenants(self) -> list[TenantRecord]: ...

    async def save_tenant(self, record: TenantRecord) -> None: ...

    async def delete_tenant(self, tenant_id: TenantId) -> None:
        """Delete a runtime tenant with its keys, sessions and their rows (turns, agent_state,
        agent_callbacks)."""

    # API keys, stored as hashes only.
    async def add_api_key(self, record: ApiKeyRecord) -> None: ...

    async def find_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    async def list_api_keys(self, tenant_id: TenantId) -> list[ApiKeyRecord]: ...

    async def delete_api_key(self, tenant_id: TenantId, key_id: str) -> bool: ...

    # Gateway-wide settings (not tenant data), e.g. the generated visitor-token secret.
    async def gateway_setting(self, name: str, default: str) -> str:
        """Return the setting `name`, durably storing `default` first if it has no value."""

    # Customers' data (docs/operations.md): offboarding, and a user's export and erasure.
    async def purge_tenant(self, tenant_id: TenantId) -> dict[str, int]:
        """Delete the tenant's rows from every table with a tenant_id; the count per table."""

    async def export_user(
        self, tenant_id: TenantId, user_id: str, *, platform: Platform | None = None
    ) -> list[SessionTranscript]:
        """Every session of one user (on one platform, or all) with its whole transcript."""

    async def erase_user(
        self, tenant_id: TenantId, user_id: str, *, platform: Platform | None = None
    ) -> dict[str, int]:
        """Delete one user's sessions with their rows (turns, agent_state, agent_callbacks);
        the count of sessions and turns."""

    # Agent usage by UTC day.
    async def add_usage(
        self, tenant_id: TenantId, day: str, *, calls: int, tokens_in: int, tokens_out: int
    ) -> None:
        """Add to the tenant's usage counters of `day` (YYYY-MM-DD), creating the day's row."""

    async def usage(self, tenant_id: TenantId, first: str, last: str) -> list[UsageRecord]:
        """The tenant's days from `first` to `last` (inclusive) that have usage, oldest first."""

    # What an agent protocol keeps per session between messages (e.g. an open A2A task).
    async def agent_state(self, tenant_id: TenantId, session_id: SessionId) -> str | None: ...

    async def set_agent_state(
        self, tenant_id: TenantId, session_id: SessionId, value: str | None, *, now: float
    ) -> None:
        """Keep `value` for the session (None forgets it); durable on return."""

    # Agent callbacks: answers an agent sends later (chatgateway/callbacks.py).
    async def add_callback(
        self,
        tenant_id: TenantId,
        callback_id: str,
        session_id: SessionId,
        address: dict[str, Any] | None,
        *,
        expires_at: float,
        now: float,
    ) -> CallbackRecord:
        """Record a pending callback of `session_id`; durable on return. If its final answer
        arrived first (an early row), the row is completed and returned as it is (received)."""

    async def receive_callback(
        self,
        tenant_id: TenantId,
        callback_id: str,
        text: str,
        *,
        now: float,
        final: bool = True,
        expired: bool = False,
        early_expires_at: float | None = None,
    ) -> str:
        """Take an agent's answer, atomically. `final`: the first final wins ("accepted"); a
        later one is "already" ("expired" if the fallback was given). Not final: appended to
        the progress ("accepted"), or "already"/"expired" once final. `expired`: the fallback
        `text` as the final, only once the row is past its expiry. An unknown id is "unknown",
        unless `early_expires_at` is given: then a final is kept as an early row (accepted)."""

    async def claim_callback(
        self, tenant_id: TenantId, callback_id: str, owner: str, *, now: float, stale_before: float
    ) -> CallbackRecord | None:
        """Claim a received answer's delivery for `owner` (or one whose claim is older than
        `stale_before`); None when there is nothing to deliver or another owner has it."""

    async def settle_callback(
        self, tenant_id: TenantId, callback_id: str, owner: str, *, delivered: bool, now: float
    ) -> None:
        """End `owner`'s claim: delivered, or handed back (received) for another instance."""

    async def get_callback(self, tenant_id: TenantId, callback_id: str) -> CallbackRecord | None:
        ...

    async def latest_callback(
        self, tenant_id: TenantId, session_id: SessionId
    ) -> CallbackRecord | None:
        """The session's most recent callback."""

    async def open_callbacks(self, tenant_id: TenantId) -> list[CallbackRecord]:
        """The tenant's callbacks whose answer is not shown yet (states CALLBACK_OPEN)."""

    async def due_callbacks(
        self, tenant_id: TenantId, *, now: float, stale_before: float, limit: int = 100
    ) -> list[CallbackRecord]:
        """Callbacks needing the sweep: pending past expiry, received, or a stale claim."""

    async def prune_callbacks(self, tenant_id: TenantId, *, before: float) -> int:
        """Delete delivered callbacks last changed before `before`, and early rows expired."""
