"""Signed, expiring tokens for links the gateway hands out (file links, agent callbacks).

One key per purpose is derived from the gateway's secret (`server.visitor_secret`, or the one
generated into the store and shared by every instance), so a token made for one purpose is
never accepted for another, and every instance verifies what any instance signed.
A token is `<field>.<field>...<expiry>.<mac>` with each field base64url-encoded: it carries its
own claims (tenant, message, ...) and needs no lookup to verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import SecretStr

    from chatgateway.store.base import SessionStore

#: The store setting holding the generated gateway secret when `server.visitor_secret` is unset.
SECRET_SETTING = "visitor_token_secret"


async def gateway_secret(configured: SecretStr | None, store: SessionStore) -> str:
    """The gateway's secret: `server.visitor_secret`, else one generated into the store once and
    read by every instance, so tokens survive restarts and any instance verifies them. Visitor
    tokens, file links and callback tokens derive their own keys from it (one per purpose)."""
    if configured is not None:
        return configured.get_secret_value()
    return await store.gateway_setting(SECRET_SETTING, secrets.token_urlsafe(32))


class SignatureError(Exception):
    """A token that is malformed, altered, made for another purpose or expired; the message is
    safe to show to a client."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and verifies tokens for one purpose (e.g. "file", "callback")."""

    __slots__ = ("_inner", "_outer", "purpose")

    def __init__(self, secret: str, purpose: str) -> None:
        self.purpose = purpose
        key = hmac.new(
            secret.encode(), f"chatgateway {purpose} v1".encode(), hashlib.sha256
        ).digest()
        # HMAC-SHA256 (RFC 2104) with its keyed inner and outer states made once and copied
        # per token: OpenSSL's per-call HMAC set-up costs more than the hash (tokens are
        # signed on the message path, e.g. every agent call's callback).
        padded = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def _mac(self, payload: str) -> str:
        inner = self._inner.copy()
        inner.update(payload.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return base64.urlsafe_b64encode(outer.digest()).rstrip(b"=").decode()

    def sign(self, fields: Sequence[str], *, expires_at: int) -> str:
        """A token carrying `fields`, valid until `expires_at` (Unix seconds)."""
        encode = base64.urlsafe_b64encode
        payload = ".".join([encode(f.encode()).rstrip(b"=").decode() for f in fields])
        payload = f"{payload}.{int(expires_at)}"
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str, *, now: float, count: int | None = None) -> list[str]:
        """The fields of a good token (`count` of them, when given); SignatureError if not."""
        payload, _, mac = token.rpartition(".")
        if not payload or not hmac.compare_digest(self._mac(payload), mac):
            raise SignatureError(f"invalid {self.purpose} token")
        *encoded, expiry = payload.split(".")
        if not expiry.isdigit() or (count is not None and len(encoded) != count):
            raise SignatureError(f"invalid {self.purpose} token")
        if int(expiry) <= now:
            raise SignatureError(f"{self.purpose} token expired")
        try:
            return [_unb64(f).decode() for f in encoded]
        except (ValueError, UnicodeDecodeError):
            raise SignatureError(f"invalid {self.purpose} token") from None

    @staticmethod
    def expiry(token: str) -> int | None:
        """The expiry a token claims (unverified), or None."""
        payload, _, _ = token.rpartition(".")
        expiry = payload.rpartition(".")[2]
        return int(expiry) if expiry.isdigit() else None
