"""Rate limits shared by every router replica, in Redis, with a local fallback.

Each admission is one Lua script run (``EVALSHA``): it reads, checks and charges all of the
request's buckets atomically on the server, with the server's clock (``TIME``), so
replicas never race on a read-modify-write and never disagree about time. The bucket
math is the one ``buckets.LocalLimiter`` does. All of a key's buckets share the Redis
Cluster hash tag ``{key id}``.

Redis failing (refused, timed out, any Redis error) never fails a request: the limiter
logs one warning, switches to its in-process ``LocalLimiter`` (limits then hold per
process, not across replicas), and a background probe PINGs Redis every
``retry_interval`` seconds; on success it logs once and shares limits again. Requests
never wait on a Redis that is known to be down. ``status`` exposes the state for metrics.

Connections: a ``BlockingConnectionPool`` of at most ``max_connections``; a command that
finds them all in use waits up to ``pool_timeout`` seconds for one to come free. Running
out of connections is this process being busy, not Redis being down: a request that gets
no connection in time is refused with 503 ``rate_limiter_busy`` and ``Retry-After``
(``LimiterBusy``), never admitted on per-process limits: that would admit a burst larger
than the pool once in Redis and once more in each process's own buckets. The wait is a
semaphore in front of the pool (``_BoundedPool``), so running out is told apart from a
failed connect by the exception's type, not by redis-py's message.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from router.errors import RouterError
from router.tenants.buckets import (
    WINDOW_MS,
    Admission,
    LimiterStatus,
    LocalLimiter,
    decide,
    plan,
)
from router.tenants.keys import Tenant

log = logging.getLogger("routeyard.limits")

# A bucket is a hash {u: amount used, t: server ms}; "used" decays at capacity per window.
# KEYS: buckets. ARGV: window ms, then capacity and cost per bucket.
# Returns {admitted 0/1, wait ms, index of the bucket to wait for, level*1000 per bucket}.
ADMIT = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local levels, caps, costs = {}, {}, {}
local wait, worst = 0, 0
for i = 1, #KEYS do
  local cap, cost = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local rate = cap / window
  local state = redis.call('HMGET', KEYS[i], 'u', 't')
  local level = cap
  if state[1] then
    level = cap - math.max(0, tonumber(state[1]) - math.max(0, now - tonumber(state[2])) * rate)
  end
  levels[i], caps[i], costs[i] = level, cap, cost
  if level < cost then
    local w = math.ceil((cost - level) / rate)
    if w > wait then wait, worst = w, i end
  end
end
local out = {0, wait, worst}
if worst == 0 then
  out[1] = 1
  for i = 1, #KEYS do
    levels[i] = levels[i] - costs[i]
    local used = caps[i] - levels[i]
    redis.call('HSET', KEYS[i], 'u', string.format('%.17g', used), 't', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil(used * window / caps[i]) + 1000)
  end
end
for i = 1, #KEYS do out[3 + i] = math.floor(levels[i] * 1000) end
return out
"""

# KEYS: token buckets. ARGV: window ms, then capacity and tokens to add (may be < 0).
CORRECT = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
for i = 1, #KEYS do
  local cap, delta = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local used = 0
  local state = redis.call('HMGET', KEYS[i], 'u', 't')
  if state[1] then
    used = math.max(0, tonumber(state[1]) - math.max(0, now - tonumber(state[2])) * cap / window)
  end
  used = math.max(0, used + delta)
  redis.call('HSET', KEYS[i], 'u', string.format('%.17g', used), 't', now)
  redis.call('PEXPIRE', KEYS[i], math.ceil(used * window / cap) + 1000)
