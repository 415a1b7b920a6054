"""Load and validate the gateway's YAML configuration, reporting every problem with its key path."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from chatgateway.errors import ConfigError, ConfigProblem

#: Exit code of `run` and `check-config` for an invalid configuration (sysexits EX_CONFIG).
EXIT_CONFIG = 78

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_SECRET_SOURCES = ("env", "file", "credential", "value")


def _resolve_secret(value: Any, info: ValidationInfo) -> Any:
    """Turn a secret reference ({env|file|credential|value: ...}) into its value."""
    if isinstance(value, SecretStr):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(
            "must be a secret reference such as {env: NAME}, {file: PATH}, "
            "{credential: NAME} or {value: TEXT}"
        )
    keys = [k for k in value if k in _SECRET_SOURCES]
    unknown = [k for k in value if k not in _SECRET_SOURCES]
    if unknown or len(keys) != 1:
        raise ValueError(
            "a secret reference has exactly one of the keys env, file, credential, value"
        )
    source = keys[0]
    ref = value[source]
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{source} must be a non-empty string")
    context = info.context or {}
    environ: Mapping[str, str] = context.get("environ", {})
    if source == "value":
        return SecretStr(ref)
    if context.get("inline_secrets_only"):
        # A runtime tenant comes from an admin-token holder, who must not be able to send the
        # host's files, environment or credentials (another tenant's secrets) to their agent.
        raise ValueError(
            f"a runtime tenant takes only inline secrets {{value: ...}}, not {{{source}: ...}}: "
            "it must not read the gateway host's files, environment or credentials"
        )
    if source == "env":
        if ref not in environ:
            raise ValueError(f"environment variable {ref} is not set")
        return SecretStr(environ[ref])
    if source == "credential":
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ValueError(
                f"credential {ref}: CREDENTIALS_DIRECTORY is not set "
                "(systemd sets it when the unit has LoadCredential=)"
            )
        path = Path(directory) / ref
    else:
        path = Path(ref)
        if not path.is_absolute():
            base = context.get("base_dir")
            if base is not None:
                path = Path(base) / path
    try:
        return SecretStr(path.read_text(encoding="utf-8").strip())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


#: A secret given by reference; the resolved value's repr is masked.
Secret = Annotated[SecretStr, BeforeValidator(_resolve_secret)]


def _header_value(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, str):
        return value
    if not isinstance(value, Mapping | SecretStr):
        raise ValueError("must be text or a secret reference such as {env: NAME}")
    return _resolve_secret(value, info)


#: An agent header value: plain text, or a secret reference for a credential (masked, scrubbed).
HeaderValue = Annotated[SecretStr | str, BeforeValidator(_header_value)]


def _check_http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value


def _check_ws_url(value: str) -> str:
    if not re.match(r"^wss?://[^/\s]+", value):
        raise ValueError("must be a ws:// or wss:// URL")
    return value


def _check_origin(value: str) -> str:
    if value != "*" and not re.match(r"^https?://[^/\s]+$", value):
        raise ValueError(
            f"{value!r} is not an origin: use scheme://host[:port] without a path, or *"
        )
    return value


HttpUrl = Annotated[str, AfterValidator(_check_http_url)]
Origin = Annotated[str, AfterValidator(_check_origin)]
WsUrl = Annotated[str, AfterValidator(_check_ws_url)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryConfig(Model):
    """Retries of connection errors and 5xx answers, always inside the call's deadline."""

    attempts: int = Field(3, ge=1, le=10)
    backoff_initial: float = Field(0.2, gt=0, le=30)
    backoff_max: float = Field(2.0, gt=0, le=60)


