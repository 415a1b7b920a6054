"""The browser chat: pages, the widget script, visitor tokens, CORS and the streaming chat call.

Visitors never hold a tenant's API key. They get a signed visitor token that names its tenant
and a visitor id; the token resolver turns it into `Principal(tenant, user_id)`, so a visitor
sees only their own sessions and a token is worthless at any other tenant. docs/web-chat.md
describes the browser-facing endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import json
import re
import secrets
import time
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel, Field
from yarl import URL

from adapters.web import answers, schemas
from adapters.web.app import (
    CONTEXT,
    TOKEN_RESOLVERS,
    ApiError,
    Handler,
    Principal,
    bearer,
    chat_request,
    check_tenant_claim,
    check_url,
    json_response,
    rate_limited,
    read_json,
    request_address,
    require_web,
    web_message,
)
from chatgateway.errors import (
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    UnavailableError,
)
from chatgateway.models import SessionId
from chatgateway.pipeline import Reply
from chatgateway.tenants import TenantRuntime

log = structlog.get_logger("chatgateway.webchat")

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Names the pages and the widget use to say which tenant they mean.
TENANT_HEADER = "X-Chatgateway-Tenant"
TOKEN_PREFIX = "cgv1"
NDJSON = "application/x-ndjson"
TokenKind = Literal["p", "k"]  # p: handed out to anyone (public chat); k: minted with an API key

VISITOR_KEY = web.AppKey("visitor_key", bytes)
STREAM_TASKS = web.AppKey("stream_tasks", set[asyncio.Task[Reply]])
#: Request key: the tenant whose allowed origins decide this response's CORS headers.
CORS_TENANT = web.RequestKey("cors_tenant", TenantRuntime)

_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".html": "text/html"}
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# Visitor tokens ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VisitorClaim:
    """What a verified visitor token says."""

    tenant_id: str
    user_id: str
    kind: TokenKind
    expires_at: int


class TokenError(Exception):
    """A visitor token that is malformed, forged or expired; the message is safe to show."""


def derive_key(secret: str) -> bytes:
    """The HMAC key of visitor tokens, derived so the raw secret serves only this purpose."""
    return hmac.new(secret.encode(), b"chatgateway visitor token v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())


def issue_token(
    key: bytes, tenant_id: str, user_id: str, kind: TokenKind, *, ttl: float, now: float
) -> tuple[str, int]:
    """Return a token `cgv1.<kind>.<tenant>.<b64 user>.<expiry>.<mac>` and its expiry."""
    expires_at = int(now + ttl)
    payload = f"{TOKEN_PREFIX}.{kind}.{tenant_id}.{_b64(user_id.encode())}.{expires_at}"
    return f"{payload}.{_mac(key, payload)}", expires_at


def verify_token(key: bytes, token: str, *, now: float) -> VisitorClaim:
    """Check a token's MAC and expiry; raise TokenError if it is not good."""
    parts = token.split(".")
    if len(parts) != 6 or parts[0] != TOKEN_PREFIX:
        raise TokenError("invalid visitor token")
    _, kind, tenant_id, user_b64, expiry, mac = parts
    if not hmac.compare_digest(_mac(key, ".".join(parts[:5])), mac):
        raise TokenError("invalid visitor token")
    if kind not in ("p", "k") or not expiry.isdigit():
        raise TokenError("invalid visitor token")
    token_kind: TokenKind = "p" if kind == "p" else "k"
    if int(expiry) <= now:
        raise TokenError("visitor token expired")
    try:
        user_id = _unb64(user_b64).decode()
    except (ValueError, UnicodeDecodeError):
        raise TokenError("invalid visitor token") from None
    return VisitorClaim(tenant_id, user_id, token_kind, int(expiry))


def new_visitor_id() -> str:
    return "v_" + secrets.token_urlsafe(16)


# Origins -----------------------------------------------------------------------------------


def normalize_origin(value: str) -> str | None:
    """`scheme://host:port` with an explicit port, or None when `value` is not an origin."""
    if value == "*":
        return value
    try:
        url = URL(value.strip().rstrip("/"))
    except ValueError:
        return None
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
        return None
    return f"{url.scheme}://{url.host}:{url.port}"


