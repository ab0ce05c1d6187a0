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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

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


class RedisLimiter:
    """Token buckets in Redis; ``LocalLimiter`` while Redis is unreachable."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "routeyard:rl:",
        timeout: float = 0.5,
        retry_interval: float = 2.0,
        fallback: LocalLimiter | None = None,
    ) -> None:
        self.url = _redact(url)
        self.prefix = prefix
        self.retry_interval = retry_interval
        self.local = fallback or LocalLimiter()
        # One immediate retry replaces a pooled connection that a Redis restart broke.
        self._client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._admit = self._client.register_script(ADMIT)
        self._correct = self._client.register_script(CORRECT)
        self._up = True
        self._probe: asyncio.Task[None] | None = None
        self._transitions = self._local_admissions = self._errors = 0

    @property
    def status(self) -> LimiterStatus:
        return LimiterStatus(
            backend="redis" if self._up else "local",
            redis_up=self._up,
            transitions_to_local=self._transitions,
            local_admissions=self._local_admissions,
            redis_errors=self._errors,
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
        """Charge reported usage minus the estimate; dropped if Redis is down meanwhile."""
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
        except _DOWN as exc:
            self._went_down(exc)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self._client.aclose()

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
            except _DOWN:
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
