"""Prometheus metrics, labelled by tenant and platform, on a registry owned by the daemon.

Counters and the latency histogram are updated as messages flow. Everything that describes a
current state (adapter up/parked, active sessions, in-flight messages) is read at scrape time
by a collector, so /metrics always shows the live state, however it was reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chatgateway.adapter import AdapterState, AdapterStatus

BREAKER_STATES = ("closed", "open", "half_open")

# The *_created timestamps double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class AdapterSample:
    """One supervised adapter as seen at scrape time."""

    status: AdapterStatus
    #: Reconnects of this adapter over the process lifetime (survives adapter restarts).
    reconnects: int


@dataclass(frozen=True, slots=True)
class GatewaySample:
    ready: bool
    draining: bool
    in_flight: int
    tenants: int
    #: The last health check found nothing wedged (the systemd watchdog gets its ping).
    healthy: bool = True
    #: Unix time of the last healthy check; None before the first.
    healthy_at: float | None = None


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
        self.rejected = Counter(
            "chatgateway_messages_rejected",
            "Messages and web calls refused before reaching the agent, by reason: overloaded "
            "(the tenant's queue is full), tenant_rate, daily_quota, user_rate, address_rate, "
            "visitor_token_rate, breaker_open (answered with the fallback)",
            ["tenant", "platform", "reason"],
            registry=r,
        )
        self.files_refused = Counter(
            "chatgateway_files_refused",
            "Files users sent that were not passed on to the agent, by reason: too_large "
            "(over files.max_bytes), type (not in files.allowed_types)",
            ["tenant", "platform", "reason"],
            registry=r,
        )
        self.paced = Counter(
            "chatgateway_messages_paced",
            "Messages over the tenant's rate that waited for their turn (limits.tenant.max_wait) "
            "instead of being refused",
            ["tenant", "platform"],
            registry=r,
        )
        self.reloads = Counter(
            "chatgateway_config_reloads",
            "Configuration reloads by result (ok, rejected)",
            ["result"],
            registry=r,
        )
        self._adapters: Callable[[], Iterable[AdapterSample]] = list
        self._gateway: Callable[[], GatewaySample | None] = lambda: None
        self._sessions: dict[tuple[str, str], int] = {}
        self._breakers: Callable[[], Iterable[tuple[str, str]]] = list
        r.register(_LiveCollector(self))

    def watch_adapters(self, source: Callable[[], Iterable[AdapterSample]]) -> None:
        """Read adapter states from `source` at every scrape."""
        self._adapters = source

    def watch_gateway(self, source: Callable[[], GatewaySample | None]) -> None:
        self._gateway = source

    def watch_breakers(self, source: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Read (tenant, breaker state) pairs from `source` at every scrape."""
        self._breakers = source

    def set_active_sessions(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Replace the active session counts by (tenant, platform); removed tenants disappear."""
        self._sessions = dict(counts)


class _LiveCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        labels = ["tenant", "platform", "adapter"]
        up = GaugeMetricFamily(
            "chatgateway_adapter_up", "1 when the adapter is connected", labels=labels
        )
        parked = GaugeMetricFamily(
            "chatgateway_adapter_parked",
            "1 when the adapter is parked (credentials refused; fix the config and reload)",
            labels=labels,
        )
        retrying = GaugeMetricFamily(
            "chatgateway_adapter_retrying",
            "1 when the adapter is waiting to retry after a transient failure",
            labels=labels,
        )
        last_event = GaugeMetricFamily(
            "chatgateway_adapter_last_event_timestamp_seconds",
            "Unix time of the last platform event the adapter received",
            labels=labels,
        )
        reconnects = CounterMetricFamily(
            "chatgateway_adapter_reconnects",
            "Adapter (re)connections after the first",
            labels=labels,
        )
        for sample in self._metrics._adapters():
            status = sample.status
            values = [status.tenant_id, status.platform.value, status.name]
            up.add_metric(values, float(status.state == AdapterState.CONNECTED))
            parked.add_metric(values, float(status.state == AdapterState.PARKED))
            retrying.add_metric(values, float(status.state == AdapterState.BACKOFF))
            if status.last_event_at is not None:
                last_event.add_metric(values, status.last_event_at)
            reconnects.add_metric(values, float(sample.reconnects))
        yield from (up, parked, retrying, last_event, reconnects)

        sessions = GaugeMetricFamily(
            "chatgateway_active_sessions",
            "Sessions active within their tenant's idle timeout",
            labels=["tenant", "platform"],
        )
        for (tenant, platform), count in sorted(self._metrics._sessions.items()):
            sessions.add_metric([tenant, platform], float(count))
        yield sessions

        breaker = GaugeMetricFamily(
            "chatgateway_breaker_state",
            "1 for the state (closed, open, half_open) the tenant's agent circuit breaker is in",
            labels=["tenant", "state"],
        )
        for tenant, current in sorted(self._metrics._breakers()):
            for state in BREAKER_STATES:
                breaker.add_metric([tenant, state], float(state == current))
        yield breaker

        gateway = self._metrics._gateway()
        if gateway is not None:
            yield GaugeMetricFamily(
                "chatgateway_ready", "1 when the gateway is ready to serve", value=gateway.ready
            )
            yield GaugeMetricFamily(
                "chatgateway_draining",
                "1 while the gateway drains before stopping",
                value=gateway.draining,
            )
            yield GaugeMetricFamily(
                "chatgateway_messages_in_flight",
                "Messages being processed now",
                value=gateway.in_flight,
            )
            yield GaugeMetricFamily(
                "chatgateway_tenants", "Tenants configured", value=gateway.tenants
            )
            yield GaugeMetricFamily(
                "chatgateway_healthy",
                "1 when the last health check found nothing wedged (watchdog pings go out)",
                value=gateway.healthy,
            )
            if gateway.healthy_at is not None:
                yield GaugeMetricFamily(
                    "chatgateway_last_healthy_timestamp_seconds",
                    "Unix time of the last health check that found nothing wedged",
                    value=gateway.healthy_at,
                )
