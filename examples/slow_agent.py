"""An agent that works for a while and answers later, through the request's callback.

    python examples/slow_agent.py --port 9000 --seconds 20

and give a tenant `agent: {url: http://127.0.0.1:9000/agent}`. Each message is answered
`202 Accepted` at once; after half of `--seconds` the agent sends a progress update, after
`--seconds` its final answer (docs/agent-protocol.md, "Answering later"). Needs only aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import ClientSession, web

tasks: set[asyncio.Task[None]] = set()


async def answer_later(callback: dict[str, str], question: str, seconds: float) -> None:
    headers = {"Authorization": f"Bearer {callback['token']}"}
    async with ClientSession(headers=headers) as http:
        await asyncio.sleep(seconds / 2)
        progress = {"text": "Still working on it… ", "final": False}
        async with http.post(callback["url"], json=progress) as resp:
            print("progress:", resp.status, await resp.text())
        await asyncio.sleep(seconds / 2)
        final = {"text": f"After {seconds:g} seconds of thought about **{question}**: done."}
        for attempt in range(5):  # a retried final is delivered once
            try:
                async with http.post(callback["url"], json=final) as resp:
                    print("final:", resp.status, await resp.text())
                    if resp.status < 500:
                        return
            except OSError as exc:
                print("final failed:", exc)
            await asyncio.sleep(2**attempt)


def make_app(seconds: float) -> web.Application:
    async def agent(request: web.Request) -> web.Response:
        body = await request.json()
        callback = body.get("callback")
        if callback is None:  # a gateway without callbacks: answer at once
            return web.json_response({"response": "I can only answer later."})
        task = asyncio.create_task(answer_later(callback, body["message"]["text"], seconds))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return web.json_response({"status": "accepted"}, status=202)

    app = web.Application()
    app.router.add_post("/agent", agent)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    web.run_app(make_app(args.seconds), host=args.host, port=args.port)
