"""Customers' data: purging a tenant, and one user's export and erasure (docs/api.md).

A tenant's API key reaches its own users only (every store call is scoped by the key's tenant);
a visitor token reaches its own web sessions only; the admin token reaches any tenant, including
one that is no longer configured but still has data in the store.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from adapters.web.app import (
    CONTEXT,
    ApiError,
    _text_problem,
    authenticate,
    check_tenant_claim,
    check_url,
    json_response,
    require_admin,
    session_summary,
)
from adapters.web.files import FILES
from chatgateway.errors import ConflictError
from chatgateway.files import UploadStore
from chatgateway.models import Platform, TenantId, Turn
from chatgateway.rich import MARK, action_json, file_json
from chatgateway.store.base import SessionTranscript

log = structlog.get_logger("chatgateway.web")

routes = web.RouteTableDef()


def camel(name: str) -> str:
    """A table name as a JSON key: api_keys -> apiKeys."""
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


def _path_value(request: web.Request, name: str) -> str:
    """A path parameter the store will compare: refuse what no backend can hold (400)."""
    check_url(request)
    value = request.match_info[name]
    problem = _text_problem(value)
    if problem is not None:
        raise ApiError(400, "invalid_path", f"{name} {problem}")
    return value


def _platform(request: web.Request) -> Platform | None:
    value = request.query.get("platform")
    if value is None:
        return None
    if value not in {p.value for p in Platform}:
        raise ApiError(400, "invalid_query", "platform must be web, slack or discord")
    return Platform(value)


def export_turn(turn: Turn) -> dict[str, Any]:
    """One turn of a user's export: its text (never the store's separator MARK), and an answer's
    files and buttons as the agent gave them (a file's bytes as base64 `data`, or the agent's
    `url`: what the gateway keeps; no expiring gateway link)."""
    item: dict[str, Any] = {
        "role": turn.role.value,
        "text": turn.text.replace(MARK, ""),
        "timestamp": turn.timestamp,
    }
    if turn.files:
        item["attachments"] = [file_json(f) for f in turn.files]
    if turn.actions:
        item["actions"] = [action_json(a) for a in turn.actions]
    return item


def export_document(
    tenant_id: str, user_id: str, platform: Platform | None, found: list[SessionTranscript]
) -> dict[str, Any]:
    """The JSON of a user's export: every session with its whole transcript."""
    sessions = []
    for item in found:
        detail = session_summary(item.session)
        detail["transcript"] = [export_turn(t) for t in item.turns]
        sessions.append(detail)
    return {
        "tenantId": tenant_id,
        "userId": user_id,
        "platform": platform.value if platform else None,
        "exportedAt": time.time(),
        "sessions": sessions,
    }


#: What a route about one user does once the caller may reach them: (request, tenant, user,
#: platform filter) -> the JSON answer, or None when the user has no sessions there.
UserCall = Callable[[web.Request, str, str, Platform | None], Awaitable[dict[str, Any] | None]]


def _user_route(call: UserCall, *, admin: bool = False) -> Handler:
    """A route about one user: who may reach them (the admin token any tenant's, else the
    caller's own, see `_own_user`), the call, a 404 when the user has no sessions, the JSON."""

    async def route(request: web.Request) -> web.StreamResponse:
        tenant_id, user_id, platform = _admin_user(request) if admin else await _own_user(request)
        answer = await call(request, tenant_id, user_id, platform)
        if answer is None:
            # 404 whether the user never wrote or belongs to another tenant: nothing to tell apart.
            raise ApiError(404, "not_found", f"no sessions of user {user_id!r}")
        return json_response(answer)

    return route


async def _export(
    request: web.Request, tenant_id: str, user_id: str, platform: Platform | None
) -> dict[str, Any] | None:
    store = request.app[CONTEXT].store
    found = await store.export_user(TenantId(tenant_id), user_id, platform=platform)
    if not found:
        return None
    log.info("user_exported", tenant_id=tenant_id, sessions=len(found))
    return export_document(tenant_id, user_id, platform, found)


