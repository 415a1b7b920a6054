"""Loopback fakes of the platforms (Slack, Discord); the fake agent is chatgateway.testing.agent."""
