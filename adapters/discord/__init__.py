"""The Discord adapter: one discord.py client per configured bot of a tenant."""

from adapters.discord.adapter import DiscordAdapter

__all__ = ["DiscordAdapter"]