async def _erase(
    request: web.Request, tenant_id: str, user_id: str, platform: Platform | None
) -> dict[str, Any] | None:
    store = request.app[CONTEXT].store
    deleted = await store.erase_user(TenantId(tenant_id), user_id, platform=platform)
    uploads = _uploads(request)
    if uploads is not None and platform in (None, Platform.WEB):
        if count := uploads.delete_user(tenant_id, user_id):  # web chat files
            deleted["uploads"] = count
    if not deleted.get("sessions"):
        return None
    # The user id itself is personal data: the log line says how much, not whose.
    log.info("user_erased", tenant_id=tenant_id, **deleted)
    return {
        "tenantId": tenant_id,
        "userId": user_id,
        "platform": platform.value if platform else None,
        "deleted": {camel(k): v for k, v in deleted.items()},
    }


def _uploads(request: web.Request) -> UploadStore | None:
    """Where web chat uploads are kept (tenant data, deleted with the rest)."""
    service = request.app.get(FILES)
    return service.uploads if service is not None else None


async def _own_user(request: web.Request) -> tuple[str, str, Platform | None]:
    """The caller's tenant, the user in the path and the platform filter, if it may reach them."""
    principal = await authenticate(request)
    check_tenant_claim(principal, request.query.get("tenantId"))
    user_id = _path_value(request, "user_id")
    platform = _platform(request)
    if principal.user_id is not None:
        # A visitor token: its own web sessions only (a Slack user may share the id).
        if user_id != principal.user_id or platform not in (None, Platform.WEB):
            raise ApiError(404, "not_found", f"no sessions of user {user_id!r}")
        platform = Platform.WEB
    return principal.tenant.id, user_id, platform


def _admin_user(request: web.Request) -> tuple[str, str, Platform | None]:
    require_admin(request)
    return (
        _path_value(request, "tenant_id"),
        _path_value(request, "user_id"),
        _platform(request),
    )


export_user = routes.get("/api/users/{user_id}/export")(_user_route(_export))
erase_user = routes.delete("/api/users/{user_id}")(_user_route(_erase))
admin_export_user = routes.get("/admin/tenants/{tenant_id}/users/{user_id}/export")(
    _user_route(_export, admin=True)
)
admin_erase_user = routes.delete("/admin/tenants/{tenant_id}/users/{user_id}")(
    _user_route(_erase, admin=True)
)


@routes.post("/admin/tenants/{tenant_id}/purge")
async def admin_purge_tenant(request: web.Request) -> web.Response:
    require_admin(request)
    tenant_id = _path_value(request, "tenant_id")
    tenants = request.app[CONTEXT].tenants
    runtime = tenants.get(tenant_id)
    try:
        deleted = await tenants.purge(tenant_id)
    except ConflictError as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    uploads = _uploads(request)
    if uploads is not None and (count := uploads.delete_tenant(tenant_id)):
        deleted["uploads"] = count  # web chat files
    return json_response(
        {
            "tenantId": tenant_id,
            "tenantRemoved": runtime is not None,
            "deleted": {camel(k): v for k, v in deleted.items()},
        }
    )


# OpenAPI ---------------------------------------------------------------------------------------


