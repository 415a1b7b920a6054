"""The `chatgateway` command: run the gateway, check a config, manage a running gateway.

Management commands (keys, tenants, status, reload) talk to the running daemon's admin API;
docs/cli.md describes every command, where its settings come from, and the exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from chatgateway import __version__
from chatgateway.cli import db, gateway, keys, tenants, users
from chatgateway.cli.client import CommandError
from chatgateway.cli.common import common_parsers
from chatgateway.cli.settings import CONFIG_ENV, config_path
from chatgateway.config import EXIT_CONFIG, load_config
from chatgateway.errors import ConfigError

#: `db`'s exit codes, kept importable from here.
EXIT_PENDING = db.EXIT_PENDING
EXIT_NEWER = db.EXIT_NEWER

_DEFAULT_HELP = f"default: ${CONFIG_ENV}, else the embedded default shipped in the package"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatgateway",
        description="Connect tenants' AI agents to Slack, Discord and web chat, and manage the "
        "running gateway. `chatgateway COMMAND --help` describes each command; docs/cli.md "
        "has them all, with their exit codes.",
    )
    parser.add_argument("--version", action="version", version=f"chatgateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_parsers()

    run = sub.add_parser(
        "run",
        help="run the gateway until SIGTERM/SIGINT (SIGHUP reloads)",
        description="Run the gateway in the foreground until SIGTERM or SIGINT; SIGHUP "
        "re-reads the config. Exits 78 when the config is invalid, 1 when it cannot start.",
    )
    run.add_argument("--config", metavar="FILE", help=_DEFAULT_HELP)

    check = sub.add_parser(
        "check-config",
        help="validate a config file without starting (every secret is resolved)",
        description="Validate a config file as `run` would, resolving every secret reference; "
        "prints every problem with its file and key path and exits 78 if there are any.",
    )
    check.add_argument("config", nargs="?", metavar="FILE", help=_DEFAULT_HELP)

    keys.add_parser(sub, common)
    tenants.add_parser(sub, common)
    users.add_parser(sub, common)
    gateway.add_parser(sub, common)
    db.add_parser(sub, common)
    return parser


def _print_problems(exc: ConfigError) -> None:
    print(f"configuration is invalid ({len(exc.problems)} problem(s)):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Parse the command line and run the command; the process's exit code."""
    args = _parser().parse_args(argv)
    env = dict(os.environ if environ is None else environ)
    try:
        if args.command == "check-config":
            path = config_path(args.config, env)
            config = load_config(path, env)
            print(f"{args.config or path}: OK ({len(config.tenants)} tenant(s))")
            return 0
        if args.command == "run":
            return _run(config_path(args.config, env), env)
        runs = {"keys": keys.run, "tenants": tenants.run, "users": users.run, "db": db.run}
        code: int = asyncio.run(runs.get(args.command, gateway.run)(args, env))
        return code
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    except CommandError as exc:
        print(f"chatgateway {args.command}: {exc.message}", file=sys.stderr)
        return exc.exit_code


def _run(config_path: Path, environ: Mapping[str, str]) -> int:
    from chatgateway.daemon import Daemon

    async def serve() -> int:
        return await Daemon(config_path, environ).run()

    try:
        return asyncio.run(serve())
    except KeyboardInterrupt:
        return 0
