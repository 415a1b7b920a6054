"""Agents' files and buttons in the web API: their JSON, and the signed links that serve files.

A file of an answer is never handed to the browser as the agent gave it: the web API lists it
with a link `GET /api/answer-files/<token>`, signed (purpose "file") over the tenant, the session,
the answer (its stored turn's timestamp) and the file's position, valid FILE_LINK_TTL seconds
and made afresh whenever an answer or a transcript is read. Serving it looks the answer up in
that tenant's store by that session, so a link never reaches another tenant's data and dies with
its session (deleted, erased, pruned). Bytes the agent gave are served from the transcript; a
URL is fetched with the SSRF guards of chatgateway/fetch.py and streamed through, under a cap.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import web

from adapters.web.app import CONTEXT, ApiError
from chatgateway.fetch import MAX_BYTES, FetchError, agent_host, fetch
from chatgateway.models import Action, OutFile, Role, SessionId, TenantId
from chatgateway.rich import FileLink
from chatgateway.signing import SignatureError, Signer

log = structlog.get_logger("chatgateway.web.answers")

PATH = "/api/answer-files/"
#: How long a file link works (seconds); a reloaded transcript carries new links.
FILE_LINK_TTL = 3600
#: The first field of an answer file's token (the files of users' messages have others).
KIND = "answer"
#: Shown in the page (`inline`); anything else is a download (`attachment`). No SVG: it may
#: carry script.
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/avif"})
#: The gateway's secret as the file links' signer (the same secret as visitor tokens').
SIGNER = web.AppKey("answer_file_signer", Signer)


def file_link(
    request: web.Request, tenant_id: str, session_id: str, answered_at: float, index: int
) -> str:
    """An absolute link to file `index` of the answer stored at `answered_at`."""
    signer = request.app.get(SIGNER)
    if signer is None:
        raise ApiError(503, "unavailable", "the gateway is starting")
    token = signer.sign(
        [KIND, tenant_id, session_id, repr(answered_at), str(index)],
        expires_at=int(time.time() + FILE_LINK_TTL),
    )
    public_url = request.app[CONTEXT].server.public_url
    base = str(public_url).rstrip("/") if public_url else str(request.url.origin())
    return base + PATH + token


def _platform_links(app: web.Application, signer: Signer) -> FileLink:
    """The pipeline's `file_link`: absolute links for answers shown on Slack or Discord."""

    def link(
        tenant_id: str, session_id: str, answered_at: float, index: int, file: OutFile
    ) -> str | None:
        base = app[CONTEXT].public_url()
        token = signer.sign(
            [KIND, tenant_id, session_id, repr(answered_at), str(index)],
            expires_at=int(time.time() + FILE_LINK_TTL),
        )
        return base + PATH + token

    return link


def parts_json(
    request: web.Request,
    tenant_id: str,
    session_id: str,
    answered_at: float,
    files: tuple[OutFile, ...],
    actions: tuple[Action, ...],
) -> dict[str, Any]:
    """`attachments` and `actions` of an answer for the web API ({} when it has neither)."""
    out: dict[str, Any] = {}
    if files:
        out["attachments"] = [
            {
                "name": f.name,
                "contentType": f.content_type,
                "size": len(f.data) if f.data is not None else None,
                "url": file_link(request, tenant_id, session_id, answered_at, i),
            }
            for i, f in enumerate(files)
        ]
    if actions:
        out["actions"] = [{"label": a.label, "value": a.value, "style": a.style} for a in actions]
    return out


def _headers(file: OutFile) -> dict[str, str]:
    disposition = "inline" if file.content_type in INLINE_TYPES else "attachment"
    ascii_name = file.name.encode("ascii", "replace").decode().replace('"', "'")
    return {
        "Content-Type": file.content_type,
        "Content-Disposition": (
            f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(file.name)}"
        ),
        # Whatever the agent says the bytes are, they never run as a page of the gateway.
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Cache-Control": "private, max-age=300",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Resource-Policy": "cross-origin",  # the widget shows images on other sites
    }


routes = web.RouteTableDef()


