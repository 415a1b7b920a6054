"""The supervisor with a coordinator, at the edges: the hand-over at the start of a drain, and an
adapter that ignores cancellation (reported as in single-instance mode, and its lease kept).

Two supervisors sharing one LocalCoordinator stand in for two instances sharing a database (as in
test_supervisor_lease.py); the hand-over across real processes is in test_cluster_handover.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from structlog.testing import capture_logs

from chatgateway.adapter import AdapterState, AdapterStatus
from chatgateway.config import DiscordBotConfig
from chatgateway.coordination import LocalCoordinator
from chatgateway.metrics import Metrics
from chatgateway.models import Platform, TenantId
from chatgateway.supervisor import Supervisor, lease_name
from tests.test_lifecycle_supervisor import (
    ScriptedAdapter,
    _scripted,  # noqa: F401  (autouse fixture)
    bot,
    factory,
    tenant_config,
    wait_until,
)

KEY = (TenantId("acme"), Platform.DISCORD, "main")


class AnsweringAdapter:
    """A platform connection with an answer in flight: stop() leaves the platform at once
    (state `connecting`, like discord.py after its gateway closed) and returns only once the
    answer was sent (`answered` set)."""

    instances: ClassVar[list[AnsweringAdapter]] = []

    def __init__(self, tenant_id: TenantId, settings: DiscordBotConfig, pipeline: Any) -> None:
        self.status = AdapterStatus(tenant_id, Platform.DISCORD, settings.name)
        self.answered = asyncio.Event()
        self.left_while_answering = False
        self._stopped = asyncio.Event()
        AnsweringAdapter.instances.append(self)

    async def run(self) -> None:
        self.status.state = AdapterState.CONNECTED
        await self._stopped.wait()

    async def stop(self) -> None:
        self.status.state = AdapterState.CONNECTING  # left the gateway
        self.left_while_answering = not self.answered.is_set()
        await self.answered.wait()
        self._stopped.set()

    def alive(self) -> bool:
        return True


def answering(tenant_id: TenantId, platform: Platform, settings: Any) -> AnsweringAdapter:
    return AnsweringAdapter(tenant_id, settings, None)


def state(sup: Supervisor) -> AdapterState:
    [status] = sup.statuses()
    return status.state


async def test_a_drain_hands_the_bot_over_at_once_while_the_answer_in_flight_finishes():
    AnsweringAdapter.instances = []
    shared = LocalCoordinator()
    a = Supervisor(answering, Metrics(), shared, standby_retry=0.02)
    b = Supervisor(answering, Metrics(), shared, standby_retry=0.02)
    config = tenant_config("acme", bot("main", "ok:x"))
    try:
        await a.tenant_changed(None, config)
        await wait_until(lambda: state(a) == AdapterState.CONNECTED)
        await b.tenant_changed(None, config)
        await wait_until(lambda: state(b) == AdapterState.STANDBY)
        first = AnsweringAdapter.instances[0]

        with capture_logs() as logs:
            await asyncio.wait_for(a.hand_over(), 2)
        # Released once the adapter left, while its answer is still on its way.
        assert not first.answered.is_set() and first.left_while_answering
        handed = [e for e in logs if e["event"] == "adapter_handed_over"]
        assert handed and handed[0]["lease"] == lease_name(KEY)
        await wait_until(lambda: state(b) == AdapterState.CONNECTED, within=2)
        assert len(AnsweringAdapter.instances) == 2
        # The drain ends, the answer was sent: stop_all finishes the stop the hand-over began.
        first.answered.set()
        await asyncio.wait_for(a.stop_all(), 2)
        assert state(b) == AdapterState.CONNECTED
    finally:
        for adapter in AnsweringAdapter.instances:
            adapter.answered.set()
        await a.stop_all()
        await b.stop_all()


async def test_a_draining_instance_in_standby_takes_nothing_over():
    AnsweringAdapter.instances = []
    shared = LocalCoordinator()
    a = Supervisor(answering, Metrics(), shared, standby_retry=0.02)
    b = Supervisor(answering, Metrics(), shared, standby_retry=0.02)
    config = tenant_config("acme", bot("main", "ok:x"))
    try:
        await a.tenant_changed(None, config)
        await wait_until(lambda: state(a) == AdapterState.CONNECTED)
        await b.tenant_changed(None, config)
        await wait_until(lambda: state(b) == AdapterState.STANDBY)
        await b.hand_over()  # b begins to drain
        AnsweringAdapter.instances[0].answered.set()
        await a.stop_all()  # the owner goes: the lease is free
        await asyncio.sleep(0.2)
        assert len(AnsweringAdapter.instances) == 1, "the draining standby connected the bot"
        assert await shared.try_lease(lease_name(KEY), ttl=10) is not None
    finally:
        for adapter in AnsweringAdapter.instances:
            adapter.answered.set()
        await a.stop_all()
        await b.stop_all()


async def test_hand_over_without_a_coordinator_leaves_everything_to_stop_all():
    AnsweringAdapter.instances = []
    sup = Supervisor(answering, Metrics())
    try:
        await sup.tenant_changed(None, tenant_config("acme", bot("main", "ok:x")))
        await wait_until(lambda: state(sup) == AdapterState.CONNECTED)
        await sup.hand_over()
        assert state(sup) == AdapterState.CONNECTED
    finally:
        for adapter in AnsweringAdapter.instances:
            adapter.answered.set()
        await sup.stop_all()


async def test_a_wedged_leased_adapter_is_reported_and_keeps_its_lease_until_it_ends():
    """In cluster mode run() is wrapped in a future (to watch the lease too); an adapter that
    ignores cancellation must still be reported as in single-instance mode, and another instance
    must not connect the bot while it may still be connected here."""
    shared = LocalCoordinator()
    sup = Supervisor(factory, Metrics(), shared, alive_grace=0.01, stop_timeout=0.05,
                     standby_retry=0.02)
    try:
        await sup.tenant_changed(None, tenant_config("acme", bot("main", "wedge:x")))
        await wait_until(lambda: bool(ScriptedAdapter.instances))
        wedged = ScriptedAdapter.instances[0]
        await wait_until(lambda: wedged.status.state == AdapterState.CONNECTED)

        with capture_logs() as logs:
            await wait_until(lambda: not sup.check().ok)
        stuck = [e for e in logs if e["event"] == "adapter_task_stuck"]
        assert stuck and stuck[0]["adapter"] == "main" and stuck[0]["platform"] == "discord"
        assert "ignores cancellation" in sup.check().problems[0]
        assert wedged.status.state == AdapterState.STOPPED
        # The restarted adapter waits: the wedged one's lease is still held.
        assert lease_name(KEY) in shared._leases
        await asyncio.sleep(0.1)
        assert len(ScriptedAdapter.instances) == 1
        assert state(sup) == AdapterState.STANDBY

        assert ScriptedAdapter.released is not None
        ScriptedAdapter.released.set()
        await wait_until(lambda: sup.check().ok)
        # Once it really ended, the lease is free and the bot is connected again here.
        await wait_until(lambda: len(ScriptedAdapter.instances) == 2, within=2)
    finally:
        assert ScriptedAdapter.released is not None
        ScriptedAdapter.released.set()
        await sup.stop_all()


async def test_a_leased_adapter_ignoring_cancellation_after_losing_its_lease_is_reported():
    shared = LocalCoordinator()
    sup = Supervisor(factory, Metrics(), shared, stop_timeout=0.05, standby_retry=0.02)
    try:
        await sup.tenant_changed(None, tenant_config("acme", bot("main", "wedge:x")))
        await wait_until(lambda: bool(ScriptedAdapter.instances))
        await wait_until(lambda: ScriptedAdapter.instances[0].status.state
                         == AdapterState.CONNECTED)
        with capture_logs() as logs:
            await shared._leases[lease_name(KEY)].release()  # lost (e.g. renewals too late)
            await wait_until(lambda: not sup.check().ok)
        assert any(e["event"] == "adapter_task_stuck" for e in logs)
        assert "ignores cancellation" in sup.check().problems[0]
        assert ScriptedAdapter.released is not None
        ScriptedAdapter.released.set()
        await wait_until(lambda: sup.check().ok)
    finally:
        assert ScriptedAdapter.released is not None
        ScriptedAdapter.released.set()
        await sup.stop_all()


async def test_an_adapter_that_does_not_leave_keeps_its_lease_through_the_hand_over():
    """Released only once the adapter has left: one that stays connected (its stop() hangs)
    keeps the bot's lease, so no second instance connects it meanwhile."""
    shared = LocalCoordinator()
    sup = Supervisor(factory, Metrics(), shared, stop_timeout=0.2, standby_retry=0.02)
    try:
        await sup.tenant_changed(None, tenant_config("acme", bot("main", "wedge:x")))
        await wait_until(lambda: bool(ScriptedAdapter.instances))
        wedged = ScriptedAdapter.instances[0]
        await wait_until(lambda: wedged.status.state == AdapterState.CONNECTED)
        with capture_logs() as logs:
            await asyncio.wait_for(sup.hand_over(), 2)
        assert not any(e["event"] == "adapter_handed_over" for e in logs)
        assert lease_name(KEY) in shared._leases, "released while still connected"
        assert await shared.try_lease(lease_name(KEY), ttl=10) is None
    finally:
        assert ScriptedAdapter.released is not None
        ScriptedAdapter.released.set()
        await sup.stop_all()
    assert lease_name(KEY) not in shared._leases
