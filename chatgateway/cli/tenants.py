"""`chatgateway tenants list|show|add|remove|purge`: the running gateway's tenants."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from chatgateway.cli.client import EXIT_USAGE, CommandError
from chatgateway.cli.common import Common, admin_client, config_file
from chatgateway.cli.output import fields, iso_time, table, to_json


def add_parser(sub: Any, common: Common) -> None:
    """Add `tenants` and its subcommands."""
    tenants = sub.add_parser(
        "tenants",
        help="list, show, add, remove and purge tenants",
        description="The running gateway's tenants, through its admin API. Tenants of the "
        "config file are changed by editing it and reloading; add and remove act on tenants "
        "registered at runtime.",
    )
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="COMMAND")
    online = [common.config, common.admin, common.output]
    tenants_sub.add_parser(
        "list",
        parents=[*online, common.offline],
        help="list every tenant",
        description="List every tenant: id, name, source (config or runtime), agent, and "
        "which platforms it uses. With --offline: the config file's ids and the store's "
        "runtime tenants, without their settings.",
    )
    show = tenants_sub.add_parser(
        "show",
        parents=online,
        help="show one tenant: settings, adapters, sessions, keys",
        description="Show one tenant: its settings (never secrets), each Slack app's and "
        "Discord bot's state, session counts, circuit breaker and generated keys.",
    )
    show.add_argument("tenant", help="the tenant's id")
    add = tenants_sub.add_parser(
        "add",
        parents=online,
        help="register a runtime tenant from a YAML or JSON file",
        description="Register a tenant at runtime (persisted, no restart) from a file holding "
        "one tenant definition as in the config file's tenants[]. Secrets must be inline "
        "{value: ...}.",
    )
    add.add_argument("file", help="the definition (YAML or JSON); - reads stdin")
    remove = tenants_sub.add_parser(
        "remove",
        parents=online,
        help="delete a runtime tenant with its keys, sessions and transcripts",
        description="Delete a tenant registered at runtime, with its keys, sessions and "
        "transcripts. A config-file tenant is removed by editing the file and reloading (then "
        "`tenants purge` deletes its data).",
    )
    remove.add_argument("tenant", help="the tenant's id")
    remove.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
    purge = tenants_sub.add_parser(
        "purge",
        parents=online,
        help="delete every stored row of a tenant (offboarding) and count them",
        description="Delete all a tenant's data from the store (sessions, transcripts, keys, "
        "processed events, ...) and print what was deleted. A runtime tenant is removed too; "
        "a tenant still in the config file is refused: remove it there and reload first.",
    )
    purge.add_argument("tenant", help="the tenant's id")
    purge.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")


async def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    """Run one `tenants` subcommand; the exit code."""
    command = args.tenants_command
    if command in ("remove", "purge") and not args.yes:
        raise CommandError(
            EXIT_USAGE,
            f"`tenants {command} {args.tenant}` deletes data for good; add --yes to confirm",
        )
    if command == "list" and args.offline:
        return _show_list(args, await _offline_list(args, environ), offline=True)
    spec = _read_spec(args.file) if command == "add" else None
    tenant_path = "/admin/tenants/" + quote(getattr(args, "tenant", ""), safe="")
    async with admin_client(args, environ) as client:
        if command == "list":
            return _show_list(args, await client.call("GET", "/admin/tenants"))
        if command == "show":
            tenant = await client.call("GET", tenant_path)
            keys = await client.call("GET", tenant_path + "/keys")
            status = await client.call("GET", "/admin/status")
            return _show_one(args, tenant, keys, status)
        if command == "add":
            created = await client.call("POST", "/admin/tenants", spec)
            print(to_json(created) if args.json else f"added tenant {created['id']}")
            return 0
        if command == "remove":
            await client.call("DELETE", tenant_path)
            removed = {"tenantId": args.tenant, "removed": True}
            print(to_json(removed) if args.json else f"removed tenant {args.tenant}")
            return 0
        purged = await client.call("POST", tenant_path + "/purge")
        return _show_purge(args, purged)


def _read_spec(file: str) -> Any:
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        spec = yaml.safe_load(text)  # JSON is YAML too
    except OSError as exc:
        raise CommandError(EXIT_USAGE, f"cannot read {file}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CommandError(EXIT_USAGE, f"{file} is not YAML or JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise CommandError(EXIT_USAGE, f"{file} must hold one tenant definition (a mapping)")
    return spec


async def _offline_list(args: argparse.Namespace, environ: dict[str, str]) -> list[Any]:
    from chatgateway.cli.offline import existing_store

    config = config_file(args, environ)
    listed: dict[str, dict[str, Any]] = {
        i: {"id": i, "name": n, "source": "config"} for i, n in config.tenant_ids()
    }
    async with existing_store(config) as store:
        for record in await store.list_tenants():
            name = record.spec.get("name")
            listed.setdefault(
                record.tenant_id,
                {"id": record.tenant_id, "name": name if isinstance(name, str) else "",
                 "source": "runtime", "createdAt": record.created_at},
            )  # fmt: skip
    return [listed[i] for i in sorted(listed)]


def _platforms(tenant: dict[str, Any]) -> list[str]:
    found = ["web"] if tenant.get("web") else []
    found += [f"slack:{name}" for name in tenant.get("slackApps", [])]
    found += [f"discord:{name}" for name in tenant.get("discordBots", [])]
    return found


def _show_list(args: argparse.Namespace, tenants: list[Any], offline: bool = False) -> int:
    if args.json:
        print(to_json(tenants))
    elif offline:
        print(table(["id", "name", "source"], [(t["id"], t["name"], t["source"]) for t in tenants]))
    else:
        rows = [(t["id"], t["name"], t["source"], t["agent"], _platforms(t)) for t in tenants]
        print(table(["id", "name", "source", "agent", "platforms"], rows))
    return 0


def _show_one(args: argparse.Namespace, tenant: Any, keys: Any, status: Any) -> int:
    live: dict[str, Any] = next(
        (t for t in status.get("tenants", []) if t.get("id") == tenant["id"]), {}
    )
    report = {
        **tenant,
        "adapters": live.get("adapters", []),
        "sessions": live.get("sessions"),
        "breaker": live.get("breaker"),
        "keys": keys,
    }
    if args.json:
        print(to_json(report))
        return 0
    sessions = report["sessions"] or {}
    breaker = report["breaker"] or {}
    print(
        fields(
            [
                ("id", tenant["id"]),
                ("name", tenant["name"]),
                ("source", tenant["source"]),
                ("agent", tenant["agent"]),
                ("web", tenant["web"]),
                ("sessions", f"{sessions.get('active')} active, {sessions.get('total')} total"),
                ("breaker", breaker.get("state")),
            ]
        )
    )
    print()
    adapters = [
        (a.get("platform"), a.get("name"), a.get("state"), iso_time(a.get("connectedAt")),
         a.get("lastError"))
        for a in report["adapters"]
    ]  # fmt: skip
    if adapters:
        print(table(["platform", "name", "state", "connected at", "last error"], adapters))
    else:
        print("no Slack apps or Discord bots")
    print()
    rows = [(k["keyId"], k["label"], iso_time(k["createdAt"])) for k in keys]
    print(table(["key id", "label", "created"], rows) if rows else "no generated keys")
    return 0


def _show_purge(args: argparse.Namespace, purged: Any) -> int:
    if args.json:
        print(to_json(purged))
        return 0
    what = "tenant removed" if purged.get("tenantRemoved") else "data purged"
    print(f"purged tenant {purged['tenantId']} ({what})")
    deleted = purged.get("deleted", {})
    print(table(["table", "rows deleted"], sorted(deleted.items())))
    return 0