def cross_origin(request: web.Request) -> str | None:
    """The request's Origin when it is another site's ("null" for an opaque one), else None."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    normalized = normalize_origin(origin)
    if normalized is None or normalized == "*":
        return "null"
    own = {normalize_origin(f"{request.scheme}://{request.host}")}
    public_url = request.app[CONTEXT].server.public_url
    if public_url:
        own.add(normalize_origin(str(URL(public_url).origin())))
    return None if normalized in own else normalized


@lru_cache(maxsize=4096)
def _normalized(origins: tuple[str, ...]) -> frozenset[str | None]:
    return frozenset(normalize_origin(o) for o in origins)


def origin_allowed(tenant: TenantRuntime, origin: str) -> bool:
    allowed = _normalized(tuple(tenant.config.web.allowed_origins))
    return "*" in allowed or origin in allowed


def check_origin(request: web.Request, tenant: TenantRuntime) -> None:
    """Refuse a cross-origin browser request from a site the tenant does not allow."""
    origin = cross_origin(request)
    if origin is not None and not origin_allowed(tenant, origin):
        raise ApiError(
            403, "origin_not_allowed", "this website is not allowed to use this chat"
        )
    request[CORS_TENANT] = tenant


def _any_tenant_allows(request: web.Request, origin: str) -> bool:
    tenants = request.app[CONTEXT].tenants.all()
    return any(t.config.web.enabled and origin_allowed(t, origin) for t in tenants)


@web.middleware
async def origin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights for origins some tenant allows; keep API keys off web pages.

    Also refuses a NUL in the path or query first: every request passes here.
    """
    check_url(request)
    if not request.path.startswith("/api/"):
        return await handler(request)
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        presented = request.headers.get("Authorization", "").partition(" ")[2].strip()
        if presented and not presented.startswith(TOKEN_PREFIX + ".") and cross_origin(request):
            raise ApiError(
                403,
                "forbidden",
                "API keys cannot be used from a web page of another site; "
                "use a visitor token (see docs/web-chat.md)",
            )
        return await handler(request)
    origin = cross_origin(request)
    if origin is not None and not _any_tenant_allows(request, origin):
        raise ApiError(403, "origin_not_allowed", "this website is not allowed to use this API")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": request.headers.get("Origin", "*"),
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": f"Authorization, Content-Type, {TENANT_HEADER}",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        },
    )


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Let an allowed site read the answer: the visitor's tenant decides, errors are readable."""
    if not request.path.startswith("/api/") or "Origin" not in request.headers:
        return
    if "Access-Control-Allow-Origin" in response.headers:
        return
    response.headers.add("Vary", "Origin")
    origin = cross_origin(request)
    if origin is None:
        return
    tenant = request.get(CORS_TENANT)
    if tenant is not None:
        readable = origin_allowed(tenant, origin)
    else:
        # Errors carry no tenant data; the widget needs them to tell "expired" from "down".
        readable = response.status >= 400 and _any_tenant_allows(request, origin)
    if readable:
        response.headers["Access-Control-Allow-Origin"] = request.headers["Origin"]


# Token resolver and endpoint ---------------------------------------------------------------


def _visitor_key(request: web.Request) -> bytes:
    key = request.app.get(VISITOR_KEY)
    if key is None:
        raise ApiError(503, "unavailable", "the gateway is starting")
    return key


def _verified(request: web.Request, token: str) -> tuple[VisitorClaim, TenantRuntime]:
    """Verify a visitor token for this request; the tenant comes from the token only."""
    try:
        claim = verify_token(_visitor_key(request), token, now=time.time())
    except TokenError as exc:
        raise ApiError(401, "unauthorized", str(exc)) from None
    tenant = request.app[CONTEXT].tenants.get(claim.tenant_id)
    if tenant is None:
        raise ApiError(401, "unauthorized", "the visitor token's tenant no longer exists")
    named = request.headers.get(TENANT_HEADER)
    if named is not None and named != tenant.id:
        raise ApiError(401, "unauthorized", f"this visitor token is not valid for {named!r}")
    if claim.kind == "p" and not tenant.config.web.public:
        raise ApiError(401, "unauthorized", "public web chat is off for this tenant")
    require_web(Principal(tenant))
    check_origin(request, tenant)
    return claim, tenant


async def resolve_visitor_token(request: web.Request, token: str) -> Principal | None:
    """The TOKEN_RESOLVERS entry: a visitor token becomes Principal(tenant, visitor id)."""
    if not token.startswith(TOKEN_PREFIX + "."):
        return None
    claim, tenant = _verified(request, token)
    return Principal(tenant, claim.user_id, public=claim.kind == "p")


class VisitorTokenRequest(schemas.Body):
    tenantId: str | None = Field(
        None, max_length=63, description="The tenant to chat with (required without a credential)"
    )
    userId: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Only with an API key: the visitor id to bind (default: a new random id)",
    )


