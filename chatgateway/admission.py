"""The one admission point for limits, quotas and the agent's circuit breaker.

`Pipeline.handle` (and the web API, before it reads a body) asks `Admission` whether a message
may go on; a refusal is a `RateLimitedError` carrying the seconds to wait, the reason and, for
Slack and Discord, the notice to post (at most one per user per `notice_interval`). The breaker
decides, right before each agent call, whether the agent is called or the fallback is answered.

Rates are token buckets (rate and burst). The tenant's rate paces rather than refuses: a message
over it whose token comes within `limits.tenant.max_wait` reserves that token (the bucket goes
into debt, at most rate x max_wait) and waits until its time, so a flood is served at exactly the
configured rate, evenly spaced, instead of being refused and retried at once. On the web API a
refusal of a tenant or address limit is answered only after min(Retry-After,
`limits.refusal_delay`) plus a little jitter (`refusal_hold`): a cheap 429 would let a client
that retries at once turn the limit into a CPU flood of the event loop every tenant shares.

In one process the buckets live in memory here: the
`limits` library has no token bucket, and its in-memory storage reads the wall clock and sweeps
every key through a thread hop, which costs more than the whole check on the web path. With a
shared store (`limits.storage`, e.g. Redis) the same rule runs as `limits`' moving window of
`burst` messages per `burst / rate` seconds: the same long-run rate and the same burst, held
across instances; a moving window cannot reserve a future slot, so there the tenant's rate
refuses at once (and the web API still holds its 429). The breaker is a small state machine of
our own; no maintained library fits an asyncio per-tenant breaker whose probe is decided at call
time.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import TYPE_CHECKING, Literal, Protocol

import structlog

from chatgateway.errors import RateLimitedError

if TYPE_CHECKING:
    from chatgateway.config import BreakerConfig, LimitsConfig, RateConfig
    from chatgateway.metrics import Metrics

log = structlog.get_logger("chatgateway.admission")

Reason = Literal[
    "tenant_rate", "daily_quota", "user_rate", "address_rate", "visitor_token_rate"
]
BreakerState = Literal["closed", "open", "half_open"]
DAY = 86400.0
#: Buckets kept before full (idle) ones are swept; the sweep is O(buckets), at most once
#: per doubling, so a flood of new users or addresses cannot grow memory without bound.
SWEEP_AT = 4096


def seconds_to_next_day(now: float) -> float:
    """Seconds from `now` (Unix time) to the next 00:00 UTC."""
    return DAY - now % DAY


@dataclass(frozen=True, slots=True)
class Rule:
    """A token bucket: `burst` tokens, refilled at `rate` per second."""

    rate: float
    burst: int

    @classmethod
    def of(cls, config: RateConfig) -> Rule:
        return cls(config.per_minute / 60.0, config.burst)

    @property
    def window(self) -> int:
        """The moving window (seconds) of `burst` messages with the same long-run rate."""
        return max(1, round(self.burst / self.rate))


class TokenBuckets:
    """In-memory token buckets by key; pure: the caller passes the time."""

    __slots__ = ("_buckets", "_sweep_at")

    def __init__(self) -> None:
        # key -> [tokens, last update, time the bucket is full again]
        self._buckets: dict[object, list[float]] = {}
        self._sweep_at = SWEEP_AT

    def take(
        self, key: object, rate: float, burst: int, now: float, max_wait: float = 0.0
    ) -> float:
        """Take one token: 0.0 if granted now, else the seconds until one is available.

        A wait of at most `max_wait` is a reservation: the token is taken (the bucket goes into
        debt, at most rate x max_wait tokens) and is the caller's after that wait, each next
        one 1/rate later. A longer wait takes nothing: the caller is refused.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now)
            tokens = burst - 1.0
            self._buckets[key] = [tokens, now, now + 1.0 / rate]
            return 0.0 if burst >= 1 else 1.0 / rate
        tokens = bucket[0] + (now - bucket[1]) * rate
        if tokens > burst:
            tokens = burst
        if tokens < 1.0:
            wait = (1.0 - tokens) / rate
            if wait > max_wait:
                bucket[0], bucket[1] = tokens, now
                return wait
            tokens -= 1.0
            bucket[0], bucket[1], bucket[2] = tokens, now, now + (burst - tokens) / rate
            return wait
        tokens -= 1.0
        bucket[0], bucket[1], bucket[2] = tokens, now, now + (burst - tokens) / rate
        return 0.0

    def _sweep(self, now: float) -> None:
        # A full bucket is the same as no bucket: forget it.
        self._buckets = {k: b for k, b in self._buckets.items() if b[2] > now}
        self._sweep_at = max(SWEEP_AT, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)


