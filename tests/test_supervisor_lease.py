"""The supervisor with a coordinator: one owner per Discord bot, standby, takeover, lost leases.

Two supervisors sharing one LocalCoordinator stand in for two instances sharing a database: the
coordinator's leases are what decides who connects (the PostgreSQL leases are tested in
test_pg_lease.py, the whole thing across real processes in test_cluster_discord.py).
"""

from __future__ import annotations

import time

from chatgateway.adapter import AdapterState
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


def connected(sup: Supervisor) -> bool:
    return [s.state for s in sup.statuses()] == [AdapterState.CONNECTED]


def standby(sup: Supervisor) -> bool:
    return [s.state for s in sup.statuses()] == [AdapterState.STANDBY]


async def test_one_instance_connects_the_other_waits_and_takes_over_when_it_stops():
    shared = LocalCoordinator()
    a = Supervisor(factory, Metrics(), shared, standby_retry=0.05)
    b = Supervisor(factory, Metrics(), shared, standby_retry=0.05)
    config = tenant_config("acme", bot("main", "ok:x"))
    try:
        await a.tenant_changed(None, config)
        await wait_until(lambda: connected(a))
        await b.tenant_changed(None, config)
        await wait_until(lambda: standby(b))
        assert len(ScriptedAdapter.instances) == 1, "the standby instance builds no adapter"
        assert a.statuses()[0].as_dict()["owner"] == shared.instance_id

        started = time.monotonic()
        await a.stop_one(KEY)  # systemctl stop: disconnect, then release at once
        first = ScriptedAdapter.instances[0]
        assert first.stop_calls >= 1
        await wait_until(lambda: connected(b), within=2)
        assert time.monotonic() - started < 1
        assert len(ScriptedAdapter.instances) == 2
    finally:
        await a.stop_all()
        await b.stop_all()


async def test_a_lost_lease_stops_the_adapter_at_once_and_goes_back_to_standby():
    shared = LocalCoordinator()
    a = Supervisor(factory, Metrics(), shared, standby_retry=0.05)
    try:
        await a.tenant_changed(None, tenant_config("acme", bot("main", "ok:x")))
        await wait_until(lambda: connected(a))
        owner = ScriptedAdapter.instances[0]
        # Another instance steals it: here, somebody else holds the name once it is freed.
        await shared._leases[lease_name(KEY)].release()
        thief = await shared.try_lease(lease_name(KEY), ttl=10)
        assert thief is not None
        await wait_until(lambda: standby(a), within=2)
        assert owner.stop_calls >= 1 and owner._stop.is_set()
        # Once the thief lets go, this instance takes the bot back with a fresh adapter.
        await thief.release()
        await wait_until(lambda: connected(a), within=2)
        assert len(ScriptedAdapter.instances) == 2
    finally:
        await a.stop_all()


async def test_without_a_coordinator_nothing_is_leased():
    sup = Supervisor(factory, Metrics())
    try:
        await sup.tenant_changed(None, tenant_config("acme", bot("main", "ok:x")))
        await wait_until(lambda: connected(sup))
        assert sup.statuses()[0].owner is None
    finally:
        await sup.stop_all()
