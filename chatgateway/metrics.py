"""Prometheus metrics, labelled by tenant and platform, on a registry owned by the daemon."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every metric the gateway exports. One instance per daemon (and per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages_in = Counter(
            "chatgateway_messages_in", "Messages received", ["tenant", "platform"], registry=r
        )
        self.messages_out = Counter(
            "chatgateway_messages_out", "Replies sent", ["tenant", "platform"], registry=r
        )
        self.agent_latency = Histogram(
            "chatgateway_agent_call_seconds",
            "Agent call latency",
            ["tenant", "platform"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.agent_failures = Counter(
            "chatgateway_agent_failures",
            "Agent calls that ended in the fallback text",
            ["tenant", "platform", "cause"],
            registry=r,
        )
        self.deduplicated = Counter(
            "chatgateway_deduplicated_events",
            "Platform events dropped as already processed",
            ["tenant", "platform"],
            registry=r,
        )
        self.active_sessions = Gauge(
            "chatgateway_active_sessions",
            "Sessions active within their idle time",
            ["tenant"],
            registry=r,
        )
        self.adapter_up = Gauge(
            "chatgateway_adapter_up",
            "1 when the adapter is connected",
            ["tenant", "platform", "adapter"],
            registry=r,
        )
        self.adapter_parked = Gauge(
            "chatgateway_adapter_parked",
            "1 when the adapter is parked (auth failed)",
            ["tenant", "platform", "adapter"],
            registry=r,
        )
        self.reconnects = Counter(
            "chatgateway_adapter_reconnects",
            "Adapter (re)connections after the first",
            ["tenant", "platform", "adapter"],
            registry=r,
        )
