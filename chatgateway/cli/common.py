"""Options every management command shares, and what they resolve to."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from chatgateway.cli.client import EXIT_USAGE, AdminClient, CommandError
from chatgateway.cli.settings import (
    CONFIG_ENV,
    TOKEN_ENV,
    URL_ENV,
    ConfigFile,
    admin_target,
    config_path,
    read_config,
)


@dataclass(frozen=True, slots=True)
class Common:
    """Parent parsers: argparse copies their options into each subcommand that lists them."""

    config: argparse.ArgumentParser
    admin: argparse.ArgumentParser
    output: argparse.ArgumentParser
    offline: argparse.ArgumentParser


def common_parsers() -> Common:
    """Build the shared option groups."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        metavar="FILE",
        help=f"the gateway's config file (default: ${CONFIG_ENV}, else the embedded default)",
    )
    admin = argparse.ArgumentParser(add_help=False)
    group = admin.add_argument_group("reaching the running gateway")
    group.add_argument(
        "--url",
        metavar="URL",
        help=f"the gateway's base URL (default: ${URL_ENV}, else listen in the config)",
    )
    group.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help=f"read the admin token from FILE, - for stdin (default: ${TOKEN_ENV}, else "
        "admin.token in the config)",
    )
    group.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="default: 30")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON for scripts")
    offline = argparse.ArgumentParser(add_help=False)
    offline.add_argument(
        "--offline",
        action="store_true",
        help="act on the store named by the config's storage section instead of the running "
        "gateway (docs/cli.md says when that is safe)",
    )
    return Common(config, admin, output, offline)


def config_file(args: argparse.Namespace, environ: Mapping[str, str]) -> ConfigFile:
    """The parsed config file of --config (or its defaults); sections validated on demand."""
    return read_config(config_path(args.config, environ), environ)


def admin_client(args: argparse.Namespace, environ: Mapping[str, str]) -> AdminClient:
    """A client for the running gateway, from the flags, environment and config file."""
    if getattr(args, "offline", False):
        raise CommandError(EXIT_USAGE, "this command works only through the running gateway")
    target = admin_target(
        url=args.url,
        token_file=args.admin_token_file,
        config=config_path(args.config, environ),
        environ=environ,
    )
    return AdminClient(target, timeout=args.timeout)
