"""chatgateway: one daemon connecting many tenants' AI agents to Slack, Discord and web chat."""

__version__ = "0.1.0"
