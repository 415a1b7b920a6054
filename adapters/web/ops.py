"""Operations endpoints: /healthz, /readyz, /metrics, GET /admin/status, POST /admin/reload,
GET /admin/tenants/{id}/usage.

The daemon passes itself in as `Operations`; see docs/operations.md for what each one answers.
"""

from __future__ import annotations

import ipaddress
import time
from datetime import date, timedelta
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
from chatgateway.models import TenantId
from chatgateway.usage import utc_day

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


#: The longest span one usage request may ask for, in days.
MAX_USAGE_DAYS = 366


def usage_range(query: Any, today: str) -> tuple[str, str]:
    """The (from, to) days of a usage request; by default the 30 days up to today (UTC)."""
    days: dict[str, date] = {}
    for name in ("from", "to"):
        raw = query.get(name)
        if raw is None:
            continue
        try:
            days[name] = date.fromisoformat(raw)
        except ValueError:
            raise ApiError(
                400, "invalid_query", f"{name} must be a date as YYYY-MM-DD, got {raw[:40]!r}"
            ) from None
        if len(raw) != 10:  # fromisoformat also takes 20261202 and 2026-W49-3
            raise ApiError(400, "invalid_query", f"{name} must be a date as YYYY-MM-DD")
    last = days.get("to", date.fromisoformat(today))
    first = days.get("from", last - timedelta(days=29))
    if first > last:
        raise ApiError(400, "invalid_query", "from is after to")
    if (last - first).days >= MAX_USAGE_DAYS:
        raise ApiError(400, "invalid_query", f"ask for at most {MAX_USAGE_DAYS} days at once")
    return first.isoformat(), last.isoformat()


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

    async def admin_usage(request: web.Request) -> web.Response:
        require_admin(request)
        tenant_id = request.match_info["tenant_id"]
        pipeline = ops.pipeline
        if pipeline is None or pipeline.tenants.get(tenant_id) is None:
            raise ApiError(404, "not_found", f"no tenant {tenant_id!r}")
        first, last = usage_range(request.query, utc_day(time.time()))
        await pipeline.usage.flush()  # this instance's latest calls count too
        rows = await pipeline.store.usage(TenantId(tenant_id), first, last)
        days = [
            {"day": r.day, "calls": r.calls, "tokensIn": r.tokens_in, "tokensOut": r.tokens_out}
            for r in rows
        ]
        total = {
            "calls": sum(r.calls for r in rows),
            "tokensIn": sum(r.tokens_in for r in rows),
            "tokensOut": sum(r.tokens_out for r in rows),
        }
        return json_response(
            {"tenant": tenant_id, "from": first, "to": last, "days": days, "total": total}
        )

    return [
        web.get("/healthz", healthz, allow_head=True),
        web.get("/readyz", readyz, allow_head=True),
        web.get("/metrics", metrics),
        web.get("/admin/status", admin_status),
        web.post("/admin/reload", admin_reload),
        web.get("/admin/tenants/{tenant_id}/usage", admin_usage),
    ]