class AgentConfig(Model):
    protocol: Literal["chatgateway", "openai", "a2a"] = Field(
        "chatgateway", description="The agent's protocol (docs/agent-protocol.md)"
    )
    url: HttpUrl | None = None
    builtin: Literal["echo"] | None = None
    timeout: float = Field(30.0, gt=0, le=600, description="Deadline of one agent call, seconds")
    secret: Secret | None = Field(None, description="HMAC-SHA256 key for the signature header")
    bearer_token: Secret | None = Field(None, description="Sent as Authorization: Bearer ...")
    headers: dict[str, HeaderValue] = Field(
        default_factory=dict, description="Extra headers; a value may be a secret reference"
    )
    retry: RetryConfig = RetryConfig()
    history_turns: int = Field(20, ge=0, le=500)
    fallback_text: str = "Sorry, I can't answer right now. Please try again in a moment."
    max_concurrency: int = Field(32, ge=1, le=10_000)
    max_queue: int = Field(256, ge=0, le=100_000)
    callback_timeout: float = Field(
        900.0,
        gt=0,
        le=86_400,
        description="Seconds an agent that answered 202 Accepted has to send its answer to the "
        "callback URL; after that the user gets fallback_text",
    )
    # OpenAI-compatible Chat Completions (protocol: openai); `url` is the base URL.
    model: str | None = Field(None, min_length=1, max_length=200)
    system_prompt: str | None = Field(None, max_length=100_000)
    query: dict[str, str] = Field(
        default_factory=dict, description="Query parameters, e.g. Azure's api-version"
    )
    content_filter_notice: str | None = Field(
        None, min_length=1, max_length=2000, description="Answer to a filtered completion"
    )
    # Usage (every protocol).
    daily_token_budget: int | None = Field(
        None, ge=1, description="Tokens a day (UTC) after which the agent is not called"
    )
    budget_notice: str = Field(
        "Sorry, the daily usage limit has been reached. Please try again tomorrow.",
        min_length=1,
        max_length=2000,
    )

    def header_values(self) -> dict[str, str]:
        """`headers` with every secret reference resolved to its text."""
        return {
            name: value.get_secret_value() if isinstance(value, SecretStr) else value
            for name, value in self.headers.items()
        }

    @model_validator(mode="after")
    def _one_target(self) -> AgentConfig:
        if (self.url is None) == (self.builtin is None):
            raise ValueError("give exactly one of url (an HTTP agent) or builtin (e.g. echo)")
        if self.protocol != "chatgateway":
            if self.builtin is not None:
                raise ValueError(f"a builtin agent has no protocol; drop {self.protocol!r}")
            if self.secret is not None:
                raise ValueError("secret (request signing) belongs to protocol: chatgateway")
        if self.protocol == "a2a" and importlib.util.find_spec("a2a.client") is None:
            # Looked up without importing it: the SDK is an optional extra.
            raise ValueError("protocol: a2a needs the A2A SDK: pip install 'chatgateway[a2a]'")
        if self.protocol == "openai" and self.model is None:
            raise ValueError("protocol: openai needs model (e.g. gpt-4o-mini)")
        if self.protocol != "openai":
            extra = [k for k in ("model", "system_prompt", "content_filter_notice")
                     if getattr(self, k) is not None] + (["query"] if self.query else [])
            if extra:
                raise ValueError(f"{', '.join(extra)}: only for protocol: openai")
        return self


class SessionConfig(Model):
    idle_timeout: float = Field(1800.0, gt=0, description="Seconds of silence that end a session")
    retention_days: float = Field(30.0, gt=0, description="Delete sessions idle this long")
    max_turns: int = Field(1000, ge=2, description="Turns kept per session transcript")
    while_answering: Literal["queue", "collect"] = Field(
        "queue",
        description="Messages a user sends while the agent answers: one call each, in order "
        "(queue), or together in the next call (collect)",
    )


class WebConfig(Model):
    enabled: bool = True
    api_keys: list[Secret] = Field(default_factory=list)
    anonymous: bool = Field(
        False, description="Allow calls without a key (only on a loopback listen address)"
    )
    public: bool = Field(False, description="Hand out visitor tokens to anyone (public web chat)")
    allowed_origins: list[Origin] = Field(default_factory=list)
    title: str | None = None
    welcome: str | None = Field(
        None, max_length=2000, description="Greeting shown above an empty web conversation"
    )
    accent_color: str | None = Field(
        None, pattern=r"^#[0-9a-fA-F]{6}$", description="The chat page's accent colour, #rrggbb"
    )


