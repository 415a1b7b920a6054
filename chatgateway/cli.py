"""The `chatgateway` command: run, check-config, keys, db."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

from chatgateway import __version__
from chatgateway.config import EXIT_CONFIG, GatewayConfig, load_config
from chatgateway.errors import ConfigError

DEFAULT_CONFIG = "config/gateway.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatgateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"chatgateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT (SIGHUP reloads)")
    run.add_argument("--config", default=DEFAULT_CONFIG, help=f"default: {DEFAULT_CONFIG}")

    check = sub.add_parser("check-config", help="validate a config file without starting")
    check.add_argument("config", nargs="?", default=DEFAULT_CONFIG)

    keys = sub.add_parser("keys", help="manage tenants' web API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--label", default="")
    listing = keys_sub.add_parser("list", help="list a tenant's key ids")
    listing.add_argument("--tenant", required=True)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("--tenant", required=True)
    revoke.add_argument("key_id")
    for p in (create, listing, revoke):
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"default: {DEFAULT_CONFIG}")

    db = sub.add_parser("db", help="the database: schema status, migrations, backup")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    status = db_sub.add_parser(
        "status", help="show the schema version and pending migrations (exit 3 if any)"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    migrate = db_sub.add_parser("migrate", help="apply pending schema migrations")
    migrate.add_argument("--json", action="store_true", help="print JSON")
    migrate.add_argument(
        "--owner-dsn-env",
        metavar="NAME",
        help="read the owner role's DSN from environment variable NAME instead of "
        "storage.owner_dsn (postgres)",
    )
    backup = db_sub.add_parser(
        "backup", help="copy the SQLite database to a new file while the gateway runs"
    )
    backup.add_argument("--to", required=True, metavar="FILE", help="the new file")
    for p in (status, migrate, backup):
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"default: {DEFAULT_CONFIG}")
    return parser


def _print_problems(exc: ConfigError) -> None:
    print(f"configuration is invalid ({len(exc.problems)} problem(s)):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ if environ is None else environ)
    try:
        if args.command == "check-config":
            config = load_config(args.config, env)
            print(f"{args.config}: OK ({len(config.tenants)} tenant(s))")
            return 0
        if args.command == "run":
            return _run(args.config, env)
        config = load_config(args.config, env)
        if args.command == "db":
            return asyncio.run(_db(args, config, env))
        return asyncio.run(_keys(args, config, env))
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG


def _run(config_path: str, environ: Mapping[str, str]) -> int:
    from chatgateway.daemon import Daemon

    async def serve() -> int:
        return await Daemon(config_path, environ).run()

    try:
        return asyncio.run(serve())
    except KeyboardInterrupt:
        return 0


async def _keys(args: argparse.Namespace, config: GatewayConfig, environ: Mapping[str, str]) -> int:
    from chatgateway.daemon import resolve_storage
    from chatgateway.models import TenantId
    from chatgateway.store import open_store
    from chatgateway.tenants import create_api_key

    store = await open_store(resolve_storage(config.storage, environ), source=args.config)
    try:
        tenant_id = TenantId(args.tenant)
        known = {t.id for t in config.tenants} | {t.tenant_id for t in await store.list_tenants()}
        if tenant_id not in known:
            print(f"no tenant {tenant_id!r} in {args.config} or the store", file=sys.stderr)
            return 2
        if args.keys_command == "create":
            record, key = await create_api_key(store, tenant_id, args.label)
            print(key)
            print(
                f"key id {record.key_id} for tenant {tenant_id}; it is shown only once",
                file=sys.stderr,
            )
        elif args.keys_command == "list":
            for rec in await store.list_api_keys(tenant_id):
                print(f"{rec.key_id}\t{rec.label}\t{rec.created_at:.0f}")
        elif not await store.delete_api_key(tenant_id, args.key_id):
            print(f"no key {args.key_id!r} for tenant {tenant_id!r}", file=sys.stderr)
            return 2
        return 0
    finally:
        await store.close()


#: `db status`: the schema needs migrations; `db status`/`db migrate`: the database is newer.
EXIT_PENDING = 3
EXIT_NEWER = 4


async def _db(args: argparse.Namespace, config: GatewayConfig, environ: Mapping[str, str]) -> int:
    import json
    from pathlib import Path

    from pydantic import SecretStr

    from chatgateway.daemon import resolve_storage
    from chatgateway.store.schema import backup_sqlite, describe, migrate_schema, schema_status

    storage = resolve_storage(config.storage, environ)
    try:
        if args.db_command == "backup":
            if storage.backend != "sqlite":
                print("db backup copies SQLite databases; for PostgreSQL use pg_dump "
                      "(docs/database.md)", file=sys.stderr)  # fmt: skip
                return 2
            pages = await asyncio.to_thread(backup_sqlite, storage.path, Path(args.to))
            print(f"backed up {storage.path} to {args.to} ({pages} pages)", file=sys.stderr)
            return 0
        if args.db_command == "status":
            status = await schema_status(storage)
            print(json.dumps(status.as_dict(), indent=2) if args.json else describe(status))
            return {"up_to_date": 0, "behind": EXIT_PENDING, "ahead": EXIT_NEWER}[status.state]
        owner = None
        if args.owner_dsn_env:
            if not environ.get(args.owner_dsn_env):
                print(f"environment variable {args.owner_dsn_env} is not set", file=sys.stderr)
                return 2
            owner = SecretStr(environ[args.owner_dsn_env])
        run = await migrate_schema(storage, owner_dsn=owner)
    except Exception as exc:  # the database's own words (unreachable, permission denied, ...)
        print(f"db {args.db_command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for warning in run.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        out = {"applied": [{"version": m.version, "name": m.name} for m in run.applied]}
        print(json.dumps(out | {"status": run.status.as_dict()}, indent=2))
    else:
        for m in run.applied:
            print(f"applied {m.version}: {m.name}")
        print(describe(run.status))
    return EXIT_NEWER if run.status.state == "ahead" else 0
