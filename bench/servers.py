"""Small servers the benchmark runs in their own processes: the fast agent and the bare forwarder.

`python -m bench.servers agent` or `python -m bench.servers forwarder AGENT_URL [PORT]`; each
prints `PORT <n>` once listening on 127.0.0.1 (on PORT if given, else on a free port).
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import ClientSession, TCPConnector, web


async def agent_handler(request: web.Request) -> web.Response:
    """The same fast fake agent for every target: parse, answer a short text."""
    body = await request.json()
    text = body.get("message")
    if isinstance(text, dict):  # the gateway's agent protocol
        text = text.get("text", "")
    return web.json_response({"response": f"ok: {text}"})


def forwarder_app(agent_url: str) -> web.Application:
    """The bare minimum: parse the JSON, forward it to the agent on one shared client session."""
    app = web.Application()
    state: dict[str, ClientSession] = {}

    async def startup(app: web.Application) -> None:
        state["client"] = ClientSession(connector=TCPConnector(limit=256))

    async def cleanup(app: web.Application) -> None:
        await state["client"].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.json()
        async with state["client"].post(agent_url, json=body) as resp:
            answer = await resp.json()
        return web.json_response({"response": answer["response"]})

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_post("/api/chat", forward)
    return app


async def serve(app: web.Application, port: int = 0) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    kind = sys.argv[1]
    port = 0
    if kind == "agent":
        app = web.Application()
        app.router.add_post("/agent", agent_handler)
    elif kind == "forwarder":
        app = forwarder_app(sys.argv[2])
        port = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    else:
        raise SystemExit(f"unknown server {kind!r}")
    try:
        asyncio.run(serve(app, port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
