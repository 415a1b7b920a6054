"""`chatgateway keys create|list|revoke`: tenants' web API keys, live or `--offline`."""

from __future__ import annotations

import argparse
import sys
from typing import Any
from urllib.parse import quote

from chatgateway.cli.client import EXIT_NOT_FOUND, CommandError
from chatgateway.cli.common import Common, admin_client, config_file
from chatgateway.cli.output import iso_time, table, to_json


def add_parser(sub: Any, common: Common) -> None:
    """Add `keys` and its subcommands."""
    keys = sub.add_parser(
        "keys",
        help="create, list and revoke tenants' web API keys",
        description="Manage a tenant's web API keys through the running gateway's admin API "
        "(or, with --offline, in its store directly).",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    parents = [common.config, common.admin, common.output, common.offline]
    create = keys_sub.add_parser(
        "create",
        parents=parents,
        help="create a key and print it once",
        description="Create a web API key for a tenant. The key is printed once on stdout "
        "(its id on stderr); only its hash is stored.",
    )
    create.add_argument("--tenant", required=True, help="the tenant's id")
    create.add_argument("--label", default="", help="a note to recognise the key by")
    listing = keys_sub.add_parser(
        "list",
        parents=parents,
        help="list a tenant's keys (ids, labels, creation times)",
        description="List a tenant's generated keys: id, label and creation time (never the "
        "key itself). Keys given in the config file (web.api_keys) are not listed.",
    )
    listing.add_argument("--tenant", required=True, help="the tenant's id")
    revoke = keys_sub.add_parser(
        "revoke",
        parents=parents,
        help="revoke a key by its id",
        description="Revoke a generated key by its id: through the gateway it stops working "
        "at once; with --offline within 10 seconds.",
    )
    revoke.add_argument("--tenant", required=True, help="the tenant's id")
    revoke.add_argument("key_id", help="the key's id, as `keys list` shows it")


async def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    """Run one `keys` subcommand; the exit code."""
    result = await (_offline(args, environ) if args.offline else _online(args, environ))
    return _show(args, result)


async def _online(args: argparse.Namespace, environ: dict[str, str]) -> Any:
    path = f"/admin/tenants/{quote(args.tenant, safe='')}/keys"
    async with admin_client(args, environ) as client:
        if args.keys_command == "create":
            return await client.call("POST", path, {"label": args.label})
        if args.keys_command == "list":
            return await client.call("GET", path)
        await client.call("DELETE", f"{path}/{quote(args.key_id, safe='')}")
        return None


async def _offline(args: argparse.Namespace, environ: dict[str, str]) -> Any:
    from chatgateway.cli.offline import existing_store
    from chatgateway.models import TenantId
    from chatgateway.tenants import create_api_key

    config = config_file(args, environ)
    tenant_id = TenantId(args.tenant)
    async with existing_store(config) as store:
        known = {i for i, _ in config.tenant_ids()} | {
            t.tenant_id for t in await store.list_tenants()
        }
        if tenant_id not in known:
            raise CommandError(
                EXIT_NOT_FOUND, f"no tenant {tenant_id!r} in {config.label} or its store"
            )
        if args.keys_command == "create":
            record, key = await create_api_key(store, tenant_id, args.label)
            return {"keyId": record.key_id, "key": key, "label": record.label}
        if args.keys_command == "list":
            return [
                {"keyId": k.key_id, "label": k.label, "createdAt": k.created_at}
                for k in await store.list_api_keys(tenant_id)
            ]
        if not await store.delete_api_key(tenant_id, args.key_id):
            raise CommandError(EXIT_NOT_FOUND, f"no key {args.key_id!r} for tenant {tenant_id!r}")
        return None


def _show(args: argparse.Namespace, result: Any) -> int:
    if args.keys_command == "create":
        if args.json:
            print(to_json(result | {"tenantId": args.tenant}))
        else:
            print(result["key"])
            print(
                f"key id {result['keyId']} for tenant {args.tenant}; it is shown only once",
                file=sys.stderr,
            )
    elif args.keys_command == "list":
        if args.json:
            print(to_json(result))
        else:
            rows = [(k["keyId"], k["label"], iso_time(k["createdAt"])) for k in result]
            print(table(["key id", "label", "created"], rows))
    elif args.json:
        print(to_json({"tenantId": args.tenant, "keyId": args.key_id, "revoked": True}))
    else:
        print(f"revoked key {args.key_id} of tenant {args.tenant}")
    return 0