def refusal_hold(retry_after: float, cap: float, jitter: float) -> float:
    """Seconds to hold a web 429: its Retry-After (whole seconds, at least 1), at most `cap`,
    stretched by `jitter` (0-1) times a tenth so that held clients do not all return at once."""
    return min(max(1, math.ceil(retry_after)), cap) * (1.0 + 0.1 * jitter)


class DailyCounts:
    """In-memory messages per key and UTC day; pure: the caller passes the Unix time."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[object, tuple[int, int]] = {}

    def take(self, key: object, quota: int, now: float) -> float:
        """Count one message: 0.0 if within `quota` today, else the seconds until 00:00 UTC."""
        day = int(now // DAY)
        seen_day, count = self._counts.get(key, (day, 0))
        if seen_day != day:
            count = 0
        if count >= quota:
            return seconds_to_next_day(now)
        self._counts[key] = (day, count + 1)
        return 0.0


class SharedLimiter(Protocol):
    """Rates and quotas held in a store every instance shares."""

    async def hit(self, key: str, rule: Rule) -> float:
        """0.0 if granted, else the seconds to wait."""
        ...

    async def count(self, key: str, quota: int, now: float) -> float:
        """Count one message of the UTC day; 0.0 if within `quota`, else seconds to 00:00 UTC."""
        ...

    async def close(self) -> None:
        """Close the store's connections."""
        ...


