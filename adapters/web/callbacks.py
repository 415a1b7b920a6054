"""The callback endpoint agents POST later answers to, and the web page's view of a pending one.

`POST /api/callbacks/{id}` with `Authorization: Bearer <callback.token>` (docs/agent-protocol.md,
"Answering later"); `GET /api/sessions/{id}/callback` tells the chat page whether the session's
answer is still to come (docs/api.md). The work is chatgateway/callbacks.py's.
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from aiohttp import web
from pydantic import Field

from adapters.web import schemas
from adapters.web.app import (
    CONTEXT,
    ApiError,
    authenticate,
    bearer,
    check_tenant_claim,
    json_response,
    read_json,
    visible_session,
)
from chatgateway.callbacks import Callbacks, CallbackTokenError
from chatgateway.models import TenantId
from chatgateway.signing import Signer

log = structlog.get_logger("chatgateway.web.callbacks")

NDJSON = "application/x-ndjson"
#: The longest line of an NDJSON callback (as for the agents' streamed answers).
MAX_LINE = 512 * 1024


class CallbackBody(schemas.Body):
    text: str = Field(description="The answer (final), or the next piece of it (final: false)")
    final: bool = Field(True, description="false: a progress update, appended to what is shown")


routes = web.RouteTableDef()


def _service(request: web.Request) -> Callbacks:
    service = request.app[CONTEXT].pipeline.callbacks
    if service is None:
        raise ApiError(404, "not_found", "agent callbacks are not enabled on this gateway")
    return service


def _refused(result: str) -> ApiError:
    if result == "expired":
        return ApiError(
            410, "callback_expired", "the callback expired: the user got the fallback text"
        )
    if result == "already":
        return ApiError(409, "callback_finished", "the final answer was received already")
    return ApiError(404, "not_found", "no such callback")


@routes.post("/api/callbacks/{callback_id}")
async def agent_callback(request: web.Request) -> web.Response:
    """An agent's later answer: JSON {"text", "final"} or an NDJSON stream of deltas."""
    service = _service(request)
    token = bearer(request)
    if token is None:
        raise ApiError(
            401, "unauthorized", "missing callback token (Authorization: Bearer <callback.token>)"
        )
    callback_id = request.match_info["callback_id"]
    try:
        tenant_id = service.verify(token, callback_id, now=time.time())
    except CallbackTokenError as exc:
        raise ApiError(exc.status, exc.code, str(exc)) from None
    expires_at = float(Signer.expiry(token) or 0)
    if request.content_type == NDJSON:
        return await _stream(request, service, tenant_id, callback_id, expires_at)
    body = await read_json(request, CallbackBody)
    result = await service.receive(
        tenant_id, callback_id, body.text, final=body.final, expires_at=expires_at
    )
    if result == "accepted":
        return json_response({"delivered": True} if body.final else {"progress": True})
    if result == "already" and body.final:
        # A retried final (the agent did not see our answer): it was delivered once.
        return json_response({"delivered": "already"})
    raise _refused(result)


async def _stream(
    request: web.Request,
    service: Callbacks,
    tenant_id: TenantId,
    callback_id: str,
    expires_at: float,
) -> web.Response:
    """The streaming agent protocol's lines: {"delta"} as progress, the end as the final
    answer (all deltas), {"error"} as a failure (the user gets the fallback text)."""
    parts: list[str] = []
    error: str | None = None
    buffer = b""
    limit = request.app[CONTEXT].server.max_body_bytes
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:  # a stream is read as it comes: the body cap is applied here
            raise ApiError(413, "body_too_large", f"request body is larger than {limit} bytes")
        buffer += chunk
        if len(buffer) > MAX_LINE and b"\n" not in buffer:
            raise ApiError(400, "invalid_body", f"a line is longer than {MAX_LINE} bytes")
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            item = _line(raw)
            if item is None:
                continue
            if "error" in item:
                error = str(item["error"])[:200]
                break
            delta = item.get("delta")
            if isinstance(delta, str) and delta:
                parts.append(delta)
                result = await service.receive(
                    tenant_id, callback_id, delta, final=False, expires_at=expires_at
                )
                if result != "accepted":
                    if result == "already":
                        return json_response({"delivered": "already"})
                    raise _refused(result)
        if error is not None:
            break
    if error is None and buffer.strip():
        item = _line(buffer)
        if item is not None and "error" in item:
            error = str(item["error"])[:200]
        elif item is not None and isinstance(item.get("delta"), str):
            parts.append(item["delta"])
    if error is not None:
        log.warning("callback_agent_error", callback_id=callback_id, detail=error)
        runtime = request.app[CONTEXT].tenants.get(tenant_id)
        text = runtime.config.agent.fallback_text if runtime is not None else ""
    else:
        text = "".join(parts)
    result = await service.receive(tenant_id, callback_id, text, final=True, expires_at=expires_at)
    if result == "accepted":
        return json_response({"delivered": True})
    if result == "already":
        return json_response({"delivered": "already"})
    raise _refused(result)


