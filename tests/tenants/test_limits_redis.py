"""Redis limits: exact across two limiter instances, and a fallback that never fails.

The two ``RedisLimiter`` instances have their own connection pools, as two router
processes would; they share the machine's Redis (127.0.0.1:6379) under a unique prefix.
The fallback tests start their own ``redis-server`` so they can stop it. Bursts larger
than the connection pool wait for a connection; a wait that runs out is a 503, never a
fall-back to per-process limits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from router.settings import Settings
from router.tenants import Admission, RateLimited, Tenant, build_limiter
from router.tenants.limits_redis import LimiterBusy, RedisLimiter
from tests.harness import eventually, free_port
from tests.tenants.conftest import SHARED_REDIS, OwnRedis, alice, authenticator

BUSY_LIMITS = {"rpm": 30, "tpm": 10**6}


def tenant(**entry: Any) -> Tenant:
    return authenticator([alice(**entry)]).tenants["alice"]


@pytest.fixture
async def pair(shared_redis: str) -> AsyncIterator[tuple[RedisLimiter, RedisLimiter]]:
    a = RedisLimiter(SHARED_REDIS, prefix=shared_redis)
    b = RedisLimiter(SHARED_REDIS, prefix=shared_redis)
    yield a, b
    await a.close()
    await b.close()


async def admit_concurrently(
    limiters: tuple[RedisLimiter, ...], t: Tenant, model: str, n: int, tokens: int
) -> list[Admission]:
    """``n`` admissions at once, alternating limiters; only 429s may fail."""
    results = await asyncio.gather(
        *(limiters[i % len(limiters)].admit(t, model, tokens) for i in range(n)),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, RateLimited) and e.status == 429 for e in errors), errors[:1]
    return [r for r in results if isinstance(r, Admission)]


# Exactness: the next request would need 60 s / limit of refill; the test takes far less.
async def test_rpm_is_exact_under_200_concurrent_across_two_limiters(
    pair: tuple[RedisLimiter, RedisLimiter],
) -> None:
    start = time.monotonic()
    admitted = await admit_concurrently(pair, tenant(limits={"rpm": 10}), "chat-a", 200, 1)
    assert time.monotonic() - start < 6
    assert len(admitted) == 10
    assert {a.via for a in admitted} == {"redis"}
    assert {a.headers["x-ratelimit-remaining-requests"] for a in admitted} == {
        str(n) for n in range(10)
    }
    assert all(lim.status.redis_up and lim.status.local_admissions == 0 for lim in pair)


async def test_tpm_is_exact_under_200_concurrent_across_two_limiters(
    pair: tuple[RedisLimiter, RedisLimiter],
) -> None:
    t = tenant(limits={"tpm": 1000})
    assert len(await admit_concurrently(pair, t, "chat-a", 200, 100)) == 10


async def test_key_and_model_limits_are_exact_across_two_limiters(
    pair: tuple[RedisLimiter, RedisLimiter],
) -> None:
    t = tenant(limits={"rpm": 16}, model_limits={"chat-*": {"rpm": 6, "tpm": 300}})
    assert len(await admit_concurrently(pair, t, "chat-a", 200, 60)) == 5  # TPM binds
    assert len(await admit_concurrently(pair, t, "chat-b", 200, 1)) == 6  # RPM binds
    assert len(await admit_concurrently(pair, t, "embed-model", 200, 1)) == 5  # key's 16


async def test_429_from_redis_has_retry_after_and_headers(
    pair: tuple[RedisLimiter, RedisLimiter],
) -> None:
    t = tenant(limits={"rpm": 2, "tpm": 1000})
    await pair[0].admit(t, "chat-a", 10)
    await pair[1].admit(t, "chat-a", 10)
    with pytest.raises(RateLimited) as info:
        await pair[0].admit(t, "chat-a", 10)
    headers = info.value.headers
    assert info.value.type == "requests"
    assert 29 <= int(headers["retry-after"]) <= 30
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "980"


async def test_usage_recorded_on_one_replica_limits_the_other(
    pair: tuple[RedisLimiter, RedisLimiter],
) -> None:
    t = tenant(limits={"tpm": 1000})
    admission = await pair[0].admit(t, "chat-a", 100)
    await pair[1].record(admission, 990)
    with pytest.raises(RateLimited):
        await pair[0].admit(t, "chat-a", 20)
    refund = await pair[1].admit(t, "chat-a", 5)
    await pair[0].record(refund, 0)  # charged 5, used 0: 5 back
    assert (await pair[0].admit(t, "chat-a", 1)).headers["x-ratelimit-remaining-tokens"] in (
        "8", "9",
    )


@pytest.mark.parametrize("pool", [{}, {"max_connections": 4}], ids=["default-pool", "pool-of-4"])
async def test_rpm_is_exact_under_200_concurrent_on_one_limiter(
    shared_redis: str, pool: dict[str, int]
) -> None:
    """More admissions at once than the pool has connections (100 by default): they wait
    for one, and none falls back to the per-process limits."""
    limiter = RedisLimiter(SHARED_REDIS, prefix=shared_redis, **pool)
    try:
        start = time.monotonic()
        admitted = await admit_concurrently((limiter,), tenant(limits={"rpm": 30}), "chat-a",
                                            200, 1)
        assert time.monotonic() - start < 2  # 60 s / 30: no refill during the burst
        assert len(admitted) == 30
        assert {a.via for a in admitted} == {"redis"}
        status = limiter.status
        assert status.redis_up and status.transitions_to_local == 0
        assert (status.local_admissions, status.redis_errors, status.pool_timeouts) == (0, 0, 0)
    finally:
        await limiter.close()


async def blocked_clients(prefix: str) -> int:
    """Connections of the shared Redis blocked in our BLPOP (it holds a pool connection)."""
    client = aioredis.Redis.from_url(SHARED_REDIS)
    try:
        return sum(1 for c in await client.client_list() if c.get("cmd") == "blpop")
    finally:
        await client.aclose()


async def test_a_pool_timeout_is_not_redis_down(
    shared_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="routeyard.limits")
    limiter = RedisLimiter(SHARED_REDIS, prefix=shared_redis, max_connections=1,
                           pool_timeout=0.05, retry_interval=0.05)
    t = tenant(limits=BUSY_LIMITS)
    try:
        charged = await limiter.admit(t, "chat-a", 10)
        assert charged.via == "redis"
        # The pool's one connection, held by a command that blocks 0.4 s in Redis.
        hold = asyncio.ensure_future(limiter._client.blpop([shared_redis + "never"], 0.4))
        await eventually(lambda: blocked_clients(shared_redis), 5, "BLPOP holds the connection")

        with pytest.raises(LimiterBusy) as info:
            await limiter.admit(t, "chat-a", 10)
        assert (info.value.status, info.value.code) == (503, "rate_limiter_busy")
        assert info.value.headers == {"retry-after": "1"}
        await limiter.record(charged, 500)  # dropped: no connection, no error, not down

        status = limiter.status
        assert (status.backend, status.redis_up, status.transitions_to_local) == (
            "redis", True, 0)
        assert (status.local_admissions, status.redis_errors, status.pool_timeouts) == (0, 0, 2)
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "no Redis connection free within 0.05s" in caplog.records[0].getMessage()
        assert "failed" not in caplog.records[0].getMessage()

        assert await hold is None
        after = await limiter.admit(t, "chat-a", 10)  # the connection is free again
        assert after.via == "redis"
        assert after.headers["x-ratelimit-remaining-requests"] == "28"  # the 503 took none
    finally:
        await limiter.close()


async def test_a_burst_through_a_pool_that_times_out_never_exceeds_the_limit(
    shared_redis: str,
) -> None:
    """Pool timeouts under a burst: refused (503) or limited (429), but never admitted
    locally, so the key still gets at most its limit."""
    limiter = RedisLimiter(SHARED_REDIS, prefix=shared_redis, max_connections=1,
                           pool_timeout=0.001)
    try:
        results = await asyncio.gather(
            *(limiter.admit(tenant(limits={"rpm": 30}), "chat-a", 1) for _ in range(200)),
            return_exceptions=True)
        admitted = [r for r in results if isinstance(r, Admission)]
        busy = [r for r in results if isinstance(r, LimiterBusy)]
        limited = [r for r in results if isinstance(r, RateLimited)]
        assert len(admitted) + len(busy) + len(limited) == 200
        assert busy and len(admitted) <= 30
        assert {a.via for a in admitted} <= {"redis"}
        status = limiter.status
        assert status.redis_up and status.local_admissions == 0
        assert status.pool_timeouts == len(busy)
    finally:
        await limiter.close()


def test_build_limiter_reads_the_pool_settings() -> None:
    env = {"ROUTEYARD_REDIS_URL": SHARED_REDIS, "ROUTEYARD_REDIS_MAX_CONNECTIONS": "7",
           "ROUTEYARD_REDIS_POOL_TIMEOUT": "0.25"}
    limiter = build_limiter(env)
    assert isinstance(limiter, RedisLimiter)
    assert (limiter.max_connections, limiter.pool_timeout) == (7, 0.25)
    default = build_limiter({"ROUTEYARD_REDIS_URL": SHARED_REDIS})
    assert isinstance(default, RedisLimiter)
    assert (default.max_connections, default.pool_timeout) == (100, 1.0)
    for name, value in (("ROUTEYARD_REDIS_MAX_CONNECTIONS", "0"),
                        ("ROUTEYARD_REDIS_MAX_CONNECTIONS", "many"),
                        ("ROUTEYARD_REDIS_POOL_TIMEOUT", "0")):
        with pytest.raises(ValueError):
            build_limiter({"ROUTEYARD_REDIS_URL": SHARED_REDIS, name: value})


@pytest.mark.parametrize("name, value", [("ROUTEYARD_REDIS_MAX_CONNECTIONS", "0"),
                                         ("ROUTEYARD_REDIS_POOL_TIMEOUT", "-1")])
def test_bad_pool_settings_stop_the_router_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


async def test_redis_stopping_mid_test_falls_back_then_recovers(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="routeyard.limits")
    limiter = RedisLimiter(own_redis.url, prefix="t:", retry_interval=0.2, timeout=0.5)
    t = tenant(limits={"rpm": 1000, "tpm": 10**6})
    try:
        assert (await limiter.admit(t, "chat-a", 10)).via == "redis"

        own_redis.kill()
        during = await admit_concurrently((limiter,), t, "chat-a", 50, 10)
        assert len(during) == 50 and {a.via for a in during} == {"local"}
        for admission in during[:5]:
            await limiter.record(admission, 20)
        status = limiter.status
        assert (status.backend, status.redis_up, status.transitions_to_local) == (
            "local", False, 1,
        )
        assert status.local_admissions == 50
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and own_redis.url in warnings[0].getMessage()

        own_redis.start()
        await eventually(lambda: limiter.status.redis_up, 5, "the limiter returns to Redis")
        after = await limiter.admit(t, "chat-a", 10)
        assert after.via == "redis"
        client = aioredis.Redis.from_url(own_redis.url)
        assert await client.exists("t:{alice}:r") == 1
        await client.aclose()
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert len(infos) == 1 and "answers again" in infos[0]
        assert limiter.status.transitions_to_local == 1
    finally:
        await limiter.close()


async def test_admission_made_before_an_outage_records_without_error(
    own_redis: OwnRedis,
) -> None:
    limiter = RedisLimiter(own_redis.url, prefix="t:", retry_interval=60)
    t = tenant(limits={"tpm": 1000})
    try:
        admission = await limiter.admit(t, "chat-a", 10)
        own_redis.kill()
        await limiter.record(admission, 500)  # Redis gone: dropped, not raised
        assert limiter.status.backend == "local"
        assert (await limiter.admit(t, "chat-a", 10)).via == "local"
    finally:
        await limiter.close()


async def test_redis_never_reached_serves_locally_from_the_start() -> None:
    limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", retry_interval=60)
    try:
        admission = await limiter.admit(tenant(limits={"rpm": 1}), "chat-a", 1)
        assert admission.via == "local"
        with pytest.raises(RateLimited):
            await limiter.admit(tenant(limits={"rpm": 1}), "chat-a", 1)
    finally:
        await limiter.close()