end
return 1
"""

_DOWN = (RedisError, OSError, asyncio.TimeoutError)


class PoolTimeout(Exception):
    """No connection of the pool came free within ``pool_timeout``: this process is busy.

    Deliberately not a ``RedisError`` (nor an ``OSError`` or ``TimeoutError``), so that it
    is never taken for Redis being down.
    """


class LimiterBusy(RouterError):
    """Raised when the request's limits could not be checked in Redis in time because all
    of this process's Redis connections stayed busy: 503 with ``Retry-After``.

    Not 429: the key has not exceeded its limits (another key's burst may have taken the
    connections), and a 429 would carry ``x-ratelimit-*`` headers nobody read. 503 is the
    router overloaded, as ``NoHealthyBackend`` is; OpenAI's and Anthropic's SDKs retry it
    as they retry 429 (Anthropic's style names it ``overloaded_error``), and it counts as
    a server error where an operator watches for a pool that is too small.
    """

    status = 503
    type = "server_error"
    code = "rate_limiter_busy"

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__(
            "The router is too busy to check this key's rate limits right now; "
            "retry after a short wait.",
            headers={"retry-after": str(retry_after)},
        )


class _BoundedPool(BlockingConnectionPool):
    """A ``BlockingConnectionPool`` whose wait for a free connection ends in
    ``PoolTimeout``, distinct from every error of connecting to or talking to Redis.

    A semaphore of ``max_connections`` permits gates ``get_connection``: a caller holds a
    permit from before it takes a connection until it releases it, so the pool itself
    never runs out (its own wait is only a backstop).
    """

    def __init__(self, *, max_connections: int, timeout: float, **kwargs: Any) -> None:
        super().__init__(max_connections=max_connections, timeout=timeout, **kwargs)
        self.wait_timeout = timeout
        self._permits = asyncio.Semaphore(max_connections)
        self._holders: set[AbstractConnection] = set()

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            async with asyncio.timeout(self.wait_timeout):
                await self._permits.acquire()
        except TimeoutError:
            raise PoolTimeout(
                f"no Redis connection free within {self.wait_timeout:g}s "
                f"(all {self.max_connections} in use)"
            ) from None
        take = super().get_connection
        try:
            connection: AbstractConnection = await take(*args, **kwargs)  # type: ignore[no-untyped-call]
        except BaseException:  # could not connect (Redis down?): the permit goes back
            self._permits.release()
            raise
        self._holders.add(connection)
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        try:
            await super().release(connection)
        finally:
            if connection in self._holders:
                self._holders.discard(connection)
                self._permits.release()


class RedisLimiter:
    """Token buckets in Redis; ``LocalLimiter`` while Redis is unreachable."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "routeyard:rl:",
        timeout: float = 0.5,
        retry_interval: float = 2.0,
        max_connections: int = 100,
        pool_timeout: float = 1.0,
        fallback: LocalLimiter | None = None,
    ) -> None:
        if max_connections < 1 or pool_timeout <= 0:
            raise ValueError("max_connections must be at least 1, pool_timeout above 0")
        self.url = _redact(url)
        self.prefix = prefix
        self.retry_interval = retry_interval
        self.local = fallback or LocalLimiter()
        # One immediate retry replaces a pooled connection that a Redis restart broke.
        pool = _BoundedPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout,
            socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self.max_connections: int = pool.max_connections  # the URL's query may set it
        self.pool_timeout = pool_timeout
        self._client: Any = aioredis.Redis.from_pool(pool)
        self._admit = self._client.register_script(ADMIT)
        self._correct = self._client.register_script(CORRECT)
        self._up = True
        self._probe: asyncio.Task[None] | None = None
        self._transitions = self._local_admissions = self._errors = self._busy = 0
        self._busy_warned = -math.inf

    @property
    def status(self) -> LimiterStatus:
        return LimiterStatus(
            backend="redis" if self._up else "local",
            redis_up=self._up,
            transitions_to_local=self._transitions,
            local_admissions=self._local_admissions,
            redis_errors=self._errors,
            pool_timeouts=self._busy,
        )

    async def admit(self, tenant: Tenant, model: str, estimated_tokens: int) -> Admission:
        buckets = plan(tenant, model)
        if not buckets:
            return Admission(tenant.key_id, model, estimated_tokens)
        if self._up:
            args: list[int] = [WINDOW_MS]
            for bucket in buckets:
                args += [bucket.capacity, bucket.cost(estimated_tokens)]
            try:
                reply = await self._admit(keys=[self.prefix + b.name for b in buckets], args=args)
            except PoolTimeout as exc:
                self._busy += 1
                if self._up:  # else Redis failed while this request waited: fall back
                    self._warn_busy(exc)
                    raise LimiterBusy() from None
            except _DOWN as exc:
                self._went_down(exc)
            else:
                _, wait, worst = (int(v) for v in reply[:3])
                levels = [int(v) / 1000 for v in reply[3:]]
                blocker = buckets[worst - 1] if worst else None
                return decide(
                    tenant, model, estimated_tokens, buckets, levels, wait, blocker, "redis"
                )
        self._local_admissions += 1
        return self.local.admit_now(tenant, model, estimated_tokens)

    async def record(self, admission: Admission, actual_tokens: int | None) -> None:
        """Charge reported usage minus the estimate; dropped if Redis is down meanwhile, or
        if no connection comes free in time (the request has been answered already)."""
        if actual_tokens is None or not admission.charges:
            return
        if admission.via == "local":
            self.local.record_now(admission, actual_tokens)
            return
        if admission.via != "redis" or not self._up:
            return
        args: list[int] = [WINDOW_MS]
        for bucket, charged in admission.charges:
            args += [bucket.capacity, actual_tokens - charged]
        try:
            await self._correct(keys=[self.prefix + b.name for b, _ in admission.charges],
                                args=args)
        except PoolTimeout:
            self._busy += 1
        except _DOWN as exc:
            self._went_down(exc)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self._client.aclose()

    def _warn_busy(self, exc: PoolTimeout) -> None:
        """A WARNING at most once a minute: the pool is too small for this process's load
        (``ROUTEYARD_REDIS_MAX_CONNECTIONS``), or Redis is slow to answer."""
        now = time.monotonic()
        if now < self._busy_warned + 60:
            return
        self._busy_warned = now
        log.warning(
            "rate limits: %s; requests are refused with 503 until connections come free "
            "(%d so far; if this repeats, raise ROUTEYARD_REDIS_MAX_CONNECTIONS or "
            "ROUTEYARD_REDIS_POOL_TIMEOUT)", exc, self._busy,
        )

    def _went_down(self, exc: BaseException) -> None:
        self._errors += 1
        if not self._up:
            return
        self._up = False
        self._transitions += 1
        log.warning(
            "rate limits: Redis at %s failed (%s: %s); limiting in-process, per replica, "
            "until it answers again (retrying every %gs)",
            self.url, type(exc).__name__, exc, self.retry_interval,
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval)
            try:
                await self._client.ping()
            except (PoolTimeout, *_DOWN):
                continue
            self._up = True
            log.info("rate limits: Redis at %s answers again; limits are shared", self.url)
            return


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urlunsplit(parts._replace(netloc=netloc))
