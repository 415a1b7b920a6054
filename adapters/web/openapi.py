"""The OpenAPI document, generated from the same pydantic models that validate requests."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel

from adapters.web import schemas
from chatgateway import __version__
from chatgateway.config import TenantConfig

_REF = "#/components/schemas/{model}"
_MODELS: list[type[BaseModel]] = [
    schemas.ChatRequest,
    schemas.ChatResponse,
    schemas.SessionSummary,
    schemas.SessionDetail,
    schemas.TranscriptTurn,
    schemas.ErrorResponse,
    schemas.ErrorDetail,
    schemas.KeyCreateRequest,
    schemas.KeyCreated,
    schemas.KeyInfo,
    schemas.TenantInfo,
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON, wrong types or unknown fields, a NUL character in a string, "
        "path or query, or JSON nested deeper than 32 levels",
        401: "Missing or invalid credential",
        403: "The credential may not do this (e.g. tenantId names another tenant)",
        404: "No such resource for this caller",
        409: "Conflicts with the current state",
        413: "Body larger than server.max_body_bytes",
        415: "Content-Type is not application/json",
        429: "The tenant has too many messages in flight, or a rate limit or quota refused "
        "the call (code rate_limited or quota_exceeded; Retry-After says when to retry)",
        503: "The gateway is starting or shutting down (unavailable)",
    }
    return {str(s): _json(_ref("ErrorResponse"), text[s]) for s in statuses}


_TENANT_QUERY = {
    "name": "tenantId",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "Optional; a value other than the key's tenant is refused with 403",
}
_SESSION_PATH = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
_TENANT_PATH = {"name": "tenant_id", "in": "path", "required": True, "schema": {"type": "string"}}
_USER_QUERY = {
    "name": "userId",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "Only this user's sessions",
}


_SECRET_VALUE = {
    "type": "object",
    "description": "A secret, given inline: a runtime tenant takes only {value: ...} "
    "(never env, file or credential: those would read the gateway host's secrets)",
    "required": ["value"],
    "properties": {"value": {"type": "string", "minLength": 1, "writeOnly": True}},
    "additionalProperties": False,
}


def _secret_refs(node: Any) -> Any:
    """`node` with each resolved-secret schema replaced by the SecretValue reference."""
    if isinstance(node, dict):
        if node.get("format") == "password" and node.get("type") == "string":
            # A resolved secret (pydantic's SecretStr): a request sends a reference instead.
            kept = {k: v for k, v in node.items() if k in ("title", "description")}
            return {**_ref("SecretValue"), **kept}
        return {key: _secret_refs(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_secret_refs(item) for item in node]
    return node


def tenant_spec_schemas() -> dict[str, Any]:
    """TenantSpec (the body of POST/PUT /admin/tenants) and the schemas it refers to.

    Generated from the TenantConfig model that validates it, so the two cannot drift.
    """
    schema = TenantConfig.model_json_schema(ref_template=_REF)
    schemas_: dict[str, Any] = _secret_refs(schema.pop("$defs", {}))
    schema = _secret_refs(schema)
    schema["title"] = "TenantSpec"
    schema["description"] = (
        "A tenant definition, as in the config file's tenants[] (docs/configuration.md); "
        "secrets inline as {value: ...}"
    )
    return {**schemas_, "TenantSpec": schema, "SecretValue": _SECRET_VALUE}


def _object(description: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": list(properties),
        "properties": properties,
    }


def _ops_paths(admin: list[dict[str, list[str]]]) -> dict[str, Any]:
    """The operations endpoints of adapters/web/ops.py (docs/operations.md)."""
    reload_result = _object(
        "What a reload changed",
        ok={"type": "boolean"},
        at={"type": "number", "description": "Unix time"},
        changes={"type": "array", "items": {"type": "string"}},
        restartNeeded={"type": "array", "items": {"type": "string"}},
        errors={"type": "array", "items": {"type": "string"}},
    )
    readiness = _object(
        "Readiness",
        status={"type": "string", "enum": ["ready", "unavailable"]},
        state={"type": "string", "description": "starting, ready, reloading, draining, stopped"},
    )
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness: the process serves HTTP (HEAD works too)",
                "security": [{}],
                "responses": {
                    "200": _json(
                        _object(
                            "Alive",
                            status={"type": "string", "enum": ["ok"]},
                            uptimeSeconds={"type": "number"},
                        ),
                        "Alive",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness, for load balancers (HEAD works too)",
                "security": [{}],
                "responses": {
                    "200": _json(readiness, "Ready: the store is open, every adapter started"),
                    "503": _json(readiness, "Not ready: starting or draining"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics; open to loopback, else the admin token",
                "security": [{}, *admin],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(401, 403),
                },
            }
        },
        "/admin/status": {
            "get": {
                "summary": "The per-tenant, per-adapter status report",
                "security": admin,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "description": "See docs/operations.md",
                            "properties": {
                                "version": {"type": "string"},
                                "state": {"type": "string"},
                                "ready": {"type": "boolean"},
                                "inFlight": {"type": "integer"},
                                "lastReload": {"anyOf": [reload_result, {"type": "null"}]},
                                "tenants": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                        "The status",
                    ),
                    **_errors(401, 403),
                },
            }
        },
        "/admin/reload": {
            "post": {
                "summary": "Re-read the config file and apply the difference",
                "security": admin,
                "responses": {
                    "200": _json(reload_result, "Applied"),
                    "400": _json(
                        _ref("ErrorResponse"),
                        "invalid_config: the new file is invalid; the old one keeps running",
                    ),
                    **_errors(401, 403, 503),
                },
            }
        },
        "/admin/tenants/{tenant_id}/usage": {
            "get": {
                "summary": "A tenant's agent calls and tokens by UTC day, for billing or capping",
                "security": admin,
                "parameters": [
                    _TENANT_PATH,
                    *(
                        {
                            "name": name,
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "format": "date"},
                            "description": description,
                        }
                        for name, description in (
                            ("from", "First day, YYYY-MM-DD (default: 29 days before to)"),
                            ("to", "Last day, YYYY-MM-DD (default: today, UTC)"),
                        )
                    ),
                ],
                "responses": {
                    "200": _json(_usage_schema(), "Days with usage, oldest first, and totals"),
                    "400": _json(
                        _ref("ErrorResponse"),
                        "invalid_query: from or to is not a date, from is after to, or the "
                        "range is longer than 366 days",
                    ),
                    **_errors(401, 403, 404),
                },
            }
        },
    }


def _usage_schema() -> dict[str, Any]:
    counts = {
        "calls": {"type": "integer", "description": "Agent calls (failed ones included)"},
        "tokensIn": {"type": "integer", "description": "Prompt tokens the agent reported"},
        "tokensOut": {"type": "integer", "description": "Completion tokens it reported"},
    }
    return _object(
        "A tenant's usage",
        tenant={"type": "string"},
        **{"from": {"type": "string", "format": "date"}},
        to={"type": "string", "format": "date"},
        days={
            "type": "array",
            "items": _object("One UTC day", day={"type": "string", "format": "date"}, **counts),
        },
        total=_object("Sums over the days", **counts),
    )


@functools.cache
def openapi_document() -> dict[str, Any]:
    """Build the OpenAPI 3.1 document of the chat and admin APIs."""
    components: dict[str, Any] = {}
    for model in _MODELS:
        schema = model.model_json_schema(ref_template=_REF)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    components.update(tenant_spec_schemas())
    tenant_spec = _ref("TenantSpec")
    auth: list[dict[str, list[str]]] = [{"apiKey": []}]
    admin: list[dict[str, list[str]]] = [{"adminToken": []}]
    from adapters.web.chat import openapi_paths  # the browser chat (docs/web-chat.md)

    webchat = openapi_paths(components)
    from adapters.web.lifecycle import openapi_paths as lifecycle_paths

    lifecycle = lifecycle_paths(components)  # purge, a user's export and erasure
    from adapters.web.files import openapi_paths as files_paths

    files = files_paths(components)  # file links and web uploads
    from adapters.web.callbacks import openapi_paths as callback_paths

    callbacks = callback_paths(components)  # agents' later answers
    return {
        "openapi": "3.1.0",
        "info": {"title": "chatgateway", "version": __version__},
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant's API key (or a visitor token)",
                },
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The gateway's admin.token",
                },
            },
        },
        "paths": {
            **webchat,
            **lifecycle,
            **files,
            **callbacks,
            **_ops_paths(admin),
            "/api/chat": {
                "post": {
                    "summary": "Send a message to the tenant's agent and get its answer",
                    "security": auth,
                    "parameters": [_TENANT_QUERY],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ChatRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("ChatResponse"), "The agent's answer"),
                        **_errors(400, 401, 403, 404, 413, 415, 429, 503),
                    },
                }
            },
            "/api/sessions": {
                "get": {
                    "summary": "List the caller's tenant's sessions, most recent first",
                    "security": auth,
                    "parameters": [
                        _TENANT_QUERY,
                        _USER_QUERY,
                        {
                            "name": "platform",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["web", "slack", "discord"]},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {"type": "array", "items": _ref("SessionSummary")}, "Sessions"
                        ),
                        **_errors(400, 401, 403),
                    },
                }
            },
            "/api/sessions/{session_id}": {
                "get": {
                    "summary": "One session with its transcript",
                    "security": auth,
                    "parameters": [_SESSION_PATH, _TENANT_QUERY, _USER_QUERY],
                    "responses": {
                        "200": _json(_ref("SessionDetail"), "The session"),
                        **_errors(400, 401, 403, 404),
                    },
                },
                "delete": {
                    "summary": "Delete a session and its transcript",
                    "security": auth,
                    "parameters": [_SESSION_PATH, _TENANT_QUERY, _USER_QUERY],
                    "responses": {
                        "204": {"description": "Deleted"},
                        **_errors(400, 401, 403, 404),
                    },
                },
            },
            "/admin/tenants": {
                "get": {
                    "summary": "List tenants",
                    "security": admin,
                    "responses": {
                        "200": _json({"type": "array", "items": _ref("TenantInfo")}, "Tenants"),
                        **_errors(401, 403),
                    },
                },
                "post": {
                    "summary": "Register a tenant at runtime (persisted)",
                    "security": admin,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": tenant_spec}},
                    },
                    "responses": {
                        "201": _json(_ref("TenantInfo"), "Created"),
                        **_errors(400, 401, 403, 409, 415),
                    },
                },
            },
            "/admin/tenants/{tenant_id}": {
                "get": {
                    "summary": "One tenant",
                    "security": admin,
                    "parameters": [_TENANT_PATH],
                    "responses": {
                        "200": _json(_ref("TenantInfo"), "The tenant"),
                        **_errors(401, 403, 404),
                    },
                },
                "put": {
                    "summary": "Replace a runtime tenant's definition",
                    "security": admin,
                    "parameters": [_TENANT_PATH],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": tenant_spec}},
                    },
                    "responses": {
                        "200": _json(_ref("TenantInfo"), "Updated"),
                        **_errors(400, 401, 403, 404, 409, 415),
                    },
                },
                "delete": {
                    "summary": "Delete a runtime tenant with its keys and sessions",
                    "security": admin,
                    "parameters": [_TENANT_PATH],
                    "responses": {"204": {"description": "Deleted"}, **_errors(401, 403, 404, 409)},
                },
            },
            "/admin/tenants/{tenant_id}/keys": {
                "get": {
                    "summary": "List a tenant's API keys (ids and labels only)",
                    "security": admin,
                    "parameters": [_TENANT_PATH],
                    "responses": {
                        "200": _json({"type": "array", "items": _ref("KeyInfo")}, "Keys"),
                        **_errors(401, 403, 404),
                    },
                },
                "post": {
                    "summary": "Create an API key; the key is in this answer only",
                    "security": admin,
                    "parameters": [_TENANT_PATH],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": _ref("KeyCreateRequest")}},
                    },
                    "responses": {
                        "201": _json(_ref("KeyCreated"), "Created"),
                        **_errors(400, 401, 403, 404, 415),
                    },
                },
            },
            "/admin/tenants/{tenant_id}/keys/{key_id}": {
                "delete": {
                    "summary": "Revoke an API key",
                    "security": admin,
                    "parameters": [
                        _TENANT_PATH,
                        {
                            "name": "key_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {"204": {"description": "Revoked"}, **_errors(401, 403, 404)},
                }
            },
        },
    }
