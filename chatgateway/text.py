"""Text every store can hold: the platform convert functions pass what they normalize through here.

PostgreSQL refuses a NUL character in text, and neither store can encode a lone surrogate
(UTF-16 half) as UTF-8; Slack and Discord may send both. A message with one would reach the
agent and then fail to be recorded, losing the exchange, so both become U+FFFD up front.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from chatgateway.models import NormalizedMessage

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` with each NUL and lone surrogate replaced by U+FFFD."""
    if text.isascii() and "\x00" not in text:  # the common case, without the regex
        return text
    return _UNSTORABLE.sub(REPLACEMENT, text)


def storable_optional(text: str | None) -> str | None:
    return None if text is None else storable(text)


def storable_value(value: Any) -> Any:
    """A JSON-like value (metadata) with every string in it, keys included, made storable."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable_value(k): storable_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_value(v) for v in value]
    return value


def storable_message(message: NormalizedMessage) -> NormalizedMessage:
    """`message` with every string it carries made storable."""
    conversation, user = message.conversation, message.user
    return dataclasses.replace(
        message,
        conversation=dataclasses.replace(
            conversation,
            id=storable(conversation.id),
            thread_id=storable_optional(conversation.thread_id),
        ),
        user=dataclasses.replace(
            user, id=storable(user.id), display_name=storable_optional(user.display_name)
        ),
        text=storable(message.text),
        message_id=storable(message.message_id),
        attachments=tuple(
            dataclasses.replace(
                a,
                name=storable(a.name),
                content_type=storable_optional(a.content_type),
                url=storable_optional(a.url),
                # The platform's reference (chatgateway/files.py): a garbled one fetches
                # nothing, but must not make the message unstorable or unloggable.
                source=dataclasses.replace(
                    a.source, adapter=storable(a.source.adapter), ref=storable(a.source.ref)
                )
                if a.source is not None
                else None,
            )
            for a in message.attachments
        ),
        metadata=storable_value(message.metadata),
    )
