"""The gateway's exception tree, rooted at GatewayError."""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration file."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.message}"


class ConfigError(GatewayError, ValueError):
    """A configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class NotFoundError(GatewayError, LookupError):
    """The thing asked for does not exist for this caller (or belongs to someone else)."""


class ConflictError(GatewayError):
    """The request conflicts with the current state (e.g. a tenant id already in use)."""


class OverloadedError(GatewayError):
    """The tenant has too much work queued; the caller should retry later."""


class RateLimitedError(GatewayError):
    """A limit or quota refused the message; retry after `retry_after` seconds.

    `reason` is a short machine-readable name (tenant_rate, daily_quota, user_rate,
    address_rate, visitor_token_rate); `notice` is the text to post to a Slack or Discord user,
    or None when they were told within the notice interval already.
    """

    def __init__(
        self, reason: str, retry_after: float, message: str, notice: str | None = None
    ) -> None:
        self.reason = reason
        self.retry_after = retry_after
        self.notice = notice
        super().__init__(message)


class UnavailableError(GatewayError):
    """The gateway is shutting down and takes no new messages."""


class AgentError(GatewayError):
    """The agent gave no usable answer; `cause` is a short machine-readable reason."""

    def __init__(self, cause: str, detail: str = "") -> None:
        self.cause = cause
        self.detail = detail
        super().__init__(f"{cause}: {detail}" if detail else cause)


class AdapterAuthError(GatewayError):
    """A platform refused the adapter's credentials: park the adapter, do not retry."""


class AdapterNotReadyError(GatewayError):
    """A platform adapter failed transiently: retry with backoff."""