class FileRules(BaseModel):
    maxBytes: int = Field(description="The largest file the chat accepts (files.max_bytes)")
    allowedTypes: list[str] = Field(description="Media types accepted (files.allowed_types)")


class ChatSettings(BaseModel):
    title: str
    welcome: str | None
    accentColor: str | None
    files: FileRules = Field(description="What the file picker accepts (POST /api/files)")


class VisitorTokenResponse(BaseModel):
    token: str = Field(description="Send as Authorization: Bearer <token>")
    tenantId: str
    userId: str = Field(description="The visitor id; use it as userId in chat requests")
    expiresAt: int = Field(description="Unix time after which the token is refused")
    chat: ChatSettings


def chat_settings(tenant: TenantRuntime) -> dict[str, Any]:
    web_config = tenant.config.web
    return {
        "title": web_config.title or tenant.config.name or tenant.id,
        "welcome": web_config.welcome,
        "accentColor": web_config.accent_color,
        # The page checks a picked file before uploading it; POST /api/files decides.
        "files": {
            "maxBytes": tenant.config.files.max_bytes,
            "allowedTypes": list(tenant.config.files.allowed_types),
        },
    }


routes = web.RouteTableDef()


@routes.post("/api/visitor-token")
async def visitor_token(request: web.Request) -> web.Response:
    """Hand out (public chat), renew (visitor token) or mint (API key) a visitor token."""
    ctx = request.app[CONTEXT]
    key = _visitor_key(request)
    body = await read_json(request, VisitorTokenRequest)
    presented = bearer(request)
    kind: TokenKind
    kept: tuple[str, int] | None = None
    if presented is None:
        if body.tenantId is None:
            raise ApiError(400, "invalid_body", "tenantId: required without a credential")
        tenant = ctx.tenants.get(body.tenantId)
        if tenant is None or not tenant.config.web.enabled or not tenant.config.web.public:
            raise ApiError(404, "not_found", f"no public web chat for tenant {body.tenantId!r}")
        if body.userId is not None:
            raise ApiError(403, "forbidden", "userId can only be chosen with an API key")
        check_origin(request, tenant)
        # Each hand-out is a new visitor with a fresh per-user limit: cap them per address.
        admission = ctx.pipeline.admission
        try:
            await admission.admit_address(
                tenant.id, request_address(request), tenant.config.limits, minting=True
            )
        except RateLimitedError as exc:
            # Held, as chat_request holds its refusals: a cheap 429 invites an instant retry.
            await admission.sleep(admission.hold(exc, tenant.config.limits))
            raise
        user_id, kind = new_visitor_id(), "p"
    elif presented.startswith(TOKEN_PREFIX + "."):
        claim, tenant = _verified(request, presented)
        if body.tenantId is not None and body.tenantId != tenant.id:
            raise ApiError(
                401, "unauthorized", f"this visitor token is not valid for {body.tenantId!r}"
            )
        if body.userId is not None and body.userId != claim.user_id:
            raise ApiError(403, "forbidden", "userId does not match the visitor token")
        user_id, kind = claim.user_id, claim.kind
        if kind == "k":
            # A signed-in user's token lives as long as the site that minted it said, no longer:
            # renewing hands back the same token, so the site stays in charge of who is signed in.
            kept = (presented, claim.expires_at)
    else:
        found = await ctx.tenants.authenticate(presented)
        if found is None:
            raise ApiError(401, "unauthorized", "invalid API key")
        tenant = found
        require_web(Principal(tenant))
        check_tenant_claim(Principal(tenant), body.tenantId)
        check_tenant_claim(Principal(tenant), request.query.get("tenantId"))
        check_origin(request, tenant)
        user_id, kind = body.userId or new_visitor_id(), "k"
    if kept is not None:
        token, expires_at = kept
    else:
        token, expires_at = issue_token(
            key, tenant.id, user_id, kind, ttl=ctx.server.visitor_token_ttl, now=time.time()
        )
    log.debug("visitor_token_issued", tenant_id=tenant.id, kind=kind)
    return json_response(
        {
            "token": token,
            "tenantId": tenant.id,
            "userId": user_id,
            "expiresAt": expires_at,
            "chat": chat_settings(tenant),
        },
        headers={"Cache-Control": "no-store"},
    )


# Streaming chat ----------------------------------------------------------------------------


