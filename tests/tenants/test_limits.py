"""The in-process limiter: RPM, TPM, per key-and-model, corrections, headers, estimates."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from router.tenants import (
    LocalLimiter,
    RateLimited,
    Tenant,
    build_limiter,
    estimate_tokens,
    reported_tokens,
)
from router.tenants.buckets import _duration
from router.tenants.limits_redis import RedisLimiter
from tests.harness import start_router
from tests.tenants.conftest import alice, authenticator


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tenant(**entry: Any) -> Tenant:
    return authenticator([alice(**entry)]).tenants["alice"]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> LocalLimiter:
    return LocalLimiter(clock)


async def admitted(limiter: LocalLimiter, t: Tenant, model: str, n: int, tokens: int = 1) -> int:
    results = await asyncio.gather(
        *(limiter.admit(t, model, tokens) for _ in range(n)), return_exceptions=True
    )
    assert all(isinstance(r, RateLimited) for r in results if isinstance(r, BaseException))
    return sum(not isinstance(r, BaseException) for r in results)


async def test_key_without_limits_is_always_admitted(limiter: LocalLimiter) -> None:
    admission = await limiter.admit(tenant(), "chat-a", 10**9)
    assert admission.via == "none" and admission.headers == {}
    await limiter.record(admission, 10**9)


async def test_rpm_admits_exactly_the_limit_under_200_concurrent(limiter: LocalLimiter) -> None:
    assert await admitted(limiter, tenant(limits={"rpm": 37}), "chat-a", 200) == 37


async def test_429_carries_retry_after_and_ratelimit_headers(
    limiter: LocalLimiter, clock: Clock
) -> None:
    t = tenant(limits={"rpm": 3})
    first = await limiter.admit(t, "chat-a", 0)
    assert first.headers == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "20s",
    }
    await limiter.admit(t, "chat-a", 0)
    clock.now += 5
    await limiter.admit(t, "chat-a", 0)
    with pytest.raises(RateLimited) as info:
        await limiter.admit(t, "chat-a", 0)
    error = info.value
    assert error.status == 429
    assert error.to_envelope()["error"] == {
        "message": "Rate limit reached for key `alice` on requests per minute (RPM): Limit 3, "
        "Used 3, Requested 1. Please try again in 15s.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert error.headers["retry-after"] == "15"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-reset-requests"] == "55s"


async def test_requests_refill_continuously(limiter: LocalLimiter, clock: Clock) -> None:
    t = tenant(limits={"rpm": 6})
    assert await admitted(limiter, t, "chat-a", 10) == 6
    clock.now += 9.9
    assert await admitted(limiter, t, "chat-a", 1) == 0
    clock.now += 0.1
    assert await admitted(limiter, t, "chat-a", 10) == 1
    clock.now += 3600
    assert await admitted(limiter, t, "chat-a", 10) == 6


async def test_tpm_charges_the_estimate_up_front(limiter: LocalLimiter) -> None:
    t = tenant(limits={"tpm": 1000})
    assert await admitted(limiter, t, "chat-a", 200, tokens=30) == 33
    with pytest.raises(RateLimited) as info:
        await limiter.admit(t, "chat-a", 30)
    assert info.value.type == "tokens"
    assert info.value.headers["x-ratelimit-remaining-tokens"] == "10"
    assert info.value.headers["retry-after"] == "2"  # 20 tokens at 1000/min


async def test_record_refunds_an_overestimate(limiter: LocalLimiter) -> None:
    t = tenant(limits={"tpm": 100})
    admission = await limiter.admit(t, "chat-a", 90)
    await limiter.record(admission, 10)
    second = await limiter.admit(t, "chat-a", 80)
    assert second.headers["x-ratelimit-remaining-tokens"] == "10"


async def test_reported_usage_beyond_the_estimate_puts_the_key_in_debt(
    limiter: LocalLimiter, clock: Clock
) -> None:
    t = tenant(limits={"tpm": 600})
    admission = await limiter.admit(t, "chat-a", 100)
    await limiter.record(admission, 1100)  # level 600 - 1100 = -500
    with pytest.raises(RateLimited) as info:
        await limiter.admit(t, "chat-a", 1)
    assert info.value.headers["retry-after"] == "51"  # 501 tokens at 10/s
    clock.now += 51
    await limiter.admit(t, "chat-a", 1)


async def test_record_without_usage_keeps_the_estimate(limiter: LocalLimiter) -> None:
    t = tenant(limits={"tpm": 100})
    admission = await limiter.admit(t, "chat-a", 60)
    await limiter.record(admission, None)
    with pytest.raises(RateLimited):
        await limiter.admit(t, "chat-a", 60)


async def test_estimate_larger_than_the_bucket_waits_for_a_full_bucket(
    limiter: LocalLimiter,
) -> None:
    t = tenant(limits={"tpm": 100})
    admission = await limiter.admit(t, "chat-a", 5000)
    assert admission.charges[0][1] == 100
    with pytest.raises(RateLimited):
        await limiter.admit(t, "chat-a", 0)  # even an estimate of 0 costs 1 token


async def test_key_and_model_limits_count_each_model_separately(limiter: LocalLimiter) -> None:
    t = tenant(limits={"rpm": 10}, model_limits={"chat-*": {"rpm": 2}})
    assert await admitted(limiter, t, "chat-a", 5) == 2
    assert await admitted(limiter, t, "chat-b", 5) == 2
    with pytest.raises(RateLimited, match="key `alice` and model `chat-a`"):
        await limiter.admit(t, "chat-a", 0)
    assert await admitted(limiter, t, "embed-model", 20) == 6  # the key's 10 in total


async def test_a_rejected_request_charges_no_bucket(limiter: LocalLimiter) -> None:
    t = tenant(limits={"rpm": 3}, model_limits={"chat-a": {"rpm": 1}})
    assert await admitted(limiter, t, "chat-a", 10) == 1
    assert await admitted(limiter, t, "chat-b", 10) == 2


async def test_a_reloaded_limit_applies_to_what_was_used(limiter: LocalLimiter) -> None:
    assert await admitted(limiter, tenant(limits={"rpm": 5}), "chat-a", 3) == 3
    assert await admitted(limiter, tenant(limits={"rpm": 4}), "chat-a", 3) == 1
    assert await admitted(limiter, tenant(limits={"rpm": 10}), "chat-a", 10) == 6


def test_estimate_tokens() -> None:
    assert estimate_tokens(400) == 100
    assert estimate_tokens(400, {"max_tokens": 50}) == 150
    assert estimate_tokens(0, {"max_completion_tokens": 20, "n": 3}) == 60
    assert estimate_tokens(8, {"max_output_tokens": 7}) == 9
    assert estimate_tokens(8, {"max_tokens": True, "n": "2"}) == 2


@pytest.mark.parametrize(
    ("payload", "tokens"),
    [
        ({"usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}, 12),
        ({"usage": {"prompt_tokens": 5}}, 5),
        ({"usage": {"input_tokens": 3, "output_tokens": 4}}, 7),
        ({"type": "response.completed", "response": {"usage": {"total_tokens": 9}}}, 9),
        ({"usage": None}, None),
        ({"choices": []}, None),
    ],
)
def test_reported_tokens(payload: dict[str, Any], tokens: int | None) -> None:
    assert reported_tokens(payload) == tokens


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0ms"), (20.2, "21ms"), (1500, "1.5s"), (60_000, "1m0s"), (90_500, "1m30.5s")],
)
def test_reset_durations_use_openai_format(ms: float, text: str) -> None:
    assert _duration(ms) == text


async def test_build_limiter_picks_redis_only_when_configured() -> None:
    assert isinstance(build_limiter({}), LocalLimiter)
    limiter = build_limiter({"ROUTEYARD_REDIS_URL": "redis://:secret@127.0.0.1:1/0"})
    assert isinstance(limiter, RedisLimiter)
    assert "secret" not in limiter.url
    await limiter.close()


@pytest.mark.parametrize(("workers", "redis", "warned"), [
    (2, False, True), (1, False, False), (2, True, False)])
def test_serve_warns_when_limits_are_per_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, redis: bool,
        warned: bool) -> None:
    """``--workers N`` without Redis keeps limits per worker: the log says so at start."""
    monkeypatch.setenv("RY_TEST_LIMITED_KEY", "k" * 40)
    if redis:
        monkeypatch.setenv("ROUTEYARD_REDIS_URL", "redis://127.0.0.1:6379/0")
    else:
        monkeypatch.delenv("ROUTEYARD_REDIS_URL", raising=False)
    text = ("models:\n  m:\n    backends:\n      - url: http://127.0.0.1:9\n"
            "    endpoints: [chat]\n"
            "auth:\n  keys:\n    - id: limited\n      key_env: RY_TEST_LIMITED_KEY\n"
            "      models: ['*']\n      limits: {rpm: 60}\n")
    # No admin key in this config, so readiness cannot ask each worker; the warning is
    # the manager's, logged before any worker starts.
    router = start_router(tmp_path, text, workers=workers, every_worker=False)
    router.stop()
    log = router.log_text()
    assert ("kept per worker" in log) is warned, log[-2000:]
    if warned:
        assert "limited" in log and "2x its rpm/tpm" in log
