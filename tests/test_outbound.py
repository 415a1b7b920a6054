"""EditedStream: the pacing, splitting and final text every editing platform shares, driven
through a recording editor (the platforms' own calls are tested through the fakes)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Hashable

import pytest

from chatgateway.models import Platform
from chatgateway.outbound import Address, EditedStream
from chatgateway.signing import SignatureError, Signer

ADDRESS = Address(Platform.DISCORD, "bot", {"channel": "1"})


class RecordingEditor:
    """Messages of at most `limit` characters, split at spaces; records every call's time."""

    def __init__(self, limit: int = 20, fail_sends: int = 0) -> None:
        self.limit = limit
        self.messages: list[str] = []
        self.calls: list[tuple[str, float]] = []
        self.fail_sends = fail_sends

    def render(self, text: str) -> list[str]:
        parts, rest = [], text
        while len(rest) > self.limit:
            cut = rest.rfind(" ", 0, self.limit + 1)
            cut = cut if cut > 0 else self.limit
            parts.append(rest[:cut])
            rest = rest[cut:].lstrip(" ")
        return [*parts, rest] if rest else parts

    async def send(self, text: str, index: int) -> Hashable | None:
        self.calls.append(("send", time.monotonic()))
        if self.fail_sends:
            self.fail_sends -= 1
            return None
        self.messages.append(text)
        return len(self.messages) - 1

    async def edit(self, handle: Hashable, text: str) -> bool:
        self.calls.append(("edit", time.monotonic()))
        assert isinstance(handle, int)
        self.messages[handle] = text
        return True


async def test_first_words_at_once_then_edits_at_most_once_per_interval() -> None:
    editor = RecordingEditor(limit=2000)
    stream = EditedStream(editor, ADDRESS, interval=0.2)
    started = time.monotonic()
    await stream.append("Hello")
    assert editor.messages == ["Hello"]  # visible before any more words arrive
    assert stream.first_visible is not None and stream.first_visible - started < 0.1
    for n in range(20):  # 20 deltas over 1 s
        await stream.append(f" w{n}")
        await asyncio.sleep(0.05)
    await stream.finish("Hello " + " ".join(f"w{n}" for n in range(20)))
    assert editor.messages == ["Hello " + " ".join(f"w{n}" for n in range(20))]
    times = [t for _, t in editor.calls]
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]  # the final edit is not paced
    assert all(gap >= 0.19 for gap in gaps), gaps
    assert len(editor.calls) <= 8  # 1 s at one edit per 0.2 s, plus the first post and the final


async def test_long_answer_continues_in_new_messages_and_final_text_is_exact() -> None:
    editor = RecordingEditor(limit=20)
    stream = EditedStream(editor, ADDRESS, interval=0.01)
    words = [f"word{n}" for n in range(30)]
    for word in words:
        await stream.append(word + " ")
        await asyncio.sleep(0.002)
    final = " ".join(words)
    await stream.finish(final)
    assert editor.messages == editor.render(final)
    assert " ".join(editor.messages) == final
    assert all(len(m) <= 20 for m in editor.messages)


async def test_finish_replaces_streamed_text_with_a_shorter_fallback() -> None:
    editor = RecordingEditor(limit=10)
    stream = EditedStream(editor, ADDRESS, interval=0.01)
    await stream.append("partial answer that broke off")
    await stream.finish("Sorry.")
    assert editor.messages[0] == "Sorry."
    assert all(m == "…" for m in editor.messages[1:])


async def test_post_without_stream_is_one_send_and_a_failed_send_is_retried() -> None:
    editor = RecordingEditor(limit=100, fail_sends=1)
    stream = EditedStream(editor, ADDRESS, idempotent=True, interval=0.01)
    await stream.append("first")
    assert editor.messages == []  # the send failed
    await stream.finish("first words")
    assert editor.messages == ["first words"]
    quiet = RecordingEditor()
    await EditedStream(quiet, ADDRESS).post("one piece")
    assert quiet.messages == ["one piece"] and len(quiet.calls) == 1


def test_signed_tokens_carry_fields_and_refuse_tampering_expiry_and_other_purposes() -> None:
    files = Signer("secret", "file")
    token = files.sign(["acme", "msg.1", "x"], expires_at=2_000)
    assert files.verify(token, now=1_000, count=3) == ["acme", "msg.1", "x"]
    assert Signer.expiry(token) == 2_000
    with pytest.raises(SignatureError, match="expired"):
        files.verify(token, now=2_000)
    with pytest.raises(SignatureError, match="invalid"):
        Signer("secret", "callback").verify(token, now=1_000)
    with pytest.raises(SignatureError, match="invalid"):
        Signer("other", "file").verify(token, now=1_000)
    forged = files.sign(["globex", "msg.1", "x"], expires_at=2_000)
    spliced = forged.rsplit(".", 1)[0] + "." + token.rsplit(".", 1)[1]
    with pytest.raises(SignatureError):
        files.verify(spliced, now=1_000)
    with pytest.raises(SignatureError):
        files.verify(token, now=1_000, count=2)


def test_the_signers_precomputed_hmac_is_hmac_sha256() -> None:
    import base64
    import hashlib
    import hmac

    for secret in ("s" * 43, "x" * 200, "ü"):
        signer = Signer(secret, "callback")
        key = hmac.new(secret.encode(), b"chatgateway callback v1", hashlib.sha256).digest()
        token = signer.sign(["acme", "id-1"], expires_at=1_796_283_591)
        payload, _, mac = token.rpartition(".")
        expected = hmac.new(key, payload.encode(), hashlib.sha256).digest()
        assert mac == base64.urlsafe_b64encode(expected).rstrip(b"=").decode()