class SlackAppConfig(Model):
    """One Slack app (bot token + app-level token) of a tenant, connected over Socket Mode."""

    name: str = Field("default", min_length=1, max_length=64)
    bot_token: Secret = Field(description="Bot token, xoxb-...")
    app_token: Secret = Field(description="App-level token with connections:write, xapp-...")
    api_base_url: HttpUrl = Field(
        "https://slack.com/api/", description="Slack Web API base (GovSlack, proxies, tests)"
    )
    slash_command: str | None = Field(None, pattern=r"^/[a-z0-9_-]{1,31}$")
    slash_response_type: Literal["in_channel", "ephemeral"] = Field(
        "in_channel", description="Who sees the agent's answer to the slash command"
    )
    working_indicator: Literal["reaction", "none"] = "reaction"
    working_reaction: str = Field("hourglass_flowing_sand", pattern=r"^[a-z0-9_+'-]{1,100}$")
    assistant_status: str = Field(
        "is thinking…", min_length=1, max_length=100,
        description="Status shown in an assistant thread until the answer starts",
    )
    ping_interval: float = Field(
        5.0, ge=0.5, le=60, description="Seconds between Socket Mode pings; a socket silent "
        "for 3 intervals (or broken for 2) is replaced"
    )


def _check_unique(names: list[str], what: str) -> None:
    """Adapters are keyed by name: two of one name in a tenant would silently run as one."""
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{what} names must be unique within a tenant: {', '.join(duplicates)}")


