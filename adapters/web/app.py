"""The aiohttp application: the chat REST API, the admin API and the error contract."""

from __future__ import annotations

import hmac
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.web_protocol import RequestHandler
from pydantic import BaseModel, SecretStr, ValidationError

from adapters.web import schemas
from chatgateway import codec
from chatgateway.admission import client_address
from chatgateway.config import ServerConfig, format_loc
from chatgateway.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    UnavailableError,
)
from chatgateway.models import (
    Attachment,
    Conversation,
    ConversationKind,
    FileSource,
    NormalizedMessage,
    Platform,
    Session,
    SessionId,
    User,
)
from chatgateway.pipeline import Pipeline
from chatgateway.store.base import SessionStore
from chatgateway.tenants import TenantRegistry, TenantRuntime

log = structlog.get_logger("chatgateway.web")

B = TypeVar("B", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The tenant that may run without a key on a loopback address when configured so.
ANONYMOUS_TENANT = "default"
#: Headers a reverse proxy adds; a request carrying one is never anonymous.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


@dataclass
class WebContext:
    """What the web adapter needs from the daemon."""

    pipeline: Pipeline
    tenants: TenantRegistry
    store: SessionStore
    server: ServerConfig
    admin_token: SecretStr | None
    loopback: bool
    #: The gateway secret (chatgateway.signing.gateway_secret): signed tokens and links.
    secret: str
    #: The gateway's base URL as agents and users reach it, without a trailing slash:
    #: `server.public_url`, else the address it listens on.
    public_url: Callable[[], str]
    #: Extra routes (health, metrics, status, chat page) added by other parts of the daemon.
    extra_routes: list[web.RouteDef] = field(default_factory=list)


CONTEXT = web.AppKey("context", WebContext)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a tenant (from its API key), optionally narrowed to one user."""

    tenant: TenantRuntime
    user_id: str | None = None
    #: Anonymous or a public visitor: the per-address limit applies.
    public: bool = False


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer, encoded with orjson (`aiohttp.web.json_response` uses `json`)."""
    return web.Response(
        body=codec.dumps(data), status=status, headers=headers, content_type="application/json"
    )


class ApiError(web.HTTPException):
    """An error answered as {"error": {"code", "message"}} with the given status."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        self.status_code = status
        super().__init__(
            headers=headers,
            text=json.dumps({"error": {"code": code, "message": message}}),
            content_type="application/json",
        )


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def rate_limited(exc: RateLimitedError) -> ApiError:
    """A limit's refusal as a 429 with Retry-After (whole seconds, at least 1)."""
    code = "quota_exceeded" if exc.reason == "daily_quota" else "rate_limited"
    retry_after = str(max(1, math.ceil(exc.retry_after)))
    return ApiError(429, code, str(exc), headers={"Retry-After": retry_after})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure as JSON; never let a traceback reach the client."""
    try:
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "error")
        message = exc.reason
        if exc.status == 413:
            limit = request.app[CONTEXT].server.max_body_bytes
            message = f"request body is larger than {limit} bytes"
        # A 405 must say which methods the resource has (RFC 9110 15.5.6).
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        raise ApiError(exc.status, code, message, headers=allow) from None
    except NotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except OverloadedError as exc:
        raise ApiError(429, "too_many_requests", str(exc)) from None
    except RateLimitedError as exc:
        raise rate_limited(exc) from None
    except UnavailableError as exc:
        raise ApiError(503, "unavailable", str(exc)) from None
    except Exception:
        log.exception("web_handler_failed", path=request.path, method=request.method)
        raise ApiError(500, "internal_error", "internal error; see the gateway's log") from None


# Request helpers -------------------------------------------------------------------------


async def read_json(request: web.Request, model: type[B]) -> B:
    """Read and validate a JSON body, answering 415/413/400 with the reason."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    return validate(model, parse_json(await read_body(request)))


async def read_body(request: web.Request) -> bytes:
    """The request body; 400 when its encoding is broken (e.g. bad chunked encoding)."""
    try:
        return await request.read()
    except BadHttpMessage as exc:
        # aiohttp's message quotes the bytes it choked on: neither logged nor echoed.
        raise ApiError(
            400, "bad_request", f"the request body is malformed ({type(exc).__name__})"
        ) from None


def check_url(request: web.Request) -> None:
    """Refuse a NUL in the path or query (a NUL can only arrive percent-encoded).

    PostgreSQL cannot store or compare text with a NUL; both backends refuse it alike, here.
    """
    raw = request.raw_path
    at = raw.find("%00")
    if at >= 0:
        query = 0 <= raw.find("?") < at
        raise ApiError(
            400,
            "invalid_query" if query else "invalid_path",
            f"the {'query' if query else 'path'} contains a NUL character (%00)",
        )


def parse_json(raw: bytes) -> Any:
    """Decode a JSON body: 400 malformed_json if it is not JSON, invalid_body if not text."""
    try:
        data = codec.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from None
    except RecursionError:
        # json.loads recurses per nesting level: "[" * 100000 would otherwise be a 500.
        raise ApiError(400, "malformed_json", "body is not valid JSON: nested too deeply") from None
    check_text(data)
    return data


#: The deepest nesting of objects and arrays a JSON body may have (the body itself is 1).
MAX_JSON_DEPTH = 32


def _text_problem(value: str) -> str | None:
    """Why `value` cannot be stored, or None."""
    if "\x00" in value:
        # PostgreSQL refuses NUL in text; refused here on every backend, so both behave alike.
        return "contains a NUL character (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8 text"
    return None


def check_text(data: Any) -> None:
    """Refuse strings no store can hold (a NUL, the lone surrogate JSON may spell "\\ud800")
    and nesting deeper than MAX_JSON_DEPTH.

    Python decodes them, but the store cannot encode them: left alone they are a 500 later,
    after the agent was called. Deep metadata would make the agent call itself fail.
    """
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), data)]
    while stack:  # not recursive: the JSON may be nested nearly to the recursion limit
        loc, value = stack.pop()
        if isinstance(value, str):
            problem = _text_problem(value)
            if problem is not None:
                raise ApiError(400, "invalid_body", f"{format_loc(loc) or 'body'}: {problem}")
        elif isinstance(value, dict | list):
            if len(loc) >= MAX_JSON_DEPTH:
                raise ApiError(
                    400,
                    "invalid_body",
                    f"{format_loc(loc)}: nested deeper than {MAX_JSON_DEPTH} levels",
                )
            if isinstance(value, list):
                stack.extend(((*loc, i), item) for i, item in enumerate(value))
                continue
            for key, item in value.items():
                problem = _text_problem(key)
                if problem is not None:
                    where = format_loc(loc) or "body"
                    raise ApiError(400, "invalid_body", f"{where}: a key {problem}")
                stack.append(((*loc, key), item))


