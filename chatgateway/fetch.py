"""Fetching a file an agent names by URL, guarded against server-side request forgery.

An agent's answer may say "here is the chart: https://...": the gateway fetches it to show it
(the web chat's file links) or to upload it where a platform wants bytes. The URL is the agent's,
so it could point at the gateway's own network: only `http`/`https` is fetched, every address
the name resolves to must be a public one (private, loopback, link-local and reserved ranges are
refused) unless the host is the tenant's own agent's (`agent.url`'s host: an agent on the same
machine may serve its files there), redirects are followed at most MAX_REDIRECTS times and each
is checked the same way, the whole transfer has a timeout, and the body is streamed in chunks
under a size cap, never held whole.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

#: Redirects followed at most (each checked like the first URL).
MAX_REDIRECTS = 3
#: Bytes read at a time: what one transfer holds in memory.
CHUNK_BYTES = 64 * 1024
#: The largest file fetched by default (Discord's and Slack's upload limits are lower).
MAX_BYTES = 25 * 1024 * 1024
#: Seconds a whole fetch may take by default (connecting, redirects and the body).
TIMEOUT = 60.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class FetchError(Exception):
    """A URL that is not fetched: refused by a guard, unreachable, an error status, too large.
    The message is safe to show (it names no address the gateway resolved)."""


class _Refused(OSError):
    """Raised inside aiohttp's resolver: the name resolves to no address we may connect to."""


def public_address(address: str) -> bool:
    """Whether an IP address is a public (globally routable) one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _GuardedResolver(AbstractResolver):
    """Resolves like aiohttp, keeping only public addresses (all of them for trusted hosts), so
    what was checked is what is connected to (no DNS rebinding between check and connect)."""

    def __init__(self, trusted: frozenset[str]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._trusted = trusted

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if host.lower() in self._trusted:
            return found
        kept = [r for r in found if public_address(r["host"])]
        if not kept:
            raise _Refused(f"{host} resolves to no public address")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def check_url(url: URL, trusted: Collection[str]) -> None:
    """Refuse what is not http(s), and an IP literal that is not public (aiohttp connects to
    those without asking the resolver)."""
    if url.scheme not in ("http", "https") or not url.host:
        raise FetchError("only http and https URLs are fetched")
    host = url.host.lower()
    if host in trusted:
        return
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    if not public_address(host.strip("[]")):
        raise FetchError(f"{host} is not a public address")


@dataclass
class Fetched:
    """An open response: its declared size (None if unknown) and its body in chunks."""

    size: int | None
    content_type: str | None
    _response: aiohttp.ClientResponse
    _max_bytes: int

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, CHUNK_BYTES at a time; FetchError once it passes the cap."""
        total = 0
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_BYTES):
                total += len(chunk)
                if total > self._max_bytes:
                    raise FetchError(f"the file is larger than {self._max_bytes} bytes")
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchError(f"the file could not be read ({type(exc).__name__})") from None

    async def read(self) -> bytes:
        """The whole body (for small caps only)."""
        return b"".join([chunk async for chunk in self.chunks()])


@asynccontextmanager
async def fetch(
    url: str,
    *,
    trusted_hosts: Collection[str] = (),
    max_bytes: int = MAX_BYTES,
    time_limit: float = TIMEOUT,
) -> AsyncIterator[Fetched]:
    """Open `url` with the guards above; `trusted_hosts` (the tenant's agent host) may be
    private. Raises FetchError; the response is closed on exit."""
    trusted = frozenset(h.lower() for h in trusted_hosts)
    connector = aiohttp.TCPConnector(
        resolver=_GuardedResolver(trusted), use_dns_cache=False, limit=2
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=time_limit),
        headers={"User-Agent": "chatgateway"},
    )
    try:
        target = URL(url)
        response: aiohttp.ClientResponse | None = None
        for _ in range(MAX_REDIRECTS + 1):
            check_url(target, trusted)
            try:
                response = await session.get(target, allow_redirects=False)
            except _Refused as exc:
                raise FetchError(str(exc)) from None
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, _Refused) or isinstance(exc.__cause__, _Refused):
                    raise FetchError(f"{target.host} resolves to no public address") from None
                raise FetchError(f"{target.host} could not be reached") from None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise FetchError(f"the file could not be fetched ({type(exc).__name__})") from None
            if response.status not in _REDIRECTS:
                break
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise FetchError("a redirect without a Location")
            target = target.join(URL(location))
        else:
            raise FetchError(f"more than {MAX_REDIRECTS} redirects")
        assert response is not None
        if response.status != 200:
            response.release()
            raise FetchError(f"the file's server answered HTTP {response.status}")
        size = response.content_length
        if size is not None and size > max_bytes:
            response.release()
            raise FetchError(f"the file is larger than {max_bytes} bytes")
        try:
            yield Fetched(size, response.content_type, response, max_bytes)
        finally:
            response.release()
    finally:
        await session.close()


def agent_host(url: Any) -> str | None:
    """The host of a tenant's agent URL (trusted by `fetch`), or None."""
    if url is None:
        return None
    host = URL(str(url)).host
    return host.lower() if host else None