class SlackConfig(Model):
    apps: list[SlackAppConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> SlackConfig:
        _check_unique([app.name for app in self.apps], "app")
        return self


class DiscordBotConfig(Model):
    name: str = "default"
    token: Secret
    api_base_url: HttpUrl = "https://discord.com/api/v10"
    gateway_url: WsUrl = "wss://gateway.discord.gg"
    message_content_intent: bool = True
    channels: list[Annotated[str, Field(pattern=r"^[0-9]{1,20}$")]] = Field(
        default_factory=list, description="Channel ids where every message goes to the agent"
    )
    typing_indicator: bool = True
    identify_interval: float = Field(
        5.0,
        ge=0,
        le=60,
        description="Minimum seconds between two IDENTIFYs of this bot (Discord: one per 5 s)",
    )

    @field_validator("channels", mode="before")
    @classmethod
    def _ids_as_strings(cls, value: Any) -> Any:
        # YAML reads an unquoted Discord id as an int; accept it as the string it is.
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value


class DiscordConfig(Model):
    bots: list[DiscordBotConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> DiscordConfig:
        _check_unique([bot.name for bot in self.bots], "bot")
        return self


class RateConfig(Model):
    """A token bucket: `burst` messages at once, refilled at `per_minute`."""

    per_minute: float = Field(gt=0, le=1e9, description="Long-run rate, per minute")
    burst: int = Field(ge=1, le=1_000_000_000, description="Messages allowed at once")


#: The notice a Slack or Discord user gets (once per notice_interval) when a limit refuses them.
DEFAULT_NOTICE = (
    "You're sending messages faster than I can answer. "
    "Please wait {retry_after} seconds and try again."
)


class TenantRateConfig(RateConfig):
    """The tenant's token bucket; a message over it waits up to `max_wait` for its token."""

    max_wait: float = Field(
        1.0, ge=0, le=60, description="Seconds a message may wait for a token (0: refuse at once)"
    )


class LimitsConfig(Model):
    """A tenant's limits; `null` turns one off. See docs/configuration.md for the reasoning."""

    tenant: TenantRateConfig | None = TenantRateConfig(per_minute=600, burst=100)
    daily_quota: int | None = Field(None, ge=1, description="Messages per UTC day (none: off)")
    user: RateConfig | None = RateConfig(per_minute=30, burst=15)
    address: RateConfig | None = RateConfig(per_minute=60, burst=30)
    visitor_tokens: RateConfig | None = RateConfig(per_minute=10, burst=20)
    notice_text: str = Field(DEFAULT_NOTICE, min_length=1, max_length=2000)
    notice_interval: float = Field(60.0, ge=0, le=86400)
    refusal_delay: float = Field(
        1.0, ge=0, le=60, description="Seconds a web 429 of a limit is held at most (0: at once)"
    )


class BreakerConfig(Model):
    """The circuit breaker on the tenant's agent."""

    enabled: bool = True
    failures: int = Field(5, ge=1, le=10_000, description="Failures that open it...")
    window: float = Field(60.0, gt=0, le=86400, description="...within this many seconds")
    cooldown: float = Field(30.0, gt=0, le=86400, description="Seconds open before a probe")


#: A media type or a family of them, as `files.allowed_types` lists them: image/png, image/*.
MEDIA_TYPE_PATTERN = r"^(\*/\*|[a-z0-9][a-z0-9!#$&^_.+-]*/(\*|[a-z0-9][a-z0-9!#$&^_.+-]*))$"


class FilesConfig(Model):
    """Files users send to the agent (chatgateway/files.py, docs/configuration.md#files)."""

    link_ttl: float = Field(
        3600.0, gt=0, le=7 * 86400, description="Seconds a file link handed to the agent works"
    )
    max_bytes: int = Field(
        25 * 1024 * 1024,
        ge=1,
        le=2**40,
        description="Largest file passed on to the agent (and accepted as a web upload)",
    )
    allowed_types: list[Annotated[str, Field(pattern=MEDIA_TYPE_PATTERN)]] = Field(
        default_factory=lambda: ["image/*", "text/*", "application/pdf"],
        description="Media types a web chat upload may have (type/* for a family, */* any)",
    )
    inline_images_max_bytes: int = Field(
        0,
        ge=0,
        le=10 * 1024 * 1024,
        description="Images up to this size also reach the agent as base64 data (0: off)",
    )
    too_large_notice: str = Field(
        "I couldn't pass on {name} ({size}): files larger than {limit} are not accepted.",
        min_length=1,
        max_length=2000,
        description="What the user is told about a file over max_bytes; {name}, {size}, {limit}",
    )

    @field_validator("too_large_notice")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            value.format(name="a.pdf", size="30 MB", limit="25 MB")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{name}}, {{size}} and {{limit}} may be used ({exc})") from None
        return value

    def allows(self, content_type: str) -> bool:
        """Whether a web upload of this media type is accepted."""
        kind = content_type.partition(";")[0].strip().lower()
        family = kind.partition("/")[0] + "/*"
        return any(t in ("*/*", kind, family) for t in self.allowed_types)


class TenantConfig(Model):
    id: Annotated[str, Field(pattern=TENANT_ID_PATTERN)]
    name: str = ""
    agent: AgentConfig
    sessions: SessionConfig = SessionConfig()
    web: WebConfig = WebConfig()
    slack: SlackConfig = SlackConfig()
    discord: DiscordConfig = DiscordConfig()
    limits: LimitsConfig = LimitsConfig()
    breaker: BreakerConfig = BreakerConfig()
    files: FilesConfig = FilesConfig()


class ListenConfig(Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class StorageConfig(Model):
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: str = Field("var/chatgateway.db", description="The SQLite database file (sqlite)")
    dsn: Secret | None = Field(
        None,
        validate_default=True,
        description="libpq connection string or URI of the database (postgres)",
    )
    owner_dsn: Secret | None = Field(
        None,
        description="connection of the role that owns the tables, used only to migrate "
        "(postgres; default: dsn)",
    )
    migrate: Literal["auto", "check"] = Field(
        "auto",
        description="auto: apply pending schema migrations at start; check: refuse to start "
        "until `chatgateway db migrate` has",
    )
    prune_interval: float = Field(
        3600.0,
        ge=0.1,
        le=7 * 86400,
        description="Seconds between retention runs (sessions past each tenant's "
        "sessions.retention_days are deleted); the first runs at start",
    )

    @field_validator("dsn", mode="after")
    @classmethod
    def _dsn_for_postgres(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None and info.data.get("backend") == "postgres":
            raise ValueError("required when backend is postgres, e.g. {env: CHATGATEWAY_DSN}")
        return value

    @field_validator("owner_dsn", mode="after")
    @classmethod
    def _owner_for_postgres(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and info.data.get("backend") != "postgres":
            raise ValueError("only for backend postgres (SQLite has no roles)")
        return value


class LoggingConfig(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class AdminConfig(Model):
    token: Secret | None = Field(None, description="Bearer token of the /admin API")


class ServerConfig(Model):
    #: 512 KiB: a chat message's 32,000 characters fit even when each is a JSON-escaped
    #: surrogate pair ("\ud83d\ude00", 12 bytes), with room for the other fields.
    max_body_bytes: int = Field(512 * 1024, ge=1024, le=64 * 1024 * 1024)
    drain_seconds: float = Field(20.0, ge=0, le=600)
    # Connections and timeouts (docs/security.md): a reload applies them to new connections.
    header_timeout: float = Field(
        10.0, gt=0, le=3600, description="seconds for a connection's first request headers"
    )
    body_timeout: float = Field(
        30.0, gt=0, le=3600, description="seconds for a request body, from its headers"
    )
    keepalive_timeout: float = Field(
        15.0, gt=0, le=3600, description="seconds an idle kept-alive connection stays open"
    )
    max_connections: int = Field(
        1000, ge=1, description="open client connections at most (lowered to fit the file limit)"
    )
    max_connections_per_address: int = Field(
        64, ge=0, description="open connections per client IPv4 address or IPv6 /64; 0: no cap"
    )
    visitor_token_ttl: float = Field(7 * 86400.0, gt=0)
    visitor_secret: Secret | None = None
    public_url: HttpUrl | None = None
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Reverse proxies whose X-Forwarded-For names the client address (for the "
        "per-address limits); from anyone else the TCP peer is the client",
    )


class ClusterConfig(Model):
    coordination: Literal["local", "postgres"] = Field(
        "local",
        description="local: one instance; postgres: several instances on storage's database",
    )
    claim_timeout: float = Field(
        120.0,
        gt=0,
        le=86400,
        description="seconds after which another instance may take over a platform event "
        "whose first instance never finished it (postgres)",
    )


def _check_limits_storage(value: Any) -> Any:
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if isinstance(text, str) and not re.match(
        r"^(async\+)?(memory|redis|rediss|redis\+sentinel|redis\+cluster|valkey|valkeys"
        r"|valkey\+sentinel|valkey\+cluster|memcached|mongodb|mongodb\+srv)://",
        text,
    ):
        raise ValueError(
            "must be a storage URI of the limits library, e.g. memory:// (one instance) or "
            "redis://127.0.0.1:6379 (several instances)"
        )
    return value


class GatewayLimitsConfig(Model):
    storage: Annotated[HeaderValue, AfterValidator(_check_limits_storage)] = Field(
        "memory://",
        description="Where rate limits and quotas are counted: memory:// (this process) or a "
        "shared store such as redis://host:6379; a URI with a password may be a secret reference",
    )

    def storage_uri(self) -> str:
        value = self.storage
        return value.get_secret_value() if isinstance(value, SecretStr) else value


class TracingConfig(Model):
    """OpenTelemetry traces of every message (docs/operations.md#traces); off by default."""

    enabled: bool = False
    endpoint: HttpUrl = Field(
        "http://127.0.0.1:4318/v1/traces",
        description="the OTLP/HTTP (protobuf) traces URL of a collector",
    )
    service_name: str = Field("chatgateway", min_length=1, max_length=200)
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="share of messages traced (a parent's decision wins)"
    )

    @field_validator("enabled", mode="after")
    @classmethod
    def _sdk_installed(cls, enabled: bool) -> bool:
        if enabled and not _sdk_available():
            raise ValueError("needs OpenTelemetry: pip install 'chatgateway[tracing]'")
        return enabled


def _sdk_available() -> bool:
    """Whether the OpenTelemetry SDK and its OTLP exporter are installed, without importing them."""
    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
        )
    except ModuleNotFoundError:  # a parent package (opentelemetry) is missing altogether
        return False


class GatewayConfig(Model):
    listen: ListenConfig = ListenConfig()
    storage: StorageConfig = StorageConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()
    admin: AdminConfig = AdminConfig()
    server: ServerConfig = ServerConfig()
    limits: GatewayLimitsConfig = GatewayLimitsConfig()
    tracing: TracingConfig = TracingConfig()
    tenants: list[TenantConfig] = Field(default_factory=list)


def format_loc(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as a key path like tenants[2].agent.url."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def problems_from_validation(
    exc: ValidationError, file: str, prefix: str = ""
) -> list[ConfigProblem]:
    """Convert a pydantic ValidationError into path-precise problems."""
    problems = []
    for err in exc.errors(include_url=False):
        path = format_loc(tuple(err["loc"]))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        full = f"{prefix}.{path}" if prefix and path else (prefix or path)
        problems.append(ConfigProblem(file=file, path=full, message=message))
    return problems


def validation_context(environ: Mapping[str, str], base_dir: Path | None) -> dict[str, Any]:
    return {"environ": environ, "base_dir": base_dir}


def parse_config(
    data: Any, *, file: str, environ: Mapping[str, str], base_dir: Path | None = None
) -> GatewayConfig:
    """Validate already-parsed YAML data; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(file, "", "the top level must be a mapping")])
    problems = _duplicate_tenant_ids(data.get("tenants"), file)
    try:
        config = GatewayConfig.model_validate(data, context=validation_context(environ, base_dir))
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, file) + problems) from None
    problems += _shared_api_keys(config, file)
    for index, tenant in enumerate(config.tenants):
        problems += _anonymous_problems(tenant, file, f"tenants[{index}].")
    problems += _cluster_problems(config, file)
    if problems:
        raise ConfigError(problems)
    return config


def _cluster_problems(config: GatewayConfig, file: str) -> list[ConfigProblem]:
    """Several instances coordinate through the database they share: PostgreSQL only."""
    if config.cluster.coordination == "postgres" and config.storage.backend != "postgres":
        message = "postgres needs storage.backend: postgres (the instances share its database)"
        return [ConfigProblem(file, "cluster.coordination", message)]
    return []


def _shared_api_keys(config: GatewayConfig, file: str) -> list[ConfigProblem]:
    """A key value given to two tenants would authenticate as whichever was loaded last."""
    problems: list[ConfigProblem] = []
    seen: dict[str, tuple[int, str]] = {}
    for t_index, tenant in enumerate(config.tenants):
        for k_index, key in enumerate(tenant.web.api_keys):
            path = f"tenants[{t_index}].web.api_keys[{k_index}]"
            first = seen.setdefault(key.get_secret_value(), (t_index, path))
            if first[0] != t_index:
                message = f"the same API key as {first[1]}: a key must belong to one tenant"
                problems.append(ConfigProblem(file, path, message))
    return problems


#: The one tenant `web.anonymous` applies to.
ANONYMOUS_TENANT = "default"


def _anonymous_problems(tenant: TenantConfig, file: str, prefix: str) -> list[ConfigProblem]:
    """`web.anonymous` on another tenant would be silently ignored: say so instead."""
    if not tenant.web.anonymous or tenant.id == ANONYMOUS_TENANT:
        return []
    message = (
        f"only the tenant {ANONYMOUS_TENANT!r} can be used without a key; "
        f"{tenant.id!r} needs API keys or visitor tokens (web.public)"
    )
    return [ConfigProblem(file, f"{prefix}web.anonymous", message)]


def _duplicate_tenant_ids(tenants: Any, file: str) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    if not isinstance(tenants, list):
        return problems
    seen: dict[str, int] = {}
    for index, tenant in enumerate(tenants):
        tenant_id = tenant.get("id") if isinstance(tenant, dict) else None
        if not isinstance(tenant_id, str):
            continue
        if tenant_id in seen:
            message = f"duplicate tenant id {tenant_id!r} (also tenants[{seen[tenant_id]}])"
            problems.append(ConfigProblem(file, f"tenants[{index}].id", message))
        else:
            seen[tenant_id] = index
    return problems


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str]) -> GatewayConfig:
    """Read, parse and validate a configuration file."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(file, "", f"cannot read: {exc.strerror or exc}")]
        ) from None
    try:
        # libyaml's parser when PyYAML has it: 1,000 tenants parse in ~0.1 s instead of ~1 s.
        data = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigProblem(file, where, f"invalid YAML: {problem}")]) from None
    return parse_config(data, file=file, environ=environ, base_dir=Path(path).resolve().parent)


def parse_tenant(data: Any, *, environ: Mapping[str, str], source: str = "request") -> TenantConfig:
    """Validate one runtime tenant definition (from the admin API or the store).

    Its secrets must be inline {value: ...}; `environ` is not read.
    """
    context = {**validation_context(environ, None), "inline_secrets_only": True}
    try:
        config = TenantConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, source)) from None
    problems = _anonymous_problems(config, source, "")
    if problems:
        raise ConfigError(problems)
    return config


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")