@routes.get(PATH + "{token}")
async def answer_file(request: web.Request) -> web.StreamResponse:
    """Serve one file of an agent's answer to whoever holds its (signed, expiring) link."""
    ctx = request.app[CONTEXT]
    signer = request.app.get(SIGNER)
    if signer is None:
        raise ApiError(503, "unavailable", "the gateway is starting")
    try:
        kind, tenant_id, session_id, answered_at, index = signer.verify(
            request.match_info["token"], now=time.time(), count=5
        )
    except SignatureError as exc:
        expired = "expired" in str(exc)
        raise ApiError(
            410 if expired else 403, "link_expired" if expired else "invalid_link", str(exc)
        ) from None
    if kind != KIND or not index.isdigit():
        raise ApiError(403, "invalid_link", "invalid file token")
    tenant = ctx.tenants.get(tenant_id)
    missing = ApiError(404, "not_found", "this file is no longer available")
    if tenant is None:
        raise missing
    tid, sid = TenantId(tenant_id), SessionId(session_id)
    if await ctx.store.get_session(tid, sid) is None:
        raise missing
    turns = await ctx.store.history(tid, sid, tenant.config.sessions.max_turns)
    turn = next(
        (t for t in turns if t.role is Role.AGENT and repr(t.timestamp) == answered_at), None
    )
    if turn is None or int(index) >= len(turn.files):
        raise missing
    file = turn.files[int(index)]
    headers = _headers(file)
    if file.data is not None:
        return web.Response(body=file.data, headers=headers)
    assert file.url is not None
    trusted = [h for h in (agent_host(tenant.config.agent.url),) if h]
    try:
        async with fetch(file.url, trusted_hosts=trusted, max_bytes=MAX_BYTES) as got:
            response = web.StreamResponse(headers=headers)
            if got.size is not None:
                response.content_length = got.size
            started = False
            try:
                async for chunk in got.chunks():
                    if not started:
                        await response.prepare(request)
                        started = True
                    await response.write(chunk)
            except FetchError as exc:
                if not started:
                    raise
                # Part of the file is out: cut the connection so the download shows failed.
                log.warning("answer_file_cut", tenant_id=tenant_id, reason=str(exc))
                if request.transport is not None:
                    request.transport.close()
                return response
            if not started:
                await response.prepare(request)
            await response.write_eof()
            return response
    except FetchError as exc:
        log.info("answer_file_refused", tenant_id=tenant_id, reason=str(exc))
        raise ApiError(
            502, "file_unavailable", f"the agent's file cannot be served: {exc}"
        ) from None


async def _start(app: web.Application) -> None:
    ctx = app[CONTEXT]
    app[SIGNER] = signer = Signer(ctx.secret, "file")
    ctx.pipeline.file_link = _platform_links(app, signer)


async def _stop(app: web.Application) -> None:
    ctx = app[CONTEXT]
    ctx.pipeline.file_link = None


def install(app: web.Application) -> None:
    """Add the answer file links to the app."""
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    app.add_routes(routes)


# OpenAPI -----------------------------------------------------------------------------------


def openapi_paths(components: dict[str, Any]) -> dict[str, Any]:
    """GET /api/answer-files/{token} for the OpenAPI document."""
    from adapters.web.openapi import _json, _ref

    del components  # AnswerFile and AnswerAction come with ChatResponse (schemas.py)
    error = _ref("ErrorResponse")
    return {
        PATH + "{token}": {
            "get": {
                "summary": "A file of an agent's answer, by the signed link the API listed",
                "description": "No credential: the link is one. Images are served inline, "
                "other files as attachments. See docs/api.md.",
                "security": [{}],
                "parameters": [
                    {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "The file",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "403": _json(error, "An altered or foreign link (invalid_link)"),
                    "404": _json(error, "The answer or its session is gone (not_found)"),
                    "410": _json(error, "The link expired (link_expired)"),
                    "502": _json(error, "The agent's URL cannot be fetched (file_unavailable)"),
                    "503": _json(error, "The gateway is starting (unavailable)"),
                },
            }
        }
    }
