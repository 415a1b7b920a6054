"""`chatgateway status` and `chatgateway reload`: the running gateway as a whole."""

from __future__ import annotations

import argparse
from typing import Any

from chatgateway.cli.client import EXIT_FAILURE, CommandError
from chatgateway.cli.common import Common, admin_client
from chatgateway.cli.output import fields, iso_time, table, to_json
from chatgateway.config import EXIT_CONFIG


def add_parser(sub: Any, common: Common) -> None:
    """Add `status` and `reload`."""
    parents = [common.config, common.admin, common.output]
    sub.add_parser(
        "status",
        parents=parents,
        help="show the running gateway's state, tenants, adapters and sessions",
        description="Show GET /admin/status: state, health, version, uptime, last reload, "
        "and per tenant its adapters, sessions and circuit breaker. Exits 1 when the "
        "gateway is not ready or not healthy.",
    )
    sub.add_parser(
        "reload",
        parents=parents,
        help="re-read the config file and apply what changed (like SIGHUP)",
        description="Ask the running gateway to re-read its config file and apply only what "
        "changed. An invalid file changes nothing and exits 78 with every problem.",
    )


async def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    """Run `status` or `reload`; the exit code."""
    async with admin_client(args, environ) as client:
        if args.command == "status":
            return _show_status(args, await client.call("GET", "/admin/status"))
        try:
            result = await client.call("POST", "/admin/reload")
        except CommandError as exc:
            if exc.api_code == "invalid_config":
                raise CommandError(EXIT_CONFIG, exc.message, exc.api_code) from None
            raise
    return _show_reload(args, result)


def _healthy(status: dict[str, Any]) -> bool:
    return bool(status.get("ready")) and bool(status.get("health", {}).get("ok", True))


def _adapters(tenant: dict[str, Any]) -> list[str]:
    return [f"{a['platform']}:{a['name']}={a['state']}" for a in tenant.get("adapters", [])]


def _show_status(args: argparse.Namespace, status: dict[str, Any]) -> int:
    code = 0 if _healthy(status) else EXIT_FAILURE
    if args.json:
        print(to_json(status))
        return code
    health = status.get("health", {})
    reload = status.get("lastReload")
    listen = status.get("listen", {})
    instance = status.get("instance", {})
    print(
        fields(
            [
                ("state", status["state"]),
                ("ready", bool(status.get("ready"))),
                ("health", "ok" if health.get("ok") else "; ".join(health.get("problems", []))),
                ("version", status.get("version")),
                ("pid", status.get("pid")),
                ("started", f"{iso_time(status.get('startedAt'))} "
                            f"(up {status.get('uptimeSeconds')} s)"),
                ("listen", f"{listen.get('host')}:{listen.get('port')}"),
                ("instance", f"{instance.get('id')} ({instance.get('coordination')})"),
                ("config", status.get("configFile")),
                ("in flight", status.get("inFlight")),
                ("last reload", _reload_line(reload) if reload else None),
            ]
        )
    )  # fmt: skip
    print()
    rows = [
        (
            t["id"],
            t.get("source"),
            t.get("sessions", {}).get("active"),
            t.get("sessions", {}).get("total"),
            (t.get("breaker") or {}).get("state"),
            _adapters(t),
        )
        for t in status.get("tenants", [])
    ]
    print(table(["tenant", "source", "active sessions", "sessions", "breaker", "adapters"], rows))
    return code


def _reload_line(reload: dict[str, Any]) -> str:
    outcome = "ok" if reload.get("ok") else "rejected"
    return f"{iso_time(reload.get('at'))} {outcome}, {len(reload.get('changes', []))} change(s)"


def _show_reload(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if args.json:
        print(to_json(result))
        return 0
    changes = result.get("changes", [])
    print(f"reloaded at {iso_time(result.get('at'))}: {len(changes)} change(s)")
    for change in changes:
        print(f"  {change}")
    pending = result.get("restartNeeded", [])
    if pending:
        print(f"needs a restart to apply: {', '.join(pending)}")
    return 0