def openapi_paths(components: dict[str, Any]) -> dict[str, Any]:
    """These paths for the OpenAPI document; adds their schemas to `components`."""
    from adapters.web.openapi import _TENANT_QUERY, _errors, _json, _object, _ref

    counts = {
        "type": "object",
        "description": "Rows deleted, by table (sessions, turns, apiKeys, processedEvents, "
        "eventClaims, tenants, ...; a table without rows of this tenant shows 0)",
        "additionalProperties": {"type": "integer", "minimum": 0},
    }
    platform_or_null = {"anyOf": [{"type": "string", "enum": ["web", "slack", "discord"]},
                                  {"type": "null"}]}  # fmt: skip
    components["ExportedFile"] = {
        "type": "object",
        "description": "A file of an answer as the agent gave it: its bytes (base64 `data`, "
        "kept with the transcript) or its `url` (the agent's, as stored)",
        "required": ["name", "contentType"],
        "properties": {
            "name": {"type": "string"},
            "contentType": {"type": "string"},
            "url": {"type": "string"},
            "data": {"type": "string", "contentEncoding": "base64"},
        },
    }
    turn = _object(
        "A turn: its text; an answer's files and buttons only when it has some",
        role={"type": "string", "enum": ["user", "agent"]},
        text={"type": "string"},
        timestamp={"type": "number"},
    )
    turn["properties"]["attachments"] = {"type": "array", "items": _ref("ExportedFile")}
    turn["properties"]["actions"] = {"type": "array", "items": _ref("AnswerAction")}
    components["ExportedTurn"] = turn
    components["ExportedSession"] = {
        "allOf": [
            _ref("SessionSummary"),
            _object(
                "The session's whole stored transcript, oldest first",
                transcript={"type": "array", "items": _ref("ExportedTurn")},
            ),
        ]
    }
    components["UserExport"] = _object(
        "Every session of one user with its whole stored transcript, oldest first",
        tenantId={"type": "string"},
        userId={"type": "string"},
        platform=platform_or_null,
        exportedAt={"type": "number", "description": "Unix time"},
        sessions={"type": "array", "items": _ref("ExportedSession")},
    )
    components["UserErased"] = _object(
        "What an erasure deleted",
        tenantId={"type": "string"},
        userId={"type": "string"},
        platform=platform_or_null,
        deleted=counts,
    )
    components["TenantPurged"] = _object(
        "What a purge deleted",
        tenantId={"type": "string"},
        tenantRemoved={
            "type": "boolean",
            "description": "A runtime tenant was removed too (a former config tenant: false)",
        },
        deleted=counts,
    )
    user_path = {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "The web userId, Slack user id or Discord user id"}  # fmt: skip
    tenant_path = {"name": "tenant_id", "in": "path", "required": True,
                   "schema": {"type": "string"}}  # fmt: skip
    platform = {
        "name": "platform",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["web", "slack", "discord"]},
        "description": "Only this platform's sessions (user ids are per platform)",
    }
    auth: list[dict[str, list[str]]] = [{"apiKey": []}]
    admin: list[dict[str, list[str]]] = [{"adminToken": []}]
    no_data = "404: the user has no sessions in this tenant (or is another tenant's)"
    export = _json(_ref("UserExport"), "The user's data")
    erased = _json(_ref("UserErased"), "Erased")
    return {
        "/api/users/{user_id}/export": {
            "get": {
                "summary": "Export every session and transcript of one of the tenant's users",
                "description": no_data,
                "security": auth,
                "parameters": [user_path, platform, _TENANT_QUERY],
                "responses": {"200": export, **_errors(400, 401, 403, 404)},
            }
        },
        "/api/users/{user_id}": {
            "delete": {
                "summary": "Erase every session and transcript of one of the tenant's users",
                "description": no_data,
                "security": auth,
                "parameters": [user_path, platform, _TENANT_QUERY],
                "responses": {"200": erased, **_errors(400, 401, 403, 404)},
            }
        },
        "/admin/tenants/{tenant_id}/users/{user_id}/export": {
            "get": {
                "summary": "Export one user's sessions and transcripts of any tenant",
                "description": no_data,
                "security": admin,
                "parameters": [tenant_path, user_path, platform],
                "responses": {"200": export, **_errors(400, 401, 403, 404)},
            }
        },
        "/admin/tenants/{tenant_id}/users/{user_id}": {
            "delete": {
                "summary": "Erase one user's sessions and transcripts of any tenant",
                "description": no_data,
                "security": admin,
                "parameters": [tenant_path, user_path, platform],
                "responses": {"200": erased, **_errors(400, 401, 403, 404)},
            }
        },
        "/admin/tenants/{tenant_id}/purge": {
            "post": {
                "summary": "Delete every row of a tenant's data; a runtime tenant goes with it",
                "description": "For a runtime tenant or one removed from the config file; a "
                "tenant still in the config file is refused (409). A tenant without data "
                "answers zero counts: purging twice is harmless.",
                "security": admin,
                "parameters": [tenant_path],
                "responses": {
                    "200": _json(_ref("TenantPurged"), "Purged"),
                    **_errors(400, 401, 403, 409),
                },
            }
        },
    }
