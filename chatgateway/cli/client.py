"""The admin API client the management commands use, and what its failures mean as exit codes."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import aiohttp

from chatgateway.cli.settings import TOKEN_ENV, URL_ENV, Target

#: Exit codes (docs/cli.md#exit-codes). 3 and 4 are `db`'s; 78 is an invalid config file.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 5
EXIT_CONFLICT = 6
EXIT_UNREACHABLE = 7
EXIT_AUTH = 8


class CommandError(Exception):
    """A command failed for a reason the user can act on: the message, and the exit code."""

    def __init__(self, exit_code: int, message: str, api_code: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        #: The admin API's error code (`invalid_config`, `conflict`, ...), if it answered one.
        self.api_code = api_code


#: HTTP status of an admin API refusal -> exit code.
_STATUS_EXIT = {
    400: EXIT_USAGE,
    401: EXIT_AUTH,
    403: EXIT_AUTH,
    404: EXIT_NOT_FOUND,
    409: EXIT_CONFLICT,
    413: EXIT_USAGE,
    415: EXIT_USAGE,
    503: EXIT_UNREACHABLE,
}


def api_error(status: int, body: Any) -> CommandError:
    """The CommandError for an admin API answer that is not a success."""
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    text = f"the gateway answered {status}" + (f" {code}: {message}" if code else "")
    return CommandError(_STATUS_EXIT.get(status, EXIT_FAILURE), text, code)


class AdminClient:
    """Calls the running daemon's admin API with the admin token; one aiohttp session."""

    def __init__(self, target: Target, timeout: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        if self.target.token is None:
            raise CommandError(
                EXIT_AUTH,
                f"no admin token ({self.target.token_source} is not set); "
                f"give --admin-token-file FILE or set {TOKEN_ENV}",
            )
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"Authorization": f"Bearer {self.target.token.get_secret_value()}"},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; the decoded JSON answer (None for 204), or CommandError."""
        assert self._session is not None, "use `async with AdminClient(...)`"
        url = self.target.url + path
        try:
            async with self._session.request(method, url, json=body) as resp:
                data = await resp.json(content_type=None) if resp.status != 204 else None
                status = resp.status
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise CommandError(
                EXIT_UNREACHABLE,
                f"cannot reach the gateway at {self.target.url} ({reason}); is it running? "
                f"The URL comes from --url, ${URL_ENV} or the config's listen section",
            ) from None
        except ValueError:
            raise CommandError(
                EXIT_FAILURE, f"{method} {url}: the answer is not JSON; is this the gateway?"
            ) from None
        if status == 401:
            raise CommandError(
                EXIT_AUTH,
                f"the gateway refused the admin token from {self.target.token_source} (401)",
            )
        if status >= 300:
            raise api_error(status, data)
        return data
