"""What a command needs from the config file, validated section by section.

A management command reads only the sections it uses (`listen` and `admin` to reach the
daemon, `storage` to open the store), so a secret it does not need (a tenant's
`{credential: ...}` under systemd) is never resolved and cannot make it fail.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from chatgateway.config import (
    AdminConfig,
    ListenConfig,
    StorageConfig,
    problems_from_validation,
    validation_context,
)
from chatgateway.daemon import EMBEDDED_CONFIG, resolve_storage
from chatgateway.errors import ConfigError, ConfigProblem

#: The config file when --config is not given (else the embedded default).
CONFIG_ENV = "CHATGATEWAY_CONFIG"
#: The daemon's base URL when --url is not given (else from the config's `listen`).
URL_ENV = "CHATGATEWAY_URL"
#: The admin token when --admin-token-file is not given (else the config's `admin.token`).
TOKEN_ENV = "CHATGATEWAY_ADMIN_TOKEN"
#: Where systemd (250+) keeps the running chatgateway.service's credentials, readable by root:
#: a `{credential: NAME}` is looked up there when $CREDENTIALS_DIRECTORY is not set.
SYSTEMD_CREDENTIALS = Path("/run/credentials/chatgateway.service")

M = TypeVar("M", bound=BaseModel)


def config_path(given: str | None, environ: Mapping[str, str]) -> Path:
    """The config file a command uses: --config, else $CHATGATEWAY_CONFIG, else the default."""
    chosen = given or environ.get(CONFIG_ENV)
    return Path(chosen).absolute() if chosen else EMBEDDED_CONFIG


def credential_environ(
    environ: Mapping[str, str], fallback: Path = SYSTEMD_CREDENTIALS
) -> Mapping[str, str]:
    """`environ`, plus the running service's credential directory if none is set and readable."""
    if environ.get("CREDENTIALS_DIRECTORY") or not os.access(fallback, os.R_OK | os.X_OK):
        return environ
    return {**environ, "CREDENTIALS_DIRECTORY": str(fallback)}


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A parsed config file whose sections are validated only when asked for."""

    path: Path
    data: dict[str, Any]
    environ: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.path)

    def section(self, key: str, model: type[M]) -> M:
        """Validate one top-level section (secrets in it resolved); ConfigError names its keys."""
        value = self.data.get(key)
        context = validation_context(credential_environ(self.environ), self.path.parent)
        try:
            return model.model_validate({} if value is None else value, context=context)
        except ValidationError as exc:
            raise ConfigError(problems_from_validation(exc, self.label, prefix=key)) from None

    def storage(self) -> StorageConfig:
        """The `storage` section, its relative SQLite path made absolute."""
        return resolve_storage(self.section("storage", StorageConfig), self.environ, self.path)

    def tenant_ids(self) -> list[tuple[str, str]]:
        """(id, name) of each tenant in the file, without validating (or resolving) them."""
        found = []
        for item in self.data.get("tenants") or []:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                name = item.get("name")
                found.append((item["id"], name if isinstance(name, str) else ""))
        return found


def read_config(path: Path, environ: Mapping[str, str]) -> ConfigFile:
    """Read and parse a config file; ConfigError if unreadable, not YAML or not a mapping."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        unreadable = ConfigProblem(file, "", f"cannot read: {exc.strerror or exc}")
        raise ConfigError([unreadable]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigProblem(file, where, f"invalid YAML: {problem}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(file, "", "the top level must be a mapping")])
    return ConfigFile(path, data, environ)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the running daemon's admin API is, and the token it takes."""

    url: str
    token: SecretStr | None
    #: Where the token came from, for the message when it is missing or refused.
    token_source: str


def listen_url(listen: ListenConfig) -> str:
    """The URL a local client reaches a daemon on `listen` with (wildcards become loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{listen.port}"


def admin_target(
    *,
    url: str | None,
    token_file: str | None,
    config: Path,
    environ: Mapping[str, str],
) -> Target:
    """Resolve the admin API's URL and token: flags, then environment, then the config file.

    The config file is read only for what the flags and the environment left open.
    """
    loaded: list[ConfigFile] = []

    def file() -> ConfigFile:
        if not loaded:
            loaded.append(read_config(config, environ))
        return loaded[0]

    base = url or environ.get(URL_ENV) or listen_url(file().section("listen", ListenConfig))
    token: SecretStr | None
    if token_file:
        try:
            source = Path("/dev/stdin") if token_file == "-" else Path(token_file)
            token = SecretStr(source.read_text(encoding="utf-8").strip())
        except OSError as exc:
            raise ConfigError(
                [ConfigProblem(token_file, "", f"cannot read: {exc.strerror or exc}")]
            ) from None
        origin = f"--admin-token-file {token_file}"
    elif environ.get(TOKEN_ENV):
        token, origin = SecretStr(environ[TOKEN_ENV]), f"${TOKEN_ENV}"
    else:
        token, origin = file().section("admin", AdminConfig).token, f"admin.token in {config}"
    return Target(base.rstrip("/"), token, origin)
