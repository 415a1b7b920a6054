"""A fake agent server on 127.0.0.1:0 that records what it receives and answers as told."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from chatgateway.invoker import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature


@dataclass
class AgentCall:
    body: dict[str, Any]
    headers: dict[str, str]
    raw: bytes


Behaviour = Callable[[AgentCall], Awaitable[web.StreamResponse]]


@dataclass
class FakeAgent:
    """Answers `{"response": prefix + text}` unless `behaviour` says otherwise."""

    prefix: str = "agent: "
    delay: float = 0.0
    status: int = 200
    stream_chunks: list[str] | None = None
    stream_pause: float = 0.0
    secret: bytes | None = None
    behaviour: Behaviour | None = None
    calls: list[AgentCall] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _called: asyncio.Condition | None = None

    async def start(self) -> FakeAgent:
        app = web.Application()
        app.router.add_post("/agent", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/agent"
        self._called = asyncio.Condition()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_calls(self, count: int, within: float = 10.0) -> list[AgentCall]:
        """Wait until at least `count` calls arrived."""
        assert self._called is not None
        async with asyncio.timeout(within):
            async with self._called:
                await self._called.wait_for(lambda: len(self.calls) >= count)
        return self.calls

    def texts(self) -> list[str]:
        return [c.body["message"]["text"] for c in self.calls]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        call = AgentCall(json.loads(raw), dict(request.headers), raw)
        self.calls.append(call)
        assert self._called is not None
        async with self._called:
            self._called.notify_all()
        if self.secret is not None and not verify_signature(
            self.secret,
            request.headers.get(TIMESTAMP_HEADER, ""),
            raw,
            request.headers.get(SIGNATURE_HEADER, ""),
        ):
            return web.json_response({"error": "bad signature"}, status=401)
        if self.behaviour is not None:
            return await self.behaviour(call)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.json_response({"error": "failing on purpose"}, status=self.status)
        text = call.body["message"]["text"]
        if self.stream_chunks is not None:
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            for chunk in self.stream_chunks:
                await resp.write(json.dumps({"delta": chunk}).encode() + b"\n")
                if self.stream_pause:
                    await asyncio.sleep(self.stream_pause)
            await resp.write_eof()
            return resp
        return web.json_response({"response": f"{self.prefix}{text}"})