def _line(raw: bytes) -> dict[str, Any] | None:
    line = raw.strip()
    if not line:
        return None
    try:
        item = json.loads(line)
    except ValueError:
        raise ApiError(400, "malformed_json", "a line of the stream is not JSON") from None
    if not isinstance(item, dict):
        raise ApiError(400, "invalid_body", "a line of the stream is not a JSON object")
    return item


@routes.get("/api/sessions/{session_id}/callback")
async def session_callback(request: web.Request) -> web.Response:
    """Whether the session's latest answer is still to come, and its text so far / final."""
    principal = await authenticate(request)
    check_tenant_claim(principal, request.query.get("tenantId"))
    session = await visible_session(request, principal)
    record = await request.app[CONTEXT].store.latest_callback(principal.tenant.id, session.id)
    if record is None:
        return json_response(
            {"pending": False, "text": None, "expired": False, "callbackId": None}
        )
    pending = record.state in ("pending", "received", "delivering")
    return json_response(
        {
            "pending": pending,
            "callbackId": record.callback_id,
            # While pending: the progress so far (final text not shown until delivered).
            "text": (record.text or "") if record.state == "pending" or not pending else "",
            "expired": record.expired,
            "expiresAt": record.expires_at,
        },
        headers={"Cache-Control": "no-store"},
    )


def openapi_paths(components: dict[str, Any]) -> dict[str, Any]:
    """The callback paths for the OpenAPI document; adds their schemas to `components`."""
    from adapters.web.openapi import _errors, _json, _ref

    schema = CallbackBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components["CallbackBody"] = schema
    gone = _json(_ref("ErrorResponse"), "The callback expired (the user got the fallback text)")
    finished = _json(_ref("ErrorResponse"), "A progress update after the final answer")
    status = {
        "type": "object",
        "required": ["pending", "text", "expired", "callbackId"],
        "properties": {
            "callbackId": {"type": ["string", "null"], "description": "Which answer this is"},
            "pending": {"type": "boolean", "description": "The answer is still to come"},
            "text": {
                "type": ["string", "null"],
                "description": "Pending: the progress so far; else the answer (null: none)",
            },
            "expired": {"type": "boolean", "description": "The answer is the fallback text"},
            "expiresAt": {"type": "number"},
        },
    }
    return {
        "/api/callbacks/{callback_id}": {
            "post": {
                "summary": "An agent's answer to a request it answered 202 Accepted",
                "description": "Authorization: Bearer <callback.token>; see "
                "docs/agent-protocol.md. JSON {text, final} or an NDJSON stream of deltas.",
                "security": [{}],
                "parameters": [
                    {
                        "name": "callback_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("CallbackBody")},
                        NDJSON: {"schema": {"type": "object"}},
                    },
                },
                "responses": {
                    "200": _json(
                        {"type": "object"},
                        '{"delivered": true}, {"delivered": "already"} or {"progress": true}',
                    ),
                    **_errors(400, 401, 404, 413, 415),
                    "409": finished,
                    "410": gone,
                },
            }
        },
        "/api/sessions/{session_id}/callback": {
            "get": {
                "summary": "Whether the session's answer is still to come (agent callbacks)",
                "security": [{"apiKey": []}],
                "parameters": [
                    {
                        "name": "session_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json(status, "The session's latest callback"),
                    **_errors(400, 401, 403, 404),
                },
            }
        },
    }


def install(app: web.Application) -> None:
    """Add the callback endpoint and the pending-answer view to the app."""
    app.add_routes(routes)
