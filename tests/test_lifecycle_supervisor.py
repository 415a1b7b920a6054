"""The supervisor: backoff on transient failures, parking on auth failures, isolation, liveness.

The adapters here are stand-ins for a platform connection (the Adapter protocol is the seam):
their behaviour is picked by the bot token, e.g. "flaky-3:x" fails three times, then connects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import pytest
import structlog
from structlog.testing import capture_logs

from chatgateway.adapter import AdapterState, AdapterStatus
from chatgateway.config import DiscordBotConfig, TenantConfig
from chatgateway.errors import AdapterAuthError
from chatgateway.metrics import Metrics
from chatgateway.models import Platform, TenantId
from chatgateway.supervisor import Supervisor

log = structlog.get_logger("tests.scripted_adapter")


class ScriptedAdapter:
    """A platform adapter whose behaviour its token names: MODE[-N]:anything.

    ok     connect and serve until stop()
    auth   the platform refuses the credentials (AdapterAuthError)
    flaky-N  fail N times with ConnectionError, then connect
    crash  always fail with RuntimeError;  exit  always raise SystemExit
    dead   connect, but alive() is False (a dead socket)
    wedge  like dead, and ignore stop() and cancellation until `released` is set
    hang   stay connecting until `released` is set, then connect
    leaky  fail with an error message that contains the token
    """

    instances: ClassVar[list[ScriptedAdapter]] = []
    released: ClassVar[asyncio.Event | None] = None

    def __init__(self, tenant_id: TenantId, settings: DiscordBotConfig, pipeline: Any) -> None:
        self.status = AdapterStatus(tenant_id, Platform.DISCORD, settings.name)
        self.settings = settings
        mode = settings.token.get_secret_value().split(":")[0]
        self.mode, _, count = mode.partition("-")
        self.failures_left = int(count or 0)
        self.runs = 0
        self.stop_calls = 0
        self._stop = asyncio.Event()
        ScriptedAdapter.instances.append(self)

    async def run(self) -> None:
        self.runs += 1
        self.status.state = AdapterState.CONNECTING
        if self.mode == "auth":
            raise AdapterAuthError("the platform refused the bot token (401)")
        if self.mode == "crash":
            raise RuntimeError("connection reset by peer")
        if self.mode == "exit":
            raise SystemExit(3)
        if self.mode == "leaky":
            token = self.settings.token.get_secret_value()
            raise ConnectionError(f"handshake failed for token {token}")
        if self.mode == "hang":
            assert ScriptedAdapter.released is not None
            waits = {
                asyncio.ensure_future(ScriptedAdapter.released.wait()),
                asyncio.ensure_future(self._stop.wait()),
            }
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if self._stop.is_set():
                return
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("platform unreachable")
        self.status.state = AdapterState.CONNECTED
        log.info("scripted_adapter_connected", adapter=self.settings.name)
        if self.mode == "wedge":
            assert ScriptedAdapter.released is not None
            while not ScriptedAdapter.released.is_set():
                try:
                    await ScriptedAdapter.released.wait()
                except asyncio.CancelledError:
                    continue  # a wedged library: cancellation is swallowed
            return
        await self._stop.wait()

    async def stop(self) -> None:
        self.stop_calls += 1
        if self.mode == "wedge":
            assert ScriptedAdapter.released is not None
            await ScriptedAdapter.released.wait()
        self._stop.set()

    def alive(self) -> bool:
        return self.mode not in ("dead", "wedge")


@pytest.fixture(autouse=True)
def _scripted() -> Any:
    ScriptedAdapter.instances = []
    ScriptedAdapter.released = asyncio.Event()
    yield
    ScriptedAdapter.released.set()


def bot(name: str, token: str) -> dict[str, Any]:
    return {"name": name, "token": {"value": token}}


def tenant_config(tenant_id: str, *bots: dict[str, Any]) -> TenantConfig:
    return TenantConfig.model_validate(
        {"id": tenant_id, "agent": {"builtin": "echo"}, "discord": {"bots": list(bots)}}
    )


def factory(tenant_id: TenantId, platform: Platform, settings: Any) -> ScriptedAdapter:
    if settings.name == "unbuildable":
        raise ImportError("No module named 'discord_fork'")
    return ScriptedAdapter(tenant_id, settings, None)


@pytest.fixture
async def supervisor() -> AsyncIterator[Callable[..., Supervisor]]:
    made: list[Supervisor] = []

    def make(**kwargs: Any) -> Supervisor:
        sup = Supervisor(factory, Metrics(), **kwargs)
        made.append(sup)
        return sup

    yield make
    assert ScriptedAdapter.released is not None
    ScriptedAdapter.released.set()
    for sup in made:
        await sup.stop_all()


async def wait_until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for a condition (checked every few milliseconds), failing after `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.005)


def adapter(name: str, tenant_id: str = "acme") -> ScriptedAdapter:
    found = [
        a
        for a in ScriptedAdapter.instances
        if a.settings.name == name and a.status.tenant_id == tenant_id
    ]
    return found[-1]


async def test_transient_failures_are_retried_with_jittered_exponential_backoff(supervisor):
    sup = supervisor(backoff_initial=0.02, backoff_max=0.05)
    with capture_logs() as logs:
        await sup.tenant_changed(None, tenant_config("acme", bot("main", "flaky-3:x")))
        await wait_until(lambda: bool(ScriptedAdapter.instances))
        flaky = adapter("main")
        await wait_until(lambda: flaky.status.state == AdapterState.CONNECTED)
    assert flaky.runs == 4, "three failures, then a successful run of the same adapter"
    assert flaky.status.reconnects == 3
    assert flaky.status.last_error == "ConnectionError: platform unreachable"
    failed = [e for e in logs if e["event"] == "adapter_failed"]
    assert [e["attempt"] for e in failed] == [1, 2, 3]
    # Exponential (0.02, 0.04, then capped at 0.05) with jitter in [0.5, 1.0] of each step.
    for event, ceiling in zip(failed, (0.02, 0.04, 0.05), strict=True):
        assert ceiling * 0.5 - 0.001 <= event["retry_in"] <= ceiling + 0.001, event
        assert event["tenant_id"] == "acme" and event["platform"] == "discord"
    (sample,) = sup.samples()
    assert sample.reconnects == 3


async def test_auth_failure_parks_until_the_settings_change(supervisor):
    sup = supervisor(backoff_initial=0.01, backoff_max=0.01)
    refused = tenant_config("acme", bot("main", "auth:old-token"))
    with capture_logs() as logs:
        await sup.tenant_changed(None, refused)
        await wait_until(lambda: sup.statuses()[0].state == AdapterState.PARKED)
    parked = adapter("main")
    assert parked.runs == 1, "an auth failure is never retried"
    assert sup.statuses()[0].last_error == "the platform refused the bot token (401)"
    assert any(e["event"] == "adapter_parked" for e in logs)

    # A reload with the same settings leaves it parked (no new attempt).
    await sup.tenant_changed(refused, tenant_config("acme", bot("main", "auth:old-token")))
    assert len(ScriptedAdapter.instances) == 1 and parked.runs == 1
    assert sup.statuses()[0].state == AdapterState.PARKED

    # New credentials: a fresh adapter connects.
    await sup.tenant_changed(refused, tenant_config("acme", bot("main", "ok:new-token")))
    await wait_until(lambda: len(ScriptedAdapter.instances) == 2)
    fixed = adapter("main")
    await wait_until(lambda: fixed.status.state == AdapterState.CONNECTED)


async def test_one_adapter_crashing_never_touches_another(supervisor):
    sup = supervisor(backoff_initial=0.005, backoff_max=0.01)
    await sup.tenant_changed(
        None,
        tenant_config(
            "acme",
            bot("steady", "ok:a"),
            bot("crashy", "crash:b"),
            bot("exits", "exit:c"),
            bot("unbuildable", "ok:d"),
        ),
    )
    await sup.tenant_changed(None, tenant_config("globex", bot("steady", "ok:e")))
    await wait_until(lambda: len(ScriptedAdapter.instances) == 4)
    crashy, exits = adapter("crashy"), adapter("exits")
    await wait_until(lambda: crashy.runs >= 5 and exits.runs >= 5)

    for steady in (adapter("steady"), adapter("steady", "globex")):
        assert steady.status.state == AdapterState.CONNECTED
        assert steady.runs == 1 and steady.stop_calls == 0
    assert crashy.status.state in (AdapterState.BACKOFF, AdapterState.CONNECTING)
    assert exits.status.last_error == "SystemExit: 3"
    unbuildable = next(s for s in sup.statuses() if s.name == "unbuildable")
    assert unbuildable.state == AdapterState.PARKED
    assert "cannot create the adapter: ImportError" in (unbuildable.last_error or "")
    assert len(sup.statuses()) == 5


async def test_only_adapters_whose_settings_changed_are_restarted(supervisor):
    sup = supervisor()
    old = tenant_config("acme", bot("one", "ok:1"), bot("two", "ok:2"), bot("three", "ok:3"))
    await sup.tenant_changed(None, old)
    await wait_until(
        lambda: len(ScriptedAdapter.instances) == 3
        and all(a.status.state == AdapterState.CONNECTED for a in ScriptedAdapter.instances)
    )
    one, two, three = adapter("one"), adapter("two"), adapter("three")

    new = tenant_config("acme", bot("one", "ok:1"), bot("two", "ok:changed"), bot("four", "ok:4"))
    await sup.tenant_changed(old, new)
    await wait_until(lambda: len(ScriptedAdapter.instances) == 5)
    assert adapter("one") is one and one.stop_calls == 0 and one.runs == 1
    assert two.stop_calls == 1 and two.status.state == AdapterState.STOPPED
    assert adapter("two") is not two
    assert three.stop_calls == 1, "a removed adapter is stopped"
    assert sorted(s.name for s in sup.statuses()) == ["four", "one", "two"]

    await sup.tenant_changed(new, None)
    assert sup.statuses() == []
    assert one.stop_calls == 1


async def test_a_connected_adapter_that_is_not_alive_is_restarted(supervisor):
    sup = supervisor(alive_grace=0.05)
    await sup.tenant_changed(None, tenant_config("acme", bot("main", "dead:x")))
    await wait_until(lambda: bool(ScriptedAdapter.instances))
    first = adapter("main")
    await wait_until(lambda: first.status.state == AdapterState.CONNECTED)
    with capture_logs() as logs:

        def restarted() -> bool:
            assert sup.check().ok
            return len(ScriptedAdapter.instances) >= 2

        await wait_until(restarted)
    assert first.stop_calls == 1
    assert any(e["event"] == "adapter_not_alive" and e["action"] == "restart" for e in logs)
    await wait_until(lambda: adapter("main").status.state == AdapterState.CONNECTED)
    assert sup.samples()[0].reconnects >= 1, "the forced restart counts as a reconnect"


async def test_an_adapter_that_ignores_cancellation_makes_the_supervisor_unhealthy(supervisor):
    sup = supervisor(alive_grace=0.01, stop_timeout=0.05)
    await sup.tenant_changed(None, tenant_config("acme", bot("main", "wedge:x")))
    await wait_until(lambda: bool(ScriptedAdapter.instances))
    wedged = adapter("main")
    await wait_until(lambda: wedged.status.state == AdapterState.CONNECTED)

    with capture_logs() as logs:
        await wait_until(lambda: not sup.check().ok)
    assert any(e["event"] == "adapter_task_stuck" for e in logs)
    assert "ignores cancellation" in sup.check().problems[0]

    assert ScriptedAdapter.released is not None
    ScriptedAdapter.released.set()
    await wait_until(lambda: sup.check().ok)


async def test_stop_all_stops_every_adapter_and_is_idempotent(supervisor):
    sup = supervisor()
    await sup.tenant_changed(None, tenant_config("acme", bot("a", "ok:1"), bot("b", "ok:2")))
    await wait_until(lambda: len(ScriptedAdapter.instances) == 2)
    await sup.stop_all()
    await sup.stop_all()
    assert [a.stop_calls for a in ScriptedAdapter.instances] == [1, 1]
    assert all(a.status.state == AdapterState.STOPPED for a in ScriptedAdapter.instances)
