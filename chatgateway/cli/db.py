"""`chatgateway db status|migrate|backup`: the database's schema and backups."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from chatgateway.cli.common import Common, config_file

#: `db status`: the schema needs migrations; `db status`/`db migrate`: the database is newer.
EXIT_PENDING = 3
EXIT_NEWER = 4


def add_parser(sub: Any, common: Common) -> None:
    """Add `db` and its subcommands."""
    db = sub.add_parser(
        "db",
        help="the database: schema status, migrations, backup",
        description="Work on the database the config's storage section names (only that "
        "section is read).",
    )
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_sub.add_parser(
        "status",
        parents=[common.config, common.output],
        help="show the schema version and pending migrations (exit 3 if any)",
        description="Show the schema version and pending migrations: exit 0 when up to date, "
        "3 when migrations are pending, 4 when the database is newer than this chatgateway.",
    )
    migrate = db_sub.add_parser(
        "migrate",
        parents=[common.config, common.output],
        help="apply pending schema migrations",
        description="Apply pending schema migrations (docs/database.md).",
    )
    migrate.add_argument(
        "--owner-dsn-env",
        metavar="NAME",
        help="read the owner role's DSN from environment variable NAME instead of "
        "storage.owner_dsn (postgres)",
    )
    backup = db_sub.add_parser(
        "backup",
        parents=[common.config],
        help="copy the SQLite database to a new file while the gateway runs",
        description="Copy the SQLite database to a new file with SQLite's online backup, "
        "while the gateway runs (PostgreSQL: use pg_dump, docs/database.md).",
    )
    backup.add_argument("--to", required=True, metavar="FILE", help="the new file")


async def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    """Run one `db` subcommand; the exit code."""
    from chatgateway.store.schema import backup_sqlite, describe, migrate_schema, schema_status

    storage = config_file(args, environ).storage()
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
        result = await migrate_schema(storage, owner_dsn=owner)
    except Exception as exc:  # the database's own words (unreachable, permission denied, ...)
        print(f"db {args.db_command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        out = {"applied": [{"version": m.version, "name": m.name} for m in result.applied]}
        print(json.dumps(out | {"status": result.status.as_dict()}, indent=2))
    else:
        for m in result.applied:
            print(f"applied {m.version}: {m.name}")
        print(describe(result.status))
    return EXIT_NEWER if result.status.state == "ahead" else 0
