"""Operations endpoints: /healthz, /readyz, /metrics, GET /admin/status, POST /admin/reload.

The daemon passes itself in as `Operations`; see docs/operations.md for what each one answers.
"""

from __future__ import annotations

import ipaddress
import time
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters.web.app import (
    PROXY_HEADERS,
    ApiError,
    bearer,
    is_loopback_host,
    json_response,
    require_admin,
)
from chatgateway.errors import ConfigError
from chatgateway.metrics import Metrics

if TYPE_CHECKING:
    from chatgateway.daemon import ReloadResult
    from chatgateway.pipeline import Pipeline


class Operations(Protocol):
    """What the ops endpoints need from the daemon."""

    metrics: Metrics
    pipeline: Pipeline | None

    def readiness(self) -> tuple[bool, str]: ...

    async def refresh_metrics(self) -> None: ...

    async def status_report(self) -> dict[str, Any]: ...

    async def reload(self) -> ReloadResult: ...


def _peer_is_loopback(request: web.Request) -> bool:
    """A local caller: a loopback peer naming a loopback Host, and not a reverse proxy."""
    # Behind a proxy on the same host every caller on the internet is a loopback peer; a
    # browser page whose name was rebound to 127.0.0.1 is one too, but sends its own Host.
    if any(header in request.headers for header in PROXY_HEADERS):
        return False
    if not is_loopback_host(request.host):
        return False
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def ops_routes(ops: Operations) -> list[web.RouteDef]:
    """The routes, bound to one daemon; add them with WebContext.extra_routes."""
    started = time.time()

    async def healthz(request: web.Request) -> web.Response:
        # The process answers HTTP: it is alive (readiness is a separate question).
        return json_response({"status": "ok", "uptimeSeconds": round(time.time() - started, 1)})

    async def readyz(request: web.Request) -> web.Response:
        ready, state = ops.readiness()
        return json_response(
            {"status": "ready" if ready else "unavailable", "state": state},
            status=200 if ready else 503,
        )

    async def metrics(request: web.Request) -> web.Response:
        # Open to loopback scrapers; anyone else needs the admin token as a bearer token.
        if not _peer_is_loopback(request) or bearer(request) is not None:
            require_admin(request)
        await ops.refresh_metrics()
        body = generate_latest(ops.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def admin_status(request: web.Request) -> web.Response:
        require_admin(request)
        report = await ops.status_report()
        pipeline = ops.pipeline
        if pipeline is not None:
            # Each tenant's agent circuit breaker, from the one admission point.
            for item in report.get("tenants", []):
                tenant = pipeline.tenants.get(item["id"])
                if tenant is not None:
                    item["breaker"] = pipeline.admission.breaker_status(
                        tenant.id, tenant.config.breaker
                    )
        return json_response(report)

    async def admin_reload(request: web.Request) -> web.Response:
        require_admin(request)
        try:
            result = await ops.reload()
        except ConfigError as exc:
            raise ApiError(
                400,
                "invalid_config",
                "the new configuration is invalid and was not applied; the old one keeps "
                "running: " + "; ".join(f"{p.path or p.file}: {p.message}" for p in exc.problems),
            ) from None
        return json_response(result.as_dict())

    return [
        web.get("/healthz", healthz, allow_head=True),
        web.get("/readyz", readyz, allow_head=True),
        web.get("/metrics", metrics),
        web.get("/admin/status", admin_status),
        web.post("/admin/reload", admin_reload),
    ]