class LimitsStorageLimiter:
    """`SharedLimiter` on a `limits.aio` storage (Redis, Memcached, MongoDB, ...)."""

    def __init__(self, uri: str) -> None:
        # Imported here: a gateway on memory:// never loads the library.
        from limits import RateLimitItem, RateLimitItemPerSecond
        from limits.aio.storage import Storage
        from limits.aio.strategies import MovingWindowRateLimiter
        from limits.storage import storage_from_string

        storage = storage_from_string(uri if uri.startswith("async+") else f"async+{uri}")
        assert isinstance(storage, Storage)
        self.storage = storage
        self._item = RateLimitItemPerSecond
        self._limiter = MovingWindowRateLimiter(storage)
        self._items: dict[Rule, RateLimitItem] = {}

    async def hit(self, key: str, rule: Rule) -> float:
        item = self._items.get(rule)
        if item is None:
            item = self._items[rule] = self._item(rule.burst, rule.window, namespace="cgw")
        if await self._limiter.hit(item, key):
            return 0.0
        stats = await self._limiter.get_window_stats(item, key)
        return max(stats.reset_time - time.time(), 1.0 / rule.rate, 0.001)

    async def count(self, key: str, quota: int, now: float) -> float:
        day = int(now // DAY)
        # The key names the UTC day, so the count starts afresh at midnight on every instance.
        count = await self.storage.incr(f"cgw/q/{key}/{day}", int(DAY) + 3600)
        return 0.0 if count <= quota else seconds_to_next_day(now)

    async def close(self) -> None:
        # `limits` has no close: disconnect the pool of the Redis client it wraps, if any.
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            result = pool.disconnect()
            if inspect.isawaitable(result):
                await result


class Breaker:
    """One tenant's circuit breaker on its agent; pure: the caller passes the time.

    closed: calls go through; `failures` failures within `window` seconds open it.
    open: the fallback at once for `cooldown` seconds; then the next message is the probe.
    half_open: exactly one probe call in flight, everyone else gets the fallback; its success
    closes the breaker, its failure opens it again.
    """

    __slots__ = ("_failures", "_opened_at", "_probing", "state")

    def __init__(self) -> None:
        self.state: BreakerState = "closed"
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._probing = False

    def allow(self, config: BreakerConfig, now: float) -> tuple[bool, str | None]:
        """Whether to call the agent now, and the transition this caused (a log event name)."""
        if self.state == "closed":
            return True, None
        if self.state == "open":
            if now - self._opened_at < config.cooldown:
                return False, None
            self.state, self._probing = "half_open", True
            return True, "breaker_half_open"
        if self._probing:
            return False, None
        self._probing = True  # the last probe was abandoned (cancelled): this one decides
        return True, None

    def record(self, ok: bool, config: BreakerConfig, now: float) -> str | None:
        """Record an agent call's result; returns the transition it caused, if any."""
        if self.state == "half_open":
            self._probing = False
            if ok:
                self.state = "closed"
                self._failures.clear()
                return "breaker_closed"
            self.state, self._opened_at = "open", now
            return "breaker_opened"
        if ok or self.state == "open":
            return None  # (a call that began before the breaker opened)
        failures = self._failures
        failures.append(now)
        while failures and failures[0] <= now - config.window:
            failures.popleft()
        if len(failures) >= config.failures:
            failures.clear()
            self.state, self._opened_at = "open", now
            return "breaker_opened"
        return None

    def abandon(self) -> None:
        """A call ended without a result (cancelled): let the next message probe instead."""
        if self.state == "half_open":
            self._probing = False

    def retry_in(self, config: BreakerConfig, now: float) -> float | None:
        """Seconds until an open breaker lets a probe through (None unless open)."""
        if self.state != "open":
            return None
        return max(0.0, self._opened_at + config.cooldown - now)


_MESSAGES: dict[str, str] = {
    "tenant_rate": "this tenant is sending messages faster than its limit",
    "daily_quota": "this tenant's daily message quota is used up (it resets at 00:00 UTC)",
    "user_rate": "too many messages from this user",
    "address_rate": "too many requests from this address",
    "visitor_token_rate": "too many visitor tokens requested from this address",
}


class Admission:
    """Every limit, quota and breaker decision of the gateway, for every tenant."""

    def __init__(
        self,
        metrics: Metrics,
        shared: SharedLimiter | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.metrics = metrics
        self.shared = shared
        self._clock = clock
        self._wall = wall
        #: Waits out a paced message's reservation (the tenant's rate); tests pass a fake.
        self.sleep = sleep
        self._jitter = jitter
        self._buckets = TokenBuckets()
        self._daily = DailyCounts()
        self._noticed: dict[tuple[str, str, str], float] = {}
        self._noticed_sweep_at = SWEEP_AT
        #: Tenants whose agent failed at least once: the only ones the breaker must look at.
        self.breakers: dict[str, Breaker] = {}

    async def _take_shared(self, key: tuple[str, ...], config: RateConfig) -> float:
        assert self.shared is not None
        return await self.shared.hit("/".join(key), Rule.of(config))

    def _refuse(
        self, reason: Reason, retry_after: float, tenant_id: str, platform: str
    ) -> RateLimitedError:
        self.metrics.rejected.labels(tenant_id, platform, reason).inc()
        wait = max(1, math.ceil(retry_after))
        return RateLimitedError(reason, retry_after, f"{_MESSAGES[reason]}; retry in {wait} s")

    def hold(self, exc: RateLimitedError, limits: LimitsConfig) -> float:
        """Seconds the web API holds this refusal before answering its 429."""
        return refusal_hold(exc.retry_after, limits.refusal_delay, self._jitter())

    # `check_*` decide in memory without a coroutine (the web path's cost), raising
    # RateLimitedError to refuse; False (None) means the shared store decides (`admit_*`).

    def check_tenant(self, tenant_id: str, platform: str, limits: LimitsConfig) -> float | None:
        """The tenant's own rate and daily quota, in memory: the seconds the message must wait
        for its reserved token (0.0: none), or None when the shared store decides."""
        if self.shared is not None:
            return None
        rate = limits.tenant
        wait = 0.0
        if rate is not None:
            key = ("t", tenant_id)
            wait = self._buckets.take(
                key, rate.per_minute / 60.0, rate.burst, self._clock(), rate.max_wait
            )
            if wait > rate.max_wait:
                # Retrying after this, the message would be paced again within max_wait.
                raise self._refuse("tenant_rate", wait - rate.max_wait, tenant_id, platform)
            if wait:
                self.metrics.paced.labels(tenant_id, platform).inc()
        if limits.daily_quota is not None:
            refused = self._daily.take(tenant_id, limits.daily_quota, self._wall())
            if refused:
                raise self._refuse("daily_quota", refused, tenant_id, platform)
        return wait

    async def admit_tenant(self, tenant_id: str, platform: str, limits: LimitsConfig) -> None:
        """The tenant's own rate and daily quota, after any wait for a reserved token; raises
        RateLimitedError."""
        wait = self.check_tenant(tenant_id, platform, limits)
        if wait is not None:
            if wait:
                await self.sleep(wait)
            return
        assert self.shared is not None
        if limits.tenant is not None:
            wait = await self._take_shared(("t", tenant_id), limits.tenant)
            if wait:
                raise self._refuse("tenant_rate", wait, tenant_id, platform)
        if limits.daily_quota is not None:
            wait = await self.shared.count(tenant_id, limits.daily_quota, self._wall())
            if wait:
                raise self._refuse("daily_quota", wait, tenant_id, platform)

    def check_user(self, tenant_id: str, platform: str, user_id: str, limits: LimitsConfig) -> bool:
        """One user's rate (a Slack or Discord user, a web userId or visitor), in memory."""
        if self.shared is not None:
            return False
        rate = limits.user
        if rate is not None:
            key = ("u", tenant_id, platform, user_id)
            wait = self._buckets.take(key, rate.per_minute / 60.0, rate.burst, self._clock())
            if wait:
                exc = self._refuse("user_rate", wait, tenant_id, platform)
                raise self._with_notice(exc, tenant_id, platform, user_id, limits)
        return True

    async def admit_user(
        self, tenant_id: str, platform: str, user_id: str, limits: LimitsConfig
    ) -> None:
        """One user's rate; raises RateLimitedError (with the notice to post, if due)."""
        if self.check_user(tenant_id, platform, user_id, limits) or limits.user is None:
            return
        wait = await self._take_shared(("u", tenant_id, platform, user_id), limits.user)
        if wait:
            exc = self._refuse("user_rate", wait, tenant_id, platform)
            raise self._with_notice(exc, tenant_id, platform, user_id, limits)

    async def admit_message(
        self, tenant_id: str, platform: str, user_id: str, limits: LimitsConfig
    ) -> None:
        """Tenant rate, quota and user rate of one message that was not admitted earlier."""
        try:
            await self.admit_tenant(tenant_id, platform, limits)
        except RateLimitedError as exc:
            # The user still gets one polite notice per interval, whoever's limit it was.
            raise self._with_notice(exc, tenant_id, platform, user_id, limits) from None
        await self.admit_user(tenant_id, platform, user_id, limits)

    def _with_notice(
        self,
        exc: RateLimitedError,
        tenant_id: str,
        platform: str,
        user_id: str,
        limits: LimitsConfig,
    ) -> RateLimitedError:
        now = self._clock()
        key = (tenant_id, platform, user_id)
        if self._noticed.get(key, -math.inf) > now:
            return exc
        if len(self._noticed) >= self._noticed_sweep_at:
            self._noticed = {k: t for k, t in self._noticed.items() if t > now}
            self._noticed_sweep_at = max(SWEEP_AT, 2 * len(self._noticed))
        self._noticed[key] = now + limits.notice_interval
        wait = str(max(1, math.ceil(exc.retry_after)))
        text = limits.notice_text.replace("{retry_after}", wait)
        return RateLimitedError(exc.reason, exc.retry_after, str(exc), text)

    async def admit_address(
        self,
        tenant_id: str,
        address: str,
        limits: LimitsConfig,
        *,
        minting: bool = False,
    ) -> None:
        """A web client address's rate of anonymous/public calls, or of visitor-token minting."""
        config = limits.visitor_tokens if minting else limits.address
        if config is None:
            return
        reason: Reason = "visitor_token_rate" if minting else "address_rate"
        key = ("v" if minting else "a", tenant_id, address)
        if self.shared is None:
            wait = self._buckets.take(key, config.per_minute / 60.0, config.burst, self._clock())
        else:
            wait = await self._take_shared(key, config)
        if wait:
            raise self._refuse(reason, wait, tenant_id, "web")

    # The circuit breaker ---------------------------------------------------------------------

    def breaker_allow(self, tenant_id: str, config: BreakerConfig) -> bool:
        """Whether to call the tenant's agent now (False: answer the fallback at once)."""
        breaker = self.breakers.get(tenant_id)
        if breaker is None:
            return True
        allowed, transition = breaker.allow(config, self._clock())
        if transition is not None:
            log.warning(transition, tenant_id=tenant_id)
        return allowed

    def breaker_record(self, tenant_id: str, config: BreakerConfig, ok: bool) -> None:
        """Record the result of an agent call the breaker allowed."""
        breaker = self.breakers.get(tenant_id)
        if breaker is None:
            if ok:
                return  # the common case costs one dict lookup
            breaker = self.breakers[tenant_id] = Breaker()
        transition = breaker.record(ok, config, self._clock())
        if transition is not None:
            if transition == "breaker_opened":
                log.warning(
                    transition,
                    tenant_id=tenant_id,
                    failures=config.failures,
                    window_seconds=config.window,
                    cooldown_seconds=config.cooldown,
                )
            else:
                log.info(transition, tenant_id=tenant_id)

    def breaker_abandon(self, tenant_id: str) -> None:
        breaker = self.breakers.get(tenant_id)
        if breaker is not None:
            breaker.abandon()

    def breaker_state(self, tenant_id: str) -> BreakerState:
        breaker = self.breakers.get(tenant_id)
        return "closed" if breaker is None else breaker.state

    def breaker_status(self, tenant_id: str, config: BreakerConfig) -> dict[str, object]:
        """The breaker as /admin/status shows it."""
        breaker = self.breakers.get(tenant_id)
        state = "closed" if breaker is None else breaker.state
        retry = None if breaker is None else breaker.retry_in(config, self._clock())
        return {
            "enabled": config.enabled,
            "state": state,
            # Rounded up: 0 means the next message is the probe.
            "probeInSeconds": None if retry is None else math.ceil(retry * 10) / 10,
        }

    async def close(self) -> None:
        """Close the shared store's connections (nothing to do in memory)."""
        if self.shared is not None:
            await self.shared.close()


def client_address(
    peer: str | None, forwarded_for: list[str], trusted: Sequence[IPv4Network | IPv6Network]
) -> str:
    """The address a per-address limit counts: the TCP peer, unless the peer is a trusted
    proxy; then the right-most X-Forwarded-For hop that is not a trusted proxy itself.

    A client can put anything in X-Forwarded-For, so only hops a trusted proxy appended count.
    """
    address = peer or "unknown"
    if not trusted or not forwarded_for:
        return address
    try:
        ip = ip_address(address)
    except ValueError:
        return address
    if not any(ip in net for net in trusted):
        return address
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        try:
            ip = ip_address(hop)
        except ValueError:
            return address  # garbage where a proxy would have written an address
        if not any(ip in net for net in trusted):
            return str(ip)
    return address


def open_shared_limiter(uri: str) -> SharedLimiter | None:
    """The shared limiter for `limits.storage` (None for `memory://`: in-process buckets)."""
    if uri.startswith(("memory://", "async+memory://")):
        return None
    return LimitsStorageLimiter(uri)
