"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis).

The real daemon process serves `GET /api/openapi.json`; schemathesis generates requests for every
operation in it, valid and invalid, and checks each answer: never a 5xx, the status code is one the
document lists, and the body matches the documented schema. It runs once with a tenant's API key and
once with the admin token. Examples are derandomized so a failure reproduces on the next run.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    allow_header_conformance,
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.errors import FailureGroup

from chatgateway.testing.agent import FakeAgent
from tests.conftest import ADMIN_TOKEN, tenant, write_config
from tests.process import GatewayProcess

pytestmark = pytest.mark.slow

KEY = "fuzz-key-of-tenant-acme-0001"
OTHER_KEY = "fuzz-key-of-tenant-other-0002"
#: Examples per operation and generation mode: about a minute for both credentials on 2 cores.
MAX_EXAMPLES = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    allow_header_conformance,
]


class AgentThread:
    """The fake agent on its own event loop in a thread: the test itself is synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.agent = self._run(FakeAgent(prefix="fuzz: ").start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self._run(self.agent.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The real daemon with two tenants (one public web chat), an HTTP agent and the admin API."""
    directory: Path = tmp_path_factory.mktemp("fuzz")
    agent = AgentThread()
    config = write_config(directory, {
        "admin": {"token": {"value": ADMIN_TOKEN}},
        "tenants": [
            # Without limits: most generated chats would otherwise meet a 429 (tested in
            # test_admission) instead of reaching the agent, the store and the answer.
            tenant("acme", agent.agent.url, keys=[KEY], web={"public": True}, limits={
                "tenant": None, "user": None, "address": None, "visitor_tokens": None}),
            tenant("other", agent.agent.url, keys=[OTHER_KEY]),
        ],
    })
    proc = GatewayProcess(config)
    try:
        proc.wait_started()
        yield proc
    finally:
        proc.stop()
        agent.stop()


@pytest.fixture(scope="module")
def api(gateway: GatewayProcess) -> Any:
    """The OpenAPI document as the gateway serves it, loaded by schemathesis."""
    return schemathesis.openapi.from_url(f"{gateway.url}/api/openapi.json")


def _variants(operation: Any, known: dict[str, str]) -> list[tuple[str, Any]]:
    """Valid and invalid requests; where the path names known ids, valid ones with those too."""
    variants = [
        ("positive", operation.as_strategy(generation_mode=GenerationMode.POSITIVE)),
        ("negative", operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)),
    ]
    names = [p.name for p in operation.path_parameters]
    if names and all(name in known for name in names):
        # Random ids only ever meet 404; real ones reach the handlers' success paths.
        path = {name: known[name] for name in names}
        variants.append(("known ids", operation.as_strategy(path_parameters=path)))
    return variants


def fuzz(
    api: Any, base_url: str, credential: str, known: dict[str, str]
) -> tuple[list[str], Counter[str]]:
    """Run every operation with generated requests; return the failures and requests sent."""
    failures: list[str] = []
    sent: Counter[str] = Counter()
    session = requests.Session()
    headers = {"Authorization": f"Bearer {credential}"}
    for result in api.get_all_operations():
        operation = result.ok()
        for variant, strategy in _variants(operation, known):

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def check(case: Any) -> None:
                sent[case.operation.label] += 1
                case.call_and_validate(
                    base_url=base_url, session=session, headers=headers, checks=CHECKS
                )

            try:
                check()
            except Unsatisfiable:  # no parameters and no body: nothing to make invalid
                assert variant == "negative", operation.label
            # A FailureGroup is a BaseExceptionGroup; collect them all, then fail once.
            except (Exception, FailureGroup) as exc:
                failures.append(f"{operation.label} [{variant}]: {exc}")
    session.close()
    return failures, sent


def assert_every_operation_ran(api: Any, sent: Counter[str]) -> None:
    """Guard against a run that checked nothing (an empty document, a strategy that fails)."""
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 19, [op.label for op in operations]
    # Without parameters or a body there is one request to make; with them, many.
    floor = {op.label: 10 if list(op.iter_parameters()) or op.body else 1 for op in operations}
    assert {label: sent[label] for label, least in floor.items() if sent[label] < least} == {}


def _call(base_url: str, method: str, path: str, credential: str, body: Any = None) -> Any:
    response = requests.request(method, f"{base_url}{path}", json=body, timeout=30,
                                headers={"Authorization": f"Bearer {credential}"})
    assert response.status_code < 300, response.text
    return response.json()


def test_fuzz_with_a_tenant_key(gateway: GatewayProcess, api: Any) -> None:
    session = _call(gateway.url, "POST", "/api/chat", KEY, {"message": "hi", "userId": "fuzz"})
    failures, sent = fuzz(api, gateway.url, KEY, {"session_id": session["sessionId"]})
    assert not failures, "\n\n".join(failures)
    assert_every_operation_ran(api, sent)
    assert gateway.proc.poll() is None


def test_fuzz_with_the_admin_token(gateway: GatewayProcess, api: Any) -> None:
    spec = tenant("fuzz-runtime", "http://127.0.0.1:9/agent")
    _call(gateway.url, "POST", "/admin/tenants", ADMIN_TOKEN, spec)
    key = _call(gateway.url, "POST", "/admin/tenants/fuzz-runtime/keys", ADMIN_TOKEN, {})
    known = {"tenant_id": "fuzz-runtime", "key_id": key["keyId"]}
    failures, sent = fuzz(api, gateway.url, ADMIN_TOKEN, known)
    assert not failures, "\n\n".join(failures)
    assert_every_operation_ran(api, sent)
    assert gateway.proc.poll() is None
