"""The admission point's pure parts with a fake clock, and limits shared through Redis."""

from __future__ import annotations

import ipaddress
import secrets
from typing import Any

import pytest

from chatgateway.admission import (
    DAY,
    SWEEP_AT,
    Admission,
    Breaker,
    DailyCounts,
    LimitsStorageLimiter,
    Rule,
    TokenBuckets,
    client_address,
    open_shared_limiter,
    refusal_hold,
    seconds_to_next_day,
)
from chatgateway.config import BreakerConfig, LimitsConfig, RateConfig
from chatgateway.errors import RateLimitedError
from chatgateway.metrics import Metrics


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rejected(metrics: Metrics, tenant: str, platform: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "chatgateway_messages_rejected_total",
        {"tenant": tenant, "platform": platform, "reason": reason},
    )
    return value or 0.0


# Token buckets ---------------------------------------------------------------------------


def test_bucket_allows_the_burst_then_refuses_until_a_token_refills() -> None:
    buckets = TokenBuckets()
    rate = 1.0  # a token per second
    assert [buckets.take("k", rate, 3, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k", rate, 3, 0.0) == pytest.approx(1.0)
    assert buckets.take("k", rate, 3, 0.5) == pytest.approx(0.5)  # a refusal takes nothing
    assert buckets.take("k", rate, 3, 1.0) == 0.0
    assert buckets.take("k", rate, 3, 1.0) > 0
    # The long-run rate: after a long pause only `burst` at once, never more.
    assert [buckets.take("k", rate, 3, 100.0) for _ in range(4)][-1] > 0


def test_bucket_paces_within_max_wait_one_grant_every_1_over_rate() -> None:
    buckets = TokenBuckets()
    rate, burst, max_wait = 10.0, 2, 1.0  # debt of at most rate x max_wait = 10 tokens
    waits = [buckets.take("k", rate, burst, 0.0, max_wait) for _ in range(12)]
    # The burst at once, then each next message's token 0.1 s after the previous one's.
    assert waits == pytest.approx([0.0, 0.0, *(i / 10 for i in range(1, 11))])
    # Beyond max_wait: refused (the wait returned is over max_wait), and nothing is taken.
    assert buckets.take("k", rate, burst, 0.0, max_wait) == pytest.approx(1.1)
    assert buckets.take("k", rate, burst, 0.0, max_wait) == pytest.approx(1.1)
    # Half a second later five tokens were repaid: five more reservations, continuing the
    # schedule (grants at 1.1, 1.2, ... 1.5 s), and not one more.
    later = [0.5 + buckets.take("k", rate, burst, 0.5, max_wait) for _ in range(6)]
    assert later[:5] == pytest.approx([1.1, 1.2, 1.3, 1.4, 1.5])
    assert later[5] - 0.5 > max_wait
    # Once the debt is repaid and the bucket refilled, the burst is there again.
    assert buckets.take("k", rate, burst, 10.0, max_wait) == 0.0


def test_bucket_debt_is_capped_whatever_the_flood() -> None:
    buckets = TokenBuckets()
    waits = [buckets.take("k", 100.0, 100, 0.0, 0.5) for _ in range(10_000)]
    assert sum(w == 0.0 for w in waits) == 100  # the burst
    assert sum(0.0 < w <= 0.5 for w in waits) == 50  # rate x max_wait reserved
    # max_wait 0 (the default) reserves nothing: a refusal as before.
    assert TokenBuckets().take("k", 1.0, 1, 0.0) == 0.0
    zero = TokenBuckets()
    zero.take("k", 1.0, 1, 0.0)
    assert zero.take("k", 1.0, 1, 0.0) == pytest.approx(1.0)
    assert zero.take("k", 1.0, 1, 0.5) == pytest.approx(0.5)


def test_refusal_hold_is_the_retry_after_capped_with_a_little_jitter() -> None:
    assert refusal_hold(0.01, 1.0, 0.0) == 1.0  # Retry-After says 1 s at least
    assert refusal_hold(0.01, 1.0, 1.0) == pytest.approx(1.1)
    assert refusal_hold(30.0, 1.0, 0.5) == pytest.approx(1.05)
    assert refusal_hold(2.5, 5.0, 0.0) == 3.0
    assert refusal_hold(5.0, 0.0, 1.0) == 0.0  # refusal_delay 0: at once


def test_buckets_are_per_key() -> None:
    buckets = TokenBuckets()
    assert buckets.take("a", 1.0, 1, 0.0) == 0.0
    assert buckets.take("a", 1.0, 1, 0.0) > 0
    assert buckets.take("b", 1.0, 1, 0.0) == 0.0


def test_full_buckets_are_forgotten_so_memory_stays_bounded() -> None:
    buckets = TokenBuckets()
    for i in range(SWEEP_AT * 3):
        # Each key is full again one second after its message; keys arrive 10 per second.
        buckets.take(i, 1.0, 1, i / 10)
    assert len(buckets) <= SWEEP_AT + 1


def test_daily_quota_counts_per_utc_day() -> None:
    counts = DailyCounts()
    noon = 20_000 * DAY + DAY / 2
    assert [counts.take("t", 2, noon + i) for i in range(2)] == [0.0, 0.0]
    assert counts.take("t", 2, noon + 3) == pytest.approx(DAY / 2 - 3)
    assert counts.take("t", 2, 20_001 * DAY + 1) == 0.0  # the next UTC day starts afresh
    assert seconds_to_next_day(20_000 * DAY) == DAY


def test_rule_window_keeps_rate_and_burst() -> None:
    rule = Rule.of(RateConfig(per_minute=30, burst=15))
    assert rule.rate == 0.5 and rule.window == 30  # 15 messages per 30 s = 30 per minute


# The circuit breaker ---------------------------------------------------------------------

BREAKER = BreakerConfig(failures=3, window=10, cooldown=5)


def test_breaker_opens_after_n_failures_within_the_window_only() -> None:
    breaker = Breaker()
    assert breaker.record(False, BREAKER, 0.0) is None
    assert breaker.record(False, BREAKER, 5.0) is None
    assert breaker.record(True, BREAKER, 6.0) is None  # successes do not reset the count
    assert breaker.record(False, BREAKER, 11.0) is None  # the one at 0.0 left the window
    assert breaker.state == "closed"
    assert breaker.record(False, BREAKER, 12.0) == "breaker_opened"
    assert breaker.state == "open"


def test_open_breaker_refuses_until_the_cooldown_then_lets_one_probe_through() -> None:
    breaker = Breaker()
    for t in range(3):
        breaker.record(False, BREAKER, float(t))
    assert breaker.allow(BREAKER, 3.0) == (False, None)
    assert breaker.retry_in(BREAKER, 3.0) == pytest.approx(4.0)
    assert breaker.allow(BREAKER, 7.0) == (True, "breaker_half_open")
    assert breaker.state == "half_open"
    assert breaker.allow(BREAKER, 7.1) == (False, None)  # exactly one probe
    assert breaker.allow(BREAKER, 100.0) == (False, None)
    assert breaker.record(True, BREAKER, 8.0) == "breaker_closed"
    assert breaker.allow(BREAKER, 8.0) == (True, None)
    # Closed again with a clean slate: it takes N new failures to open.
    assert breaker.record(False, BREAKER, 9.0) is None


def test_failed_probe_opens_the_breaker_for_another_cooldown() -> None:
    breaker = Breaker()
    for t in range(3):
        breaker.record(False, BREAKER, float(t))
    assert breaker.allow(BREAKER, 10.0)[0]
    assert breaker.record(False, BREAKER, 11.0) == "breaker_opened"
    assert breaker.allow(BREAKER, 15.0) == (False, None)
    assert breaker.allow(BREAKER, 16.0) == (True, "breaker_half_open")


def test_abandoned_probe_lets_the_next_message_probe() -> None:
    breaker = Breaker()
    for t in range(3):
        breaker.record(False, BREAKER, float(t))
    assert breaker.allow(BREAKER, 10.0)[0]
    breaker.abandon()  # e.g. cancelled by a shutdown: no result
    assert breaker.allow(BREAKER, 10.5) == (True, None)
    assert breaker.allow(BREAKER, 10.6) == (False, None)


# The admission object --------------------------------------------------------------------


def limits(**overrides: Any) -> LimitsConfig:
    values: dict[str, Any] = {
        "tenant": None,
        "user": {"per_minute": 60, "burst": 2},
        "notice_text": "Slow down, wait {retry_after} s.",
        "notice_interval": 30,
    }
    values.update(overrides)
    return LimitsConfig.model_validate(values)


async def test_user_refusal_carries_one_notice_per_interval() -> None:
    clock, metrics = Clock(), Metrics()
    admission = Admission(metrics, clock=clock)
    config = limits()
    for _ in range(2):
        await admission.admit_message("acme", "slack", "U1", config)
    with pytest.raises(RateLimitedError) as first:
        await admission.admit_message("acme", "slack", "U1", config)
    assert first.value.reason == "user_rate"
    assert first.value.retry_after == pytest.approx(1.0)
    assert first.value.notice == "Slow down, wait 1 s."
    with pytest.raises(RateLimitedError) as second:
        await admission.admit_message("acme", "slack", "U1", config)
    assert second.value.notice is None  # told already: no flood of notices
    # Another user of the same tenant is not affected and has their own notice.
    await admission.admit_message("acme", "slack", "U2", config)
    clock.now += 31  # the notice interval passed (and the bucket refilled)
    await admission.admit_message("acme", "slack", "U1", config)
    await admission.admit_message("acme", "slack", "U1", config)
    with pytest.raises(RateLimitedError) as third:
        await admission.admit_message("acme", "slack", "U1", config)
    assert third.value.notice is not None
    assert rejected(metrics, "acme", "slack", "user_rate") == 3


async def test_tenant_rate_and_quota_refuse_with_their_reason() -> None:
    clock, metrics = Clock(), Metrics()
    admission = Admission(metrics, clock=clock, wall=lambda: 20_000 * DAY + 100)
    config = limits(tenant={"per_minute": 6, "burst": 1, "max_wait": 0}, user=None,
                    daily_quota=2)
    await admission.admit_tenant("acme", "web", config)
    with pytest.raises(RateLimitedError) as rate:
        await admission.admit_tenant("acme", "web", config)
    assert rate.value.reason == "tenant_rate" and rate.value.retry_after == pytest.approx(10)
    clock.now += 10
    await admission.admit_tenant("acme", "web", config)
    clock.now += 10
    with pytest.raises(RateLimitedError) as quota:
        await admission.admit_tenant("acme", "web", config)
    assert quota.value.reason == "daily_quota"
    assert quota.value.retry_after == pytest.approx(DAY - 100)
    assert rejected(metrics, "acme", "web", "tenant_rate") == 1
    assert rejected(metrics, "acme", "web", "daily_quota") == 1
    # Another tenant has its own bucket and quota.
    await admission.admit_tenant("other", "web", config)


async def test_tenant_rate_paces_within_max_wait_then_refuses() -> None:
    clock, metrics, slept = Clock(), Metrics(), []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    admission = Admission(metrics, clock=clock, sleep=sleep)
    config = limits(tenant={"per_minute": 120, "burst": 1, "max_wait": 1.5}, user=None)
    assert admission.check_tenant("acme", "web", config) == 0.0  # the fast path: no wait
    for _ in range(3):  # Slack and Discord wait inside admit_message
        await admission.admit_message("acme", "slack", "U1", config)
    assert slept == pytest.approx([0.5, 1.0, 1.5])
    with pytest.raises(RateLimitedError) as exc:
        admission.check_tenant("acme", "web", config)
    # Retrying after this the message would be paced again, within max_wait.
    assert exc.value.reason == "tenant_rate" and exc.value.retry_after == pytest.approx(0.5)
    assert rejected(metrics, "acme", "web", "tenant_rate") == 1
    assert rejected(metrics, "acme", "slack", "tenant_rate") == 0  # paced is not refused
    paced = {"tenant": "acme", "platform": "slack"}
    assert metrics.registry.get_sample_value("chatgateway_messages_paced_total", paced) == 3
    clock.now += 0.5
    assert admission.check_tenant("acme", "web", config) == pytest.approx(1.5)


async def test_a_tenant_refusal_also_tells_the_user_once() -> None:
    admission = Admission(Metrics(), clock=Clock())
    config = limits(tenant={"per_minute": 1, "burst": 1, "max_wait": 0}, user=None)
    await admission.admit_message("acme", "discord", "42", config)
    with pytest.raises(RateLimitedError) as exc:
        await admission.admit_message("acme", "discord", "42", config)
    assert exc.value.reason == "tenant_rate" and exc.value.notice == "Slow down, wait 60 s."


async def test_address_limits_for_calls_and_token_minting_are_separate() -> None:
    metrics = Metrics()
    admission = Admission(metrics, clock=Clock())
    config = limits(
        address={"per_minute": 60, "burst": 1}, visitor_tokens={"per_minute": 60, "burst": 1}
    )
    await admission.admit_address("acme", "192.0.2.1", config)
    await admission.admit_address("acme", "192.0.2.1", config, minting=True)
    with pytest.raises(RateLimitedError) as call:
        await admission.admit_address("acme", "192.0.2.1", config)
    with pytest.raises(RateLimitedError) as mint:
        await admission.admit_address("acme", "192.0.2.1", config, minting=True)
    assert (call.value.reason, mint.value.reason) == ("address_rate", "visitor_token_rate")
    await admission.admit_address("acme", "192.0.2.2", config)
    assert rejected(metrics, "acme", "web", "visitor_token_rate") == 1
    off = limits(address=None, visitor_tokens=None)
    for _ in range(100):
        await admission.admit_address("acme", "192.0.2.1", off, minting=True)


async def test_breaker_through_admission_counts_only_reported_failures() -> None:
    clock = Clock()
    admission = Admission(Metrics(), clock=clock)
    assert admission.breaker_allow("acme", BREAKER)
    admission.breaker_record("acme", BREAKER, True)
    assert admission.breaker_state("acme") == "closed"
    for _ in range(3):
        admission.breaker_record("acme", BREAKER, False)
    assert admission.breaker_state("acme") == "open"
    assert not admission.breaker_allow("acme", BREAKER)
    assert admission.breaker_status("acme", BREAKER) == {
        "enabled": True,
        "state": "open",
        "probeInSeconds": 5.0,
    }
    assert admission.breaker_state("other") == "closed"


def test_client_address_trusts_forwarded_for_only_from_a_trusted_proxy() -> None:
    proxies = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_address("203.0.113.9", ["198.51.100.1"], proxies) == "203.0.113.9"
    assert client_address("203.0.113.9", ["198.51.100.1"], []) == "203.0.113.9"
    assert client_address("10.0.0.2", ["198.51.100.1"], proxies) == "198.51.100.1"
    # A client-written hop to the left of the real one does not count.
    assert client_address("10.0.0.2", ["1.2.3.4, 198.51.100.1, 10.0.0.3"], proxies) == (
        "198.51.100.1"
    )
    assert client_address("10.0.0.2", ["not-an-ip"], proxies) == "10.0.0.2"
    assert client_address(None, [], proxies) == "unknown"


# A shared store --------------------------------------------------------------------------


async def test_two_instances_on_redis_enforce_one_limit() -> None:
    shared_a = LimitsStorageLimiter("redis://127.0.0.1:6379")
    shared_b = open_shared_limiter("redis://127.0.0.1:6379")
    assert shared_b is not None
    assert open_shared_limiter("memory://") is None
    one, two = Admission(Metrics(), shared_a), Admission(Metrics(), shared_b)
    try:
        await _share_one_limit(one, two)
    finally:
        await one.close()
        await two.close()


async def _share_one_limit(one: Admission, two: Admission) -> None:
    tenant = f"t{secrets.token_hex(6)}"  # fresh keys: the Redis outlives the test
    config = limits(tenant={"per_minute": 4, "burst": 4}, user=None, daily_quota=6)
    for admission in (one, two, one, two):
        await admission.admit_tenant(tenant, "web", config)
    with pytest.raises(RateLimitedError) as exc:
        await two.admit_tenant(tenant, "web", config)
    assert exc.value.reason == "tenant_rate" and 0 < exc.value.retry_after <= 60
    with pytest.raises(RateLimitedError):
        await one.admit_tenant(tenant, "web", config)
    # The daily quota is one count too.
    quota_only = limits(tenant=None, user=None, daily_quota=3)
    quota_tenant = f"q{secrets.token_hex(6)}"
    for admission in (one, two, one):
        await admission.admit_tenant(quota_tenant, "web", quota_only)
    with pytest.raises(RateLimitedError) as quota:
        await two.admit_tenant(quota_tenant, "web", quota_only)
    assert quota.value.reason == "daily_quota"
