"""`chatgateway users export|erase`: one user's data in a tenant (GDPR articles 15 and 17)."""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import quote, urlencode

from chatgateway.cli.client import EXIT_USAGE, CommandError
from chatgateway.cli.common import Common, admin_client
from chatgateway.cli.output import table, to_json

PLATFORMS = ("web", "slack", "discord")


def add_parser(sub: Any, common: Common) -> None:
    """Add `users` and its subcommands."""
    users = sub.add_parser(
        "users",
        help="export or erase one user's sessions and transcripts",
        description="One user's data in one tenant, through the running gateway's admin API: "
        "a web userId, a Slack user id (U...) or a Discord user id.",
    )
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="COMMAND")
    parents = [common.config, common.admin]
    export = users_sub.add_parser(
        "export",
        parents=parents,
        help="print every session and transcript of a user as JSON",
        description="Export every session of a user with its whole transcript as JSON (the "
        "admin API's document), on stdout or into a new file readable only by you.",
    )
    erase = users_sub.add_parser(
        "erase",
        parents=[*parents, common.output],
        help="delete every session and transcript of a user",
        description="Delete every session of a user with its transcript and print what was "
        "deleted. This cannot be undone.",
    )
    for p in (export, erase):
        p.add_argument("--tenant", required=True, help="the tenant's id")
        p.add_argument("user", help="the user's id on that platform")
        p.add_argument(
            "--platform",
            choices=PLATFORMS,
            help="only this platform's sessions (user ids are per platform; default: all)",
        )
    export.add_argument("--out", metavar="FILE", help="write to FILE (created mode 0600)")
    erase.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")


async def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    """Run one `users` subcommand; the exit code."""
    if args.users_command == "erase" and not args.yes:
        raise CommandError(EXIT_USAGE, "`users erase` deletes data for good; add --yes to confirm")
    path = f"/admin/tenants/{quote(args.tenant, safe='')}/users/{quote(args.user, safe='')}"
    query = "?" + urlencode({"platform": args.platform}) if args.platform else ""
    async with admin_client(args, environ) as client:
        if args.users_command == "export":
            document = await client.call("GET", f"{path}/export{query}")
        else:
            erased = await client.call("DELETE", path + query)
    if args.users_command == "export":
        text = to_json(document) + "\n"
        if args.out:
            _write_private(args.out, text)
        else:
            print(text, end="")
        return 0
    if args.json:
        print(to_json(erased))
    else:
        print(f"erased user {args.user} of tenant {args.tenant}")
        print(table(["table", "rows deleted"], sorted(erased.get("deleted", {}).items())))
    return 0


def _write_private(path: str, text: str) -> None:
    """Write a new file only its owner can read: it holds a person's conversations."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise CommandError(EXIT_USAGE, f"cannot create {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