def validate(model: type[B], data: Any) -> B:
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", "body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, "invalid_body", validation_message(exc)) from None


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = format_loc(tuple(err["loc"])) or "body"
        what = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {what}")
    return "; ".join(parts)


def is_loopback_host(host: str) -> bool:
    """True for a Host header naming this machine: 127.0.0.1, localhost or [::1], any port."""
    host = host.lower()
    if host.startswith("[::1]"):
        port = host.removeprefix("[::1]")
    else:
        name, colon, digits = host.partition(":")
        if name not in ("127.0.0.1", "localhost"):
            return False
        port = colon + digits
    return port == "" or (port.startswith(":") and port[1:].isdigit())


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "Authorization must be 'Bearer <api key>'")
    # Keys and tokens are printable ASCII; anything else would make the str comparison and
    # hashing behind authentication raise (a 500) instead of failing to match.
    if not (token.isascii() and token.isprintable()):
        raise ApiError(401, "unauthorized", "the credential must be printable ASCII")
    return token


#: Resolves a bearer token that is not an API key (e.g. a visitor token) to a principal.
TokenResolver = Callable[[web.Request, str], Awaitable[Principal | None]]
TOKEN_RESOLVERS = web.AppKey("token_resolvers", list[TokenResolver])


async def authenticate(request: web.Request) -> Principal:
    """The caller's tenant comes from its credential, never from the request body."""
    ctx = request.app[CONTEXT]
    token = bearer(request)
    if token is None:
        tenant = ctx.tenants.get(ANONYMOUS_TENANT)
        if tenant is not None and tenant.config.web.anonymous and ctx.loopback:
            # Behind a reverse proxy on loopback every caller would look local.
            proxied = [h for h in PROXY_HEADERS if h in request.headers]
            if proxied:
                raise ApiError(
                    401,
                    "unauthorized",
                    f"missing API key: anonymous access is only for local callers, and this "
                    f"request came through a proxy ({proxied[0]} header)",
                )
            # DNS rebinding: a web page of attacker.example whose name now resolves to
            # 127.0.0.1 is "same origin" to the browser, but its Host header still says so.
            if not is_loopback_host(request.headers.get("Host", "")):
                raise ApiError(
                    401,
                    "unauthorized",
                    "missing API key: anonymous access needs a loopback Host "
                    "(127.0.0.1, localhost or [::1])",
                )
            return Principal(tenant, public=True)
        raise ApiError(401, "unauthorized", "missing API key (Authorization: Bearer <key>)")
    tenant = await ctx.tenants.authenticate(token)
    if tenant is not None:
        return Principal(tenant)
    for resolver in request.app.get(TOKEN_RESOLVERS, []):
        principal = await resolver(request, token)
        if principal is not None:
            return principal
    raise ApiError(401, "unauthorized", "invalid API key")