def _error_event(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        error = json.loads(exc.text or "{}").get("error", {})
    elif isinstance(exc, NotFoundError):
        error = {"code": "not_found", "message": str(exc)}
    elif isinstance(exc, OverloadedError):
        error = {"code": "too_many_requests", "message": str(exc)}
    elif isinstance(exc, RateLimitedError):
        error = json.loads(rate_limited(exc).text or "{}").get("error", {})
    elif isinstance(exc, UnavailableError):
        error = {"code": "unavailable", "message": str(exc)}
    else:
        error = {"code": "internal_error", "message": "internal error; see the gateway's log"}
    return {"type": "error", "error": error}


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


@routes.post("/api/chat/stream")
async def chat_stream(request: web.Request) -> web.StreamResponse:
    """POST /api/chat answered as NDJSON: delta events as the agent produces text, then done."""
    principal, body = await chat_request(request)
    deltas: asyncio.Queue[str | None] = asyncio.Queue()

    async def on_delta(text: str) -> None:
        # Never block or fail the agent call because of the browser: queue, write elsewhere.
        deltas.put_nowait(text)

    # The pipeline runs in its own task so a visitor closing the tab mid-answer still gets
    # the exchange recorded; the set keeps a reference until it ends.
    task = asyncio.create_task(
        request.app[CONTEXT].pipeline.handle(
            web_message(principal, body),
            session_id=SessionId(body.sessionId) if body.sessionId else None,
            new_session=body.newSession,
            dedup=False,
            on_delta=on_delta,
            admitted=True,
        ),
        name=f"webchat:{principal.tenant.id}",
    )
    tasks = request.app[STREAM_TASKS]
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(lambda _: deltas.put_nowait(None))
    response: web.StreamResponse | None = None
    connected, finished = True, False
    while not finished:
        text = await deltas.get()
        if text is None:
            break
        while not deltas.empty():  # send what queued up meanwhile as one event
            more = deltas.get_nowait()
            if more is None:
                finished = True
                break
            text += more
        if response is None:
            response = await _start_stream(request)
        connected = connected and await _write(response, {"type": "delta", "text": text})
    try:
        reply = await task
    except Exception as exc:
        if response is None:
            raise
        if not isinstance(
            exc, NotFoundError | OverloadedError | RateLimitedError | UnavailableError
        ):
            log.exception("web_stream_failed", tenant_id=principal.tenant.id)
        if connected:
            await _write(response, _error_event(exc))
            await response.write_eof()
        return response
    if response is None:
        response = await _start_stream(request)
    assert reply.session is not None
    done = {
        "type": "done",
        "sessionId": reply.session.id,
        "response": reply.text,
        "outcome": reply.outcome,
    }
    if reply.files or reply.actions:  # the answer's files and buttons (docs/api.md)
        parts = (reply.answered_at, reply.files, reply.actions)
        done.update(answers.parts_json(request, principal.tenant.id, reply.session.id, *parts))
    if connected and await _write(response, done):
        await response.write_eof()
    return response


async def _start_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": f"{NDJSON}; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # nginx: pass each line on at once
        }
    )
    await response.prepare(request)
    return response


async def _write(response: web.StreamResponse, event: dict[str, Any]) -> bool:
    """Write one event; False once the browser has gone away."""
    try:
        await response.write(_line(event))
    except (ConnectionError, RuntimeError):
        return False
    return True


# Pages, widget and static files ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


@cache
def asset(name: str) -> Asset:
    """A file of adapters/web/static, read once."""
    path = STATIC_DIR / name
    body = path.read_bytes()
    content_type = _STATIC_TYPES.get(path.suffix, "application/octet-stream")
    return Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


def _asset_response(request: web.Request, item: Asset) -> web.Response:
    headers = {
        "ETag": item.etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        # Other sites load the widget's script and stylesheet.
        "Cross-Origin-Resource-Policy": "cross-origin",
    }
    if request.headers.get("If-None-Match") == item.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=item.body, content_type=item.content_type, charset="utf-8", headers=headers
    )


@routes.get("/static/{name}")
async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ("chat.css", "chat.js"):
        raise ApiError(404, "not_found", f"no file {name!r}")
    return _asset_response(request, asset(name))


@routes.get("/widget.js")
async def widget_script(request: web.Request) -> web.Response:
    return _asset_response(request, asset("chat.js"))


def _page_tenant(request: web.Request, tenant_id: str) -> TenantRuntime | None:
    tenant = request.app[CONTEXT].tenants.get(tenant_id)
    if tenant is None or not tenant.config.web.enabled or not tenant.config.web.public:
        return None
    return tenant


