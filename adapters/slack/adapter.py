"""One Slack app of one tenant over Socket Mode: slack-bolt's AsyncApp + AsyncSocketModeHandler.

The adapter is three parts: connection.py (the socket, authentication, the watchdog and the
lifecycle), conversation.py (events into pipeline calls, working indicators, the outbound of
each answer) and outbound.py (the Slack calls that show an answer: streamed, or posted and
edited). `SlackAdapter` is what the supervisor imports (`adapters.slack:SlackAdapter`).
"""

from __future__ import annotations

from adapters.slack.connection import AUTH_ERRORS
from adapters.slack.conversation import BUSY_TEXT, SlackConversations

__all__ = ["AUTH_ERRORS", "BUSY_TEXT", "SlackAdapter"]


class SlackAdapter(SlackConversations):
    """A tenant's Slack app: DMs, @mentions and a slash command go to the tenant's agent, and
    its answers come back streamed (an OutboundFactory for answers that arrive later)."""