def check_tenant_claim(principal: Principal, claimed: str | None) -> None:
    if claimed is not None and claimed != principal.tenant.id:
        raise ApiError(403, "forbidden", "tenantId does not match the API key's tenant")


def require_web(principal: Principal) -> None:
    if not principal.tenant.config.web.enabled:
        raise ApiError(403, "forbidden", "web chat is disabled for this tenant")


def session_summary(session: Session) -> dict[str, Any]:
    return {
        "sessionId": session.id,
        "tenantId": session.tenant_id,
        "userId": session.user_id,
        "userName": session.user_name,
        "platform": session.platform.value,
        "conversationId": session.key.conversation_id,
        "threadId": session.key.thread_id or None,
        "createdAt": session.created_at,
        "lastActive": session.last_active,
        "messageCount": session.message_count,
    }


def web_message(principal: Principal, body: schemas.ChatRequest) -> NormalizedMessage:
    """Translate a web chat request into the normalized message."""
    return NormalizedMessage(
        tenant_id=principal.tenant.id,
        platform=Platform.WEB,
        conversation=Conversation(id=body.userId, kind=ConversationKind.WEB),
        user=User(id=body.userId, display_name=body.userName),
        text=body.message,
        message_id=os.urandom(16).hex(),
        timestamp=time.time(),
        # Uploads (POST /api/files) by id; the pipeline checks they are this user's.
        attachments=tuple(Attachment("", source=FileSource("web", f)) for f in body.files)
        if body.files
        else (),
        metadata=body.metadata,
    )


async def visible_session(request: web.Request, principal: Principal) -> Session:
    """The session named in the path, if this caller may see it (else 404, never 403)."""
    ctx = request.app[CONTEXT]
    session_id = SessionId(request.match_info["session_id"])
    session = await ctx.store.get_session(principal.tenant.id, session_id)
    user_id = principal.user_id or request.query.get("userId")
    if (
        session is None
        or (user_id is not None and session.user_id != user_id)
        # A visitor id may equal a Slack or Discord user's id; a visitor sees web sessions only.
        or (principal.user_id is not None and session.platform != Platform.WEB)
    ):
        raise ApiError(404, "not_found", f"no session {session_id!r}")
    return session


# Chat API --------------------------------------------------------------------------------

routes = web.RouteTableDef()


def request_address(request: web.Request) -> str:
    """The client address the per-address limits count (see `server.trusted_proxies`)."""
    return client_address(
        request.remote,
        request.headers.getall("X-Forwarded-For", []),
        request.app[CONTEXT].server.trusted_proxies,
    )


