"""Token buckets: the bucket math, admissions, and the in-process ``LocalLimiter``.

Shared by both limiters: ``limits_redis.RedisLimiter`` runs the same math in Redis and
falls back to ``LocalLimiter``; ``limits`` picks one (``build_limiter``). See ``limits``
for the algorithm.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from router.tenants.errors import RateLimited
from router.tenants.keys import Tenant

WINDOW_MS = 60_000
REQUESTS, TOKENS = "requests", "tokens"


@dataclass(frozen=True, slots=True)
class Bucket:
    """One counter. ``name`` is unique per key (and model) and kind; Redis keys use it."""

    name: str
    kind: str
    capacity: int
    scope: str

    @property
    def rate(self) -> float:
        """Refill per millisecond."""
        return self.capacity / WINDOW_MS

    def cost(self, estimated_tokens: int) -> int:
        if self.kind == REQUESTS:
            return 1
        return max(1, min(estimated_tokens, self.capacity))


def plan(tenant: Tenant, model: str) -> tuple[Bucket, ...]:
    """The buckets a request of ``tenant`` for ``model`` must pass, key-wide first."""
    # The {key id} hash tag keeps one key's buckets in one Redis Cluster slot.
    tag = "{" + tenant.key_id + "}"
    buckets = []
    per_model = tenant.limits_for(model)
    for limits, name, scope in (
        (tenant.limits, tag, f"key `{tenant.key_id}`"),
        (per_model, f"{tag}:m:{model}", f"key `{tenant.key_id}` and model `{model}`"),
    ):
        if limits is None:
            continue
        if limits.rpm:
            buckets.append(Bucket(f"{name}:r", REQUESTS, limits.rpm, scope))
        if limits.tpm:
            buckets.append(Bucket(f"{name}:t", TOKENS, limits.tpm, scope))
    return tuple(buckets)


@dataclass(slots=True)
class Admission:
    """An admitted request: what to correct once its usage is known, and headers to send."""

    key_id: str
    model: str
    estimated_tokens: int
    #: Token buckets and what each was charged up front.
    charges: tuple[tuple[Bucket, int], ...] = ()
    #: ``redis``, ``local`` (in-process, by choice or as fallback) or ``none`` (no limits).
    via: str = "none"
    #: ``x-ratelimit-*`` headers for the response, as OpenAI sends them.
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LimiterStatus:
    """For metrics: where limits are decided now, and how often Redis was missing."""

    backend: str
    redis_up: bool | None
    transitions_to_local: int = 0
    local_admissions: int = 0
    redis_errors: int = 0
    #: Redis calls that found no free pooled connection in time (503s, dropped corrections).
    pool_timeouts: int = 0


def decide(
    tenant: Tenant,
    model: str,
    estimated: int,
    buckets: tuple[Bucket, ...],
    levels: list[float],
    wait_ms: float,
    worst: Bucket | None,
    via: str,
) -> Admission:
    """An ``Admission`` from bucket levels (after charging), or the 429 if ``worst`` is set."""
    headers = _headers(buckets, levels)
    if worst is not None:
        level = levels[buckets.index(worst)]
        unit = "requests per minute (RPM)" if worst.kind == REQUESTS else "tokens per min (TPM)"
        retry = max(1, math.ceil(wait_ms / 1000))
        headers["retry-after"] = str(retry)
        raise RateLimited(
            f"Rate limit reached for {worst.scope} on {unit}: Limit {worst.capacity}, "
            f"Used {worst.capacity - max(0, math.floor(level))}, "
            f"Requested {worst.cost(estimated)}. Please try again in {_duration(wait_ms)}.",
            worst.kind,
            headers,
        )
    charges = tuple((b, b.cost(estimated)) for b in buckets if b.kind == TOKENS)
    return Admission(tenant.key_id, model, estimated, charges, via, headers)


def _headers(buckets: tuple[Bucket, ...], levels: list[float]) -> dict[str, str]:
    headers = {}
    for kind in (REQUESTS, TOKENS):
        pairs = [(b, lv) for b, lv in zip(buckets, levels, strict=True) if b.kind == kind]
        if pairs:
            bucket, level = min(pairs, key=lambda p: p[1] / p[0].capacity)
            headers[f"x-ratelimit-limit-{kind}"] = str(bucket.capacity)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(level)))
            reset = (bucket.capacity - level) / bucket.rate
            headers[f"x-ratelimit-reset-{kind}"] = _duration(reset)
    return headers


def _duration(ms: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    ms = max(0, math.ceil(ms))
    if ms < 1000:
        return f"{ms}ms"
    minutes, seconds = divmod(ms / 1000, 60)
    seconds = round(seconds, 3)
    return f"{int(minutes)}m{seconds:g}s" if minutes else f"{seconds:g}s"


class LocalLimiter:
    """Buckets in this process's memory. Exact for one process; the default."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # name → (used, at, empty at). Storing the amount used, not the amount left, makes
        # a reloaded limit apply at once: remaining = new capacity - used.
        self._state: dict[str, tuple[float, float, float]] = {}
        self._next_prune = 0.0

    @property
    def status(self) -> LimiterStatus:
        return LimiterStatus(backend="local", redis_up=None)

    async def admit(self, tenant: Tenant, model: str, estimated_tokens: int) -> Admission:
        return self.admit_now(tenant, model, estimated_tokens)

    async def record(self, admission: Admission, actual_tokens: int | None) -> None:
        self.record_now(admission, actual_tokens)

    async def close(self) -> None:
        self._state.clear()

    def admit_now(self, tenant: Tenant, model: str, estimated_tokens: int) -> Admission:
        buckets = plan(tenant, model)
        if not buckets:
            return Admission(tenant.key_id, model, estimated_tokens)
        now = self._clock() * 1000
        self._prune(now)
        levels = [self._level(b, now) for b in buckets]
        wait, worst = 0.0, None
        for bucket, level in zip(buckets, levels, strict=True):
            cost = bucket.cost(estimated_tokens)
            if level < cost and (cost - level) / bucket.rate > wait:
                wait, worst = (cost - level) / bucket.rate, bucket
        if worst is None:
            for i, bucket in enumerate(buckets):
                levels[i] -= bucket.cost(estimated_tokens)
                self._store(bucket, levels[i], now)
        return decide(tenant, model, estimated_tokens, buckets, levels, wait, worst, "local")

    def record_now(self, admission: Admission, actual_tokens: int | None) -> None:
        if actual_tokens is None or admission.via != "local":
            return
        now = self._clock() * 1000
        for bucket, charged in admission.charges:
            level = min(bucket.capacity, self._level(bucket, now) - (actual_tokens - charged))
            self._store(bucket, level, now)

    def _level(self, bucket: Bucket, now: float) -> float:
        state = self._state.get(bucket.name)
        if state is None:
            return float(bucket.capacity)
        used, at, _ = state
        return bucket.capacity - max(0.0, used - max(0.0, now - at) * bucket.rate)

    def _store(self, bucket: Bucket, level: float, now: float) -> None:
        used = bucket.capacity - level
        self._state[bucket.name] = (used, now, now + used / bucket.rate)

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled (a full bucket is the same as none)."""
        if now < self._next_prune:
            return
        self._next_prune = now + WINDOW_MS
        self._state = {k: s for k, s in self._state.items() if s[2] > now}
