"""Files over HTTP: the links agents fetch users' files with, and web chat uploads.

`GET /v1/files/{token}` serves a file link made by chatgateway/files.py: the token says whose
file it is (tenant, platform, adapter, message) and is signed, so nothing in the request can
point it at another tenant's credential or another host. The file is streamed from the
platform (or the upload directory) in chunks, never held whole, under the tenant's
`files.max_bytes`. `POST /api/files` stores a web visitor's upload for a chat message to name
(`files` in the chat request). docs/api.md describes both.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import web

from adapters.web.app import (
    CONTEXT,
    ApiError,
    authenticate,
    check_tenant_claim,
    json_response,
    request_address,
    require_web,
)
from chatgateway.errors import RateLimitedError
from chatgateway.files import (
    CHUNK_BYTES,
    FileError,
    FileLinks,
    FileService,
    UploadStore,
    human,
    uploads_root,
)
from chatgateway.models import Platform
from chatgateway.signing import SignatureError

log = structlog.get_logger("chatgateway.web.files")

FILES = web.AppKey("files", FileService)
#: Longest file name kept for an upload (characters).
MAX_NAME = 255
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\\\]")

routes = web.RouteTableDef()


def _service(request: web.Request) -> FileService:
    service = request.app.get(FILES)
    if service is None:
        raise ApiError(503, "unavailable", "the gateway is starting")
    return service


def _content_disposition(name: str) -> str:
    """Always a download (`attachment`): a user's file never renders as a page of ours."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = re.sub(r'["\\\x00-\x1f\x7f]', "_", ascii_name) or "file"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


@routes.get("/v1/files/{token}")
async def serve_file(request: web.Request) -> web.StreamResponse:
    """Stream the file a signed link names, fetched with its own tenant's credential."""
    service = _service(request)
    try:
        claim = service.links.verify(request.match_info["token"], now=time.time())
    except SignatureError as exc:
        if "expired" in str(exc):
            raise ApiError(410, "link_expired", "this file link has expired") from None
        raise ApiError(403, "invalid_link", "this file link is not valid") from None
    tenant = request.app[CONTEXT].tenants.get(claim.tenant_id)
    if tenant is None:
        raise ApiError(404, "not_found", "the file's tenant no longer exists")
    max_bytes = tenant.config.files.max_bytes
    try:
        stream = await service.open(tenant.config, claim)
    except FileError as exc:
        raise ApiError(exc.status, exc.code, str(exc)) from None
    try:
        if stream.size is not None and stream.size > max_bytes:
            raise ApiError(413, "file_too_large", f"the file is larger than {human(max_bytes)}")
        response = web.StreamResponse(
            headers={
                "Content-Type": claim.content_type or "application/octet-stream",
                "Content-Disposition": _content_disposition(claim.name),
                "Cache-Control": "private, no-store",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; sandbox",
            }
        )
        if stream.size is not None:
            response.content_length = stream.size
        await response.prepare(request)
        sent = 0
        async for chunk in stream.chunks:
            sent += len(chunk)
            if sent > max_bytes or (stream.size is not None and sent > stream.size):
                # The platform sends more than it said or than the cap: the transfer is cut
                # (the client sees a short body), never buffered.
                log.warning("file_cut", tenant_id=claim.tenant_id, max_bytes=max_bytes)
                if request.transport is not None:
                    request.transport.close()
                return response
            try:
                await response.write(chunk)
            except (ConnectionError, RuntimeError):
                # The agent went away mid-file: nothing to answer, nothing to log as an error.
                log.info("file_aborted", tenant_id=claim.tenant_id, bytes=sent)
                return response
        await response.write_eof()
        log.info(
            "file_served",
            tenant_id=claim.tenant_id,
            platform=claim.platform.value,
            bytes=sent,
        )
        return response
    finally:
        await stream.close()


def _upload_name(request: web.Request) -> str:
    raw = request.query.get("name", "").strip()
    name = _UNSAFE_NAME.sub("_", raw.rsplit("/", 1)[-1].rsplit("\\", 1)[-1])[:MAX_NAME]
    return name or "file"


@routes.post("/api/files")
async def upload_file(request: web.Request) -> web.Response:
    """Store one file a web chat user uploads (the body, as is); its id goes in `files`."""
    service = _service(request)
    principal = await authenticate(request)
    require_web(principal)
    check_tenant_claim(principal, request.query.get("tenantId"))
    tenant = principal.tenant
    user_id = principal.user_id or request.query.get("userId")
    if not user_id or len(user_id) > 256:
        raise ApiError(400, "invalid_query", "userId: required with an API key (1-256 characters)")
    if service.uploads is None:
        raise ApiError(503, "unavailable", "web uploads are not available on this gateway")
    limits = tenant.config.limits
    if principal.public and limits.address is not None:
        admission = request.app[CONTEXT].pipeline.admission
        try:
            await admission.admit_address(tenant.id, request_address(request), limits)
        except RateLimitedError as exc:
            await admission.sleep(admission.hold(exc, limits))
            raise
    files = tenant.config.files
    name = _upload_name(request)
    content_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if not content_type or not files.allows(content_type):
        service.refused(tenant.id, Platform.WEB, "type")
        allowed = ", ".join(files.allowed_types)
        raise ApiError(
            415,
            "file_type_refused",
            f"{name}: files of type {content_type or '(none)'} are not accepted here "
            f"(allowed: {allowed})",
        )
    if request.content_length is not None and request.content_length > files.max_bytes:
        service.refused(tenant.id, Platform.WEB, "too_large")
        raise ApiError(413, "file_too_large", f"{name} is larger than {human(files.max_bytes)}")

    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_chunked(CHUNK_BYTES):
            yield chunk

    # Uploads past the tenant's sessions.retention_days are deleted by the daemon's retention
    # run (chatgateway/retention.py), not here: an upload costs no scan of the directory.
    try:
        upload = await service.uploads.save(
            tenant.id, user_id, name, content_type, body(), max_bytes=files.max_bytes
        )
    except FileError as exc:
        if exc.code == "file_too_large":
            service.refused(tenant.id, Platform.WEB, "too_large")
        raise ApiError(exc.status, exc.code, str(exc)) from None
    log.info("file_uploaded", tenant_id=tenant.id, bytes=upload.size)
    return json_response(
        {
            "fileId": upload.id,
            "name": upload.name,
            "contentType": upload.content_type,
            "size": upload.size,
        },
        status=201,
    )


# Wiring ------------------------------------------------------------------------------------


async def _start(app: web.Application) -> None:
    ctx = app[CONTEXT]
    secret = ctx.secret
    environ: Any = getattr(ctx.tenants, "_environ", {})
    root = uploads_root(getattr(ctx.store, "path", None), environ)
    service = FileService(
        FileLinks(secret, ctx.public_url), UploadStore(root), metrics=ctx.pipeline.metrics
    )
    app[FILES] = service
    ctx.pipeline.files = service  # attachments get links from now on


async def _stop(app: web.Application) -> None:
    service = app.get(FILES)
    if service is not None:
        if app[CONTEXT].pipeline.files is service:
            app[CONTEXT].pipeline.files = None
        await service.close()


def install(app: web.Application) -> None:
    """Add file links and web uploads to the app."""
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    app.add_routes(routes)


# OpenAPI -----------------------------------------------------------------------------------


def openapi_paths(components: dict[str, Any]) -> dict[str, Any]:
    """These paths for the OpenAPI document; adds their schemas to `components`."""
    from adapters.web.openapi import _TENANT_QUERY, _errors, _json, _object, _ref

    components["FileUploaded"] = _object(
        "An uploaded file; name its fileId in a chat request's files",
        fileId={"type": "string"},
        name={"type": "string"},
        contentType={"type": "string"},
        size={"type": "integer", "minimum": 0},
    )
    error = _ref("ErrorResponse")
    return {
        "/api/files": {
            "post": {
                "summary": "Upload a file for the web chat (the body is the file)",
                "description": "Content-Type must be one of the tenant's files.allowed_types "
                "(else 415) and the body at most files.max_bytes (else 413). The answer's "
                "fileId goes in a chat request's files. See docs/api.md.",
                "security": [{"apiKey": []}],
                "parameters": [
                    {
                        "name": "name",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "The file's name",
                    },
                    {
                        "name": "userId",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "With an API key: the user the file belongs to",
                    },
                    _TENANT_QUERY,
                ],
                "requestBody": {
                    "required": True,
                    "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                },
                "responses": {
                    "201": _json(_ref("FileUploaded"), "Stored"),
                    **_errors(400, 401, 403, 429, 503),
                    "413": _json(error, "The file is larger than files.max_bytes"),
                    "415": _json(error, "The file's type is not in files.allowed_types"),
                },
            }
        },
        "/v1/files/{token}": {
            "get": {
                "summary": "A user's file, for the agent (a link from an attachment's url)",
                "description": "The token is the credential: signed, short-lived "
                "(files.link_ttl), for one tenant's file of one message. See docs/api.md.",
                "security": [{}],
                "parameters": [
                    {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "The file's bytes",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "403": _json(error, "The link is not valid (altered, or not a file link)"),
                    "404": _json(error, "The file (or its tenant) no longer exists"),
                    "410": _json(error, "The link has expired"),
                    "413": _json(error, "The file is larger than the tenant's files.max_bytes"),
                    "502": _json(error, "The platform could not be reached or refused"),
                    **_errors(503),
                },
            }
        },
    }