async def chat_request(request: web.Request) -> tuple[Principal, schemas.ChatRequest]:
    """Authenticate and validate a chat request (shared by /api/chat and /api/chat/stream)."""
    principal = await authenticate(request)
    require_web(principal)
    check_tenant_claim(principal, request.query.get("tenantId"))
    # The tenant's rate and quota (and a public caller's address rate) before the body is
    # read, so a flood costs little work; RateLimitedError becomes a 429. Inline and without a
    # coroutine in memory when a token is there: this is every chat request's path.
    limits = principal.tenant.config.limits
    admission = request.app[CONTEXT].pipeline.admission
    try:
        if principal.public and limits.address is not None:
            await admission.admit_address(principal.tenant.id, request_address(request), limits)
        wait = admission.check_tenant(principal.tenant.id, "web", limits)
        if wait is None:
            await admission.admit_tenant(principal.tenant.id, "web", limits)
        elif wait:
            await admission.sleep(wait)  # paced: this request's token comes then
    except RateLimitedError as exc:
        # A 429 at once lets a client that retries at once flood the loop every tenant shares.
        await admission.sleep(admission.hold(exc, limits))
        raise
    body = await read_json(request, schemas.ChatRequest)
    check_tenant_claim(principal, body.tenantId)
    if principal.user_id is not None and body.userId != principal.user_id:
        raise ApiError(403, "forbidden", "userId does not match the visitor token")
    return principal, body


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.Response:
    principal, body = await chat_request(request)
    reply = await request.app[CONTEXT].pipeline.handle(
        web_message(principal, body),
        session_id=SessionId(body.sessionId) if body.sessionId else None,
        new_session=body.newSession,
        dedup=False,
        admitted=True,
    )
    assert reply.session is not None
    if reply.outcome == "deferred":  # the agent answers later (docs/api.md)
        return json_response({"sessionId": reply.session.id, "response": "", "deferred": True})
    answer: dict[str, Any] = {"sessionId": reply.session.id, "response": reply.text}
    if reply.files or reply.actions:  # the answer's files and buttons (docs/api.md)
        from adapters.web.answers import parts_json

        parts = (reply.answered_at, reply.files, reply.actions)
        answer.update(parts_json(request, principal.tenant.id, reply.session.id, *parts))
    return json_response(answer)


#: The largest offset accepted; SQLite would raise OverflowError past 64 bits (a 500).
MAX_OFFSET = 2**31 - 1


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(request.query.get(name, str(default)))
    except ValueError:
        raise ApiError(400, "invalid_query", f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, "invalid_query", f"{name} must be {low}-{high}")
    return value


def _page(request: web.Request) -> tuple[int, int]:
    limit = _int_query(request, "limit", 100, 1, 1000)
    return limit, _int_query(request, "offset", 0, 0, MAX_OFFSET)


