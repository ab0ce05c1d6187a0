"""Redis limits: exact across two limiter instances, and a fallback that never fails.

The two ``RedisLimiter`` instances have their own connection pools, as two router
processes would; they share the machine's Redis (127.0.0.1:6379) under a unique prefix.
The fallback tests start their own ``redis-server`` so they can stop it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from router.tenants import Admission, RateLimited, Tenant
from router.tenants.limits_redis import RedisLimiter
from tests.harness import eventually, free_port
from tests.tenants.conftest import SHARED_REDIS, OwnRedis, alice, authenticator


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
