"""Factory fixtures that own their cleanup: fake agents, in-process gateways, daemon processes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from chatgateway.daemon import Daemon
from chatgateway.testing.agent import FakeAgent
from tests.process import GatewayProcess

MakeAgent = Callable[..., Awaitable[FakeAgent]]
MakeGateway = Callable[..., Awaitable[Daemon]]

ADMIN_TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
async def make_agent() -> AsyncIterator[MakeAgent]:
    agents: list[FakeAgent] = []

    async def make(**kwargs: Any) -> FakeAgent:
        agent = await FakeAgent(**kwargs).start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.stop()


def tenant(tenant_id: str, agent_url: str | None = None, keys: list[str] | None = None,
           **extra: Any) -> dict[str, Any]:
    """A tenant definition for a test config; `keys` are inline API keys."""
    agent: dict[str, Any] = {"url": agent_url} if agent_url else {"builtin": "echo"}
    agent.update(extra.pop("agent", {}))
    web = {"enabled": True, "api_keys": [{"value": k} for k in keys or []]}
    web.update(extra.pop("web", {}))
    return {"id": tenant_id, "name": tenant_id.title(), "agent": agent, "web": web, **extra}


def write_config(directory: Path, config: dict[str, Any], name: str = "gateway.yaml") -> Path:
    config = dict(config)
    config.setdefault("listen", {"host": "127.0.0.1", "port": 0})
    config.setdefault("storage", {"path": str(directory / "gateway.db")})
    config.setdefault("logging", {"level": "info", "format": "json"})
    path = directory / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[MakeGateway]:
    """Start a Daemon in this event loop from a config dict; stopped at teardown."""
    daemons: list[Daemon] = []

    async def make(config: dict[str, Any], environ: dict[str, str] | None = None) -> Daemon:
        path = write_config(tmp_path, config, f"gateway-{len(daemons)}.yaml")
        daemon = Daemon(path, environ or {})
        daemons.append(daemon)
        await daemon.start()
        return daemon

    yield make
    for daemon in daemons:
        await daemon.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(daemon: Daemon, path: str) -> str:
    return f"http://127.0.0.1:{daemon.port}{path}"


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start the real daemon process; killed at teardown if still running."""
    procs: list[GatewayProcess] = []

    def start(config: dict[str, Any] | Path, env: dict[str, str] | None = None,
              wait: bool = True) -> GatewayProcess:
        path = config if isinstance(config, Path) else write_config(tmp_path, config)
        proc = GatewayProcess(path, env)
        procs.append(proc)
        if wait:
            proc.wait_started()
        return proc

    yield start
    for proc in procs:
        if proc.proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Where tests leave artefacts for a reviewer (screenshots, logs)."""
    path = Path(os.environ.get("CHATGATEWAY_TEST_OUTPUT", "test-output")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