def render_page(tenant: TenantRuntime, base: str) -> str:
    """The chat page of one tenant; `base` is the relative path to the gateway's root."""
    settings = chat_settings(tenant)
    values = {
        "base": base,
        "tenant": tenant.id,
        "title": settings["title"],
        "welcome": settings["welcome"] or "",
        "accent": settings["accentColor"] or "",
        "version": asset("chat.js").etag.strip('"')[:10] + asset("chat.css").etag.strip('"')[:10],
    }
    template = asset("chat.html").body.decode()
    return re.sub(r"\{\{(\w+)\}\}", lambda m: html.escape(values[m.group(1)]), template)


def _page_response(request: web.Request, tenant_id: str, base: str) -> web.Response:
    headers = {
        "Content-Security-Policy": _PAGE_CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    tenant = _page_tenant(request, tenant_id)
    if tenant is None:
        text = (
            "<!doctype html><html lang=en><meta charset=utf-8><title>Not found</title>"
            "<p>There is no public chat here.</p></html>"
        )
        return web.Response(status=404, text=text, content_type="text/html", headers=headers)
    return web.Response(
        text=render_page(tenant, base), content_type="text/html", headers=headers
    )


@routes.get("/")
async def default_page(request: web.Request) -> web.Response:
    return _page_response(request, "default", "./")


@routes.get("/chat/{tenant_id}")
async def tenant_page(request: web.Request) -> web.Response:
    return _page_response(request, request.match_info["tenant_id"], "../")


# OpenAPI ---------------------------------------------------------------------------------------


def openapi_paths(components: dict[str, Any]) -> dict[str, Any]:
    """The browser chat's API paths for the OpenAPI document; adds their schemas to `components`."""
    from adapters.web.openapi import _REF, _TENANT_QUERY, _errors, _json, _ref

    for model in (VisitorTokenRequest, VisitorTokenResponse):
        schema = model.model_json_schema(ref_template=_REF)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    tenant_header = {
        "name": TENANT_HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "The tenant the page means; a visitor token of another tenant gets 401",
    }
    event = {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["delta", "done", "error"]},
            "text": {"type": "string", "description": "delta: the next piece of the answer"},
            "sessionId": {"type": "string", "description": "done: the session"},
            "response": {"type": "string", "description": "done: the whole answer"},
            "outcome": {"type": "string", "enum": ["ok", "empty", "fallback", "collected"]},
            "error": _ref("ErrorDetail"),
            "attachments": {
                "type": "array",
                "items": _ref("AnswerFile"),
                "description": "done: the answer's files (only when it has some)",
            },
            "actions": {
                "type": "array",
                "items": _ref("AnswerAction"),
                "description": "done: the answer's buttons (only when it has some)",
            },
        },
    }
    return {
        **answers.openapi_paths(components),  # the files of agents' answers
        "/api/visitor-token": {
            "post": {
                "summary": "Get, renew (visitor token) or mint (API key) a visitor token",
                "description": "Without a credential: for tenants with web.public, a new "
                "visitor. With a visitor token: a fresh token for the same visitor. With an "
                "API key: a token for userId (or a new visitor). See docs/web-chat.md.",
                "security": [{}, {"apiKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("VisitorTokenRequest")}},
                },
                "responses": {
                    "200": _json(_ref("VisitorTokenResponse"), "The token"),
                    **_errors(400, 401, 403, 404, 415, 429, 503),
                },
            }
        },
        "/api/chat/stream": {
            "post": {
                "summary": "POST /api/chat answered as NDJSON: delta events, then done",
                "security": [{"apiKey": []}],
                "parameters": [tenant_header, _TENANT_QUERY],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ChatRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "One JSON event per line: delta*, then done (or error)",
                        "content": {NDJSON: {"schema": event}},
                    },
                    **_errors(400, 401, 403, 404, 413, 415, 429, 503),
                },
            }
        },
    }


# Wiring ------------------------------------------------------------------------------------


async def _load_secret(app: web.Application) -> None:
    app[VISITOR_KEY] = derive_key(app[CONTEXT].secret)


async def _finish_streams(app: web.Application) -> None:
    running = app[STREAM_TASKS]
    if running:
        await asyncio.gather(*running, return_exceptions=True)


def install(app: web.Application) -> None:
    """Add the chat pages, the widget, visitor tokens, CORS and streaming chat to the app."""
    app[TOKEN_RESOLVERS].append(resolve_visitor_token)
    app[STREAM_TASKS] = set()
    app.middlewares.append(origin_middleware)
    app.on_response_prepare.append(add_cors_headers)
    app.on_startup.append(_load_secret)
    app.on_cleanup.append(_finish_streams)
    app.add_routes(routes)
    answers.install(app)  # the files of agents' answers, by signed link
