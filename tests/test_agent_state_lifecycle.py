"""Per-session rows die with their session: an agent protocol's memory (`agent_state`, A2A's
open task) and the answers an agent still owed it (`agent_callbacks`).

Every way a session is deleted takes them with it, on both stores: a leftover row would outlive
the user's erasure or the retention period, and a tenant deleted and then created again would
find the old tenant's open tasks.
"""

from __future__ import annotations

import time

from chatgateway.config import TenantConfig
from chatgateway.models import ConversationKind, Platform, SessionId, SessionKey, TenantId
from chatgateway.retention import DAY, prune_expired
from chatgateway.store.base import SessionStore
from chatgateway.tenants import TenantRegistry
from tests.test_store import A, B, store  # noqa: F401  (the backend-parametrized fixture)


async def new_session(
    s: SessionStore, tenant: TenantId, user: str, *, at: float | None = None
) -> SessionId:
    """A web session of `user` with an open A2A task kept for it and an answer it is owed (the
    callback's id is the session's)."""
    now = time.time() if at is None else at
    key = SessionKey(tenant, Platform.WEB, f"c-{user}-{now}", "", user)
    session = await s.create_session(key, kind=ConversationKind.WEB, user_name=None, now=now)
    await s.set_agent_state(tenant, session.id, f"task-of-{user}", now=now)
    await s.add_callback(tenant, session.id, session.id, None, expires_at=now + 60, now=now)
    return session.id


async def owed(s: SessionStore, tenant: TenantId, session: SessionId) -> bool:
    return await s.get_callback(tenant, session) is not None


async def test_deleting_a_session_deletes_its_agent_state(store: SessionStore) -> None:  # noqa: F811
    gone = await new_session(store, A, "u1")
    kept = await new_session(store, A, "u2")
    other = await new_session(store, B, "u1")
    assert await store.delete_session(A, gone)
    assert await store.agent_state(A, gone) is None
    assert not await owed(store, A, gone)
    assert await store.agent_state(A, kept) == "task-of-u2"
    assert await owed(store, A, kept)
    assert await store.agent_state(B, other) == "task-of-u1"
    # Another tenant cannot delete it (nor its state) by naming its id.
    assert not await store.delete_session(B, kept)
    assert await store.agent_state(A, kept) == "task-of-u2"


async def test_erasing_a_user_deletes_their_sessions_agent_state(store: SessionStore) -> None:  # noqa: F811
    first = await new_session(store, A, "erased")
    second = await new_session(store, A, "erased")
    kept = await new_session(store, A, "u2")
    same_user_elsewhere = await new_session(store, B, "erased")
    erased = await store.erase_user(A, "erased")
    assert erased["sessions"] == 2
    assert await store.agent_state(A, first) is None
    assert await store.agent_state(A, second) is None
    assert not await owed(store, A, first)
    assert await store.agent_state(A, kept) == "task-of-u2"
    assert await owed(store, A, kept)
    assert await store.agent_state(B, same_user_elsewhere) == "task-of-erased"


async def test_retention_pruning_deletes_the_rows_of_pruned_sessions(
    store: SessionStore,  # noqa: F811
) -> None:
    registry = TenantRegistry(store, {})
    await registry.load(
        [
            TenantConfig.model_validate(
                {"id": "short", "agent": {"builtin": "echo"}, "sessions": {"retention_days": 1}}
            ),
            TenantConfig.model_validate({"id": "long", "agent": {"builtin": "echo"}}),  # 30 days
        ]
    )
    short, long = TenantId("short"), TenantId("long")
    start = time.time()
    old = await new_session(store, short, "u1", at=start)
    recent = await new_session(store, short, "u2", at=start + 2 * DAY)
    other = await new_session(store, long, "u1", at=start)
    assert await prune_expired(store, registry.all(), start + DAY + 1) == {"short": 1, "long": 0}
    assert await store.agent_state(short, old) is None
    assert not await owed(store, short, old)
    assert await store.agent_state(short, recent) == "task-of-u2"
    assert await owed(store, short, recent)
    assert await store.agent_state(long, other) == "task-of-u1"
    assert await owed(store, long, other)
    await registry.close()


async def test_deleting_or_purging_a_tenant_deletes_its_sessions_rows(store: SessionStore) -> None:  # noqa: F811
    deleted = await new_session(store, A, "u1")
    other = await new_session(store, B, "u1")
    await store.delete_tenant(A)
    assert await store.agent_state(A, deleted) is None
    assert not await owed(store, A, deleted)
    assert await store.agent_state(B, other) == "task-of-u1"
    assert await owed(store, B, other)
    counts = await store.purge_tenant(B)
    assert counts["agent_state"] == 1 and counts["agent_callbacks"] == 1
    assert await store.agent_state(B, other) is None
