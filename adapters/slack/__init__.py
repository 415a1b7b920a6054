"""The Slack adapter: Socket Mode per tenant app with slack-bolt (see docs/slack.md).

`SlackAdapter` is imported lazily so that the pure conversions in `convert` can be used
without loading slack-bolt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.slack.adapter import SlackAdapter

__all__ = ["SlackAdapter"]


def __getattr__(name: str) -> Any:
    if name == "SlackAdapter":
        from adapters.slack.adapter import SlackAdapter

        return SlackAdapter
    raise AttributeError(name)