@routes.get("/api/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    check_tenant_claim(principal, request.query.get("tenantId"))
    limit, offset = _page(request)
    platform = request.query.get("platform")
    if platform is not None and platform not in {p.value for p in Platform}:
        raise ApiError(400, "invalid_query", "platform must be web, slack or discord")
    if principal.user_id is not None:  # a visitor: web sessions only (see visible_session)
        if platform not in (None, Platform.WEB.value):
            return json_response([])
        platform = Platform.WEB.value
    sessions = await request.app[CONTEXT].store.list_sessions(
        principal.tenant.id,
        user_id=principal.user_id or request.query.get("userId"),
        platform=Platform(platform) if platform else None,
        limit=limit,
        offset=offset,
    )
    return json_response([session_summary(s) for s in sessions])


@routes.get("/api/sessions/{session_id}")
async def get_session(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    check_tenant_claim(principal, request.query.get("tenantId"))
    session = await visible_session(request, principal)
    turns = await request.app[CONTEXT].store.history(
        principal.tenant.id, session.id, principal.tenant.config.sessions.max_turns
    )
    detail = session_summary(session)
    detail["transcript"] = [
        {"role": t.role.value, "text": t.text, "timestamp": t.timestamp} for t in turns
    ]
    if any(t.files or t.actions for t in turns):  # answers' files and buttons, as answered
        from adapters.web.answers import parts_json

        for item, t in zip(detail["transcript"], turns, strict=True):
            if t.files or t.actions:
                parts = (t.timestamp, t.files, t.actions)
                item.update(parts_json(request, principal.tenant.id, session.id, *parts))
    return json_response(detail)


@routes.delete("/api/sessions/{session_id}")
async def delete_session(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    check_tenant_claim(principal, request.query.get("tenantId"))
    session = await visible_session(request, principal)
    await request.app[CONTEXT].store.delete_session(principal.tenant.id, session.id)
    return web.Response(status=204)


@routes.get("/api/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    from adapters.web.openapi import openapi_document

    return json_response(openapi_document())


# Admin API -------------------------------------------------------------------------------


def require_admin(request: web.Request) -> None:
    token = request.app[CONTEXT].admin_token
    if token is None:
        raise ApiError(403, "forbidden", "the admin API is disabled (set admin.token)")
    presented = bearer(request)
    if presented is None:
        raise ApiError(401, "unauthorized", "missing admin token")
    if not hmac.compare_digest(presented.encode(), token.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "invalid admin token")


def tenant_info(runtime: TenantRuntime) -> dict[str, Any]:
    config = runtime.config
    return {
        "id": config.id,
        "name": config.name,
        "source": runtime.source,
        "agent": config.agent.url or f"builtin:{config.agent.builtin}",
        "web": config.web.enabled,
        "slackApps": [a.name for a in config.slack.apps],
        "discordBots": [b.name for b in config.discord.bots],
    }


async def _admin_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    data = parse_json(await read_body(request))
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", "body must be a JSON object")
    return data


def _config_error(exc: ConfigError) -> ApiError:
    return ApiError(
        400, "invalid_tenant", "; ".join(f"{p.path}: {p.message}" for p in exc.problems)
    )


@routes.get("/admin/tenants")
async def admin_list_tenants(request: web.Request) -> web.Response:
    require_admin(request)
    tenants = sorted(request.app[CONTEXT].tenants.all(), key=lambda t: t.id)
    return json_response([tenant_info(t) for t in tenants])


@routes.post("/admin/tenants")
async def admin_create_tenant(request: web.Request) -> web.Response:
    require_admin(request)
    spec = await _admin_body(request)
    try:
        runtime = await request.app[CONTEXT].tenants.create(spec)
    except ConfigError as exc:
        raise _config_error(exc) from None
    except ConflictError as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return json_response(tenant_info(runtime), status=201)


def _admin_tenant(request: web.Request) -> TenantRuntime:
    tenant_id = request.match_info["tenant_id"]
    runtime = request.app[CONTEXT].tenants.get(tenant_id)
    if runtime is None:
        raise ApiError(404, "not_found", f"no tenant {tenant_id!r}")
    return runtime


@routes.get("/admin/tenants/{tenant_id}")
async def admin_get_tenant(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(tenant_info(_admin_tenant(request)))


@routes.put("/admin/tenants/{tenant_id}")
async def admin_update_tenant(request: web.Request) -> web.Response:
    require_admin(request)
    spec = await _admin_body(request)
    tenant_id = request.match_info["tenant_id"]
    if "id" in spec and spec["id"] != tenant_id:
        raise ApiError(400, "invalid_tenant", "id in the body differs from the path")
    try:
        runtime = await request.app[CONTEXT].tenants.update(tenant_id, spec)
    except ConfigError as exc:
        raise _config_error(exc) from None
    except ConflictError as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return json_response(tenant_info(runtime))


@routes.delete("/admin/tenants/{tenant_id}")
async def admin_delete_tenant(request: web.Request) -> web.Response:
    require_admin(request)
    try:
        await request.app[CONTEXT].tenants.delete(request.match_info["tenant_id"])
    except ConflictError as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return web.Response(status=204)


@routes.get("/admin/tenants/{tenant_id}/keys")
async def admin_list_keys(request: web.Request) -> web.Response:
    require_admin(request)
    runtime = _admin_tenant(request)
    keys = await request.app[CONTEXT].store.list_api_keys(runtime.id)
    return json_response(
        [{"keyId": k.key_id, "label": k.label, "createdAt": k.created_at} for k in keys]
    )


@routes.post("/admin/tenants/{tenant_id}/keys")
async def admin_create_key(request: web.Request) -> web.Response:
    require_admin(request)
    runtime = _admin_tenant(request)
    body = (
        validate(schemas.KeyCreateRequest, await _admin_body(request))
        if request.can_read_body
        else schemas.KeyCreateRequest()
    )
    record, key = await request.app[CONTEXT].tenants.create_key(runtime.id, body.label)
    return json_response(
        {"keyId": record.key_id, "key": key, "label": record.label}, status=201
    )


@routes.delete("/admin/tenants/{tenant_id}/keys/{key_id}")
async def admin_delete_key(request: web.Request) -> web.Response:
    require_admin(request)
    runtime = _admin_tenant(request)
    await request.app[CONTEXT].tenants.delete_key(runtime.id, request.match_info["key_id"])
    return web.Response(status=204)


# Errors of the HTTP parser -------------------------------------------------------------------

#: What a client is told about a request aiohttp could not parse; most specific first.
_PARSER_ERRORS: list[tuple[type[BaseException], str]] = [
    (LineTooLong, "the request line or a header is too long"),
    (BadHttpMethod, "the request method is not a valid HTTP method"),
    (BadStatusLine, "the request line is malformed"),
    (InvalidURLError, "the request target is malformed"),
    (InvalidHeader, "a header is malformed"),
    (PayloadEncodingError, "the body's encoding (chunked or Content-Length) is malformed"),
]


def parser_error_body(status: int, exc: BaseException | None) -> dict[str, Any]:
    """The JSON error for a request that failed before reaching a handler."""
    if status >= 500:
        message = "internal error; see the gateway's log"
        return {"error": {"code": "internal_error", "message": message}}
    message = next(
        (text for kind, text in _PARSER_ERRORS if isinstance(exc, kind)),
        "the request is not valid HTTP (its request line, a header or its chunked encoding "
        "is malformed)",
    )
    return {"error": {"code": _STATUS_CODES.get(status, "bad_request"), "message": message}}


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, with parser errors answered as our JSON errors.

    aiohttp's own `handle_error` answers text/plain quoting the offending bytes and logs the
    exception, whose text quotes them too: a malformed `Authorization` line put the key in the
    log. Here neither the answer nor the log line carries the request's bytes. The server's
    connection handler (adapters/web/server.py) is one of these.
    """

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error = type(exc).__name__ if exc is not None else None
        if status >= 500:
            # Raised by our own code (a handler or middleware), not by the parser: the
            # traceback is wanted, and it goes through the secret scrubber like every line.
            log.error("http_request_failed", status=status, error=error, exc_info=exc)
        else:
            log.info("http_request_rejected", status=status, error=error, remote=request.remote)
        if request.writer.output_size > 0:
            # Part of an answer is out: the connection is broken, as in aiohttp.
            raise ConnectionError("the response is already being sent")
        response = web.Response(
            status=status,
            body=codec.dumps(parser_error_body(status, exc)),
            content_type="application/json",
        )
        response.force_close()
        return response


def create_app(context: WebContext) -> web.Application:
    """Build the aiohttp application serving every tenant's web API."""
    app = web.Application(
        middlewares=[error_middleware], client_max_size=context.server.max_body_bytes
    )
    app[CONTEXT] = context
    app[TOKEN_RESOLVERS] = []
    app.add_routes(routes)
    from adapters.web.lifecycle import routes as lifecycle_routes

    app.add_routes(lifecycle_routes)  # a tenant's purge, a user's export and erasure
    app.add_routes(context.extra_routes)
    from adapters.web.chat import install

    install(app)  # the browser chat: pages, widget, visitor tokens, CORS, streaming
    from adapters.web.files import install as install_files

    install_files(app)  # file links for agents, web uploads
    from adapters.web.callbacks import install as install_callbacks

    install_callbacks(app)  # agents' later answers (202 + callback)
    return app
