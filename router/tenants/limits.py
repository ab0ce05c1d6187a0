"""Rate limits per key and per key-and-model: requests and tokens per minute.

Algorithm: a token bucket per counter (GCRA-equivalent). A bucket holds up to ``capacity``
(the per-minute limit) and refills continuously at ``capacity / 60 s``. A request is
admitted only if every bucket it touches (key RPM, key TPM, key-and-model RPM and TPM)
has enough, and then all are charged at once. Chosen over a fixed window, which lets
twice the limit through around a window boundary, and over a sliding log, which stores
every request: a bucket is two numbers, gives an exact ``Retry-After``, and takes the
after-the-fact usage correction (charge more, refund, or run into debt) as plain
arithmetic. Buckets store the amount used (and when), not the amount left, so a
reloaded limit applies at once: left = new limit - used.

Tokens: ``admit`` charges an estimate up front (``estimate_tokens``: body bytes / 4 plus
the requested output tokens, at least 1, at most the bucket); ``record`` charges the
difference once the response reports its usage. A key whose usage exceeds the estimate
goes into debt and waits until the bucket refills past zero.

``LocalLimiter`` is exact within one process (the event loop runs each admission without
an ``await`` in between). ``build_limiter`` returns the Redis limiter (``limits_redis``)
when ``ROUTEYARD_REDIS_URL`` is set, so limits hold across router replicas.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.tenants.errors import RateLimited
from router.tenants.keys import Tenant

WINDOW_MS = 60_000
REQUESTS, TOKENS = "requests", "tokens"
_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


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


class Limiter(Protocol):
    async def admit(self, tenant: Tenant, model: str, estimated_tokens: int) -> Admission: ...

    async def record(self, admission: Admission, actual_tokens: int | None) -> None: ...

    async def close(self) -> None: ...

    @property
    def status(self) -> LimiterStatus: ...


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


def estimate_tokens(body_size: int, data: Mapping[str, Any] | None = None) -> int:
    """Tokens to charge up front: ~4 bytes of JSON per token, plus the output asked for.

    ``data`` is the parsed JSON body (``max_tokens``, ``max_completion_tokens`` or
    ``max_output_tokens``, times ``n``). Pass ``body_size=0`` for multipart (audio) bodies.
    The estimate only decides admission; ``record`` replaces it with reported usage.
    """
    output = 0
    if data:
        for name in _OUTPUT_FIELDS:
            value = data.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                output = value
                break
        n = data.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            output *= n
    return body_size // 4 + output


def reported_tokens(payload: Mapping[str, Any]) -> int | None:
    """Total tokens from a response body or final stream event's ``usage``, if present.

    Understands ``total_tokens``, ``prompt_tokens + completion_tokens`` (chat,
    completions, embeddings) and ``input_tokens + output_tokens`` (responses, messages),
    and the Responses API's ``{"response": {"usage": ...}}`` stream events.
    """
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        inner = payload.get("response")
        return reported_tokens(inner) if isinstance(inner, dict) else None
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    for first, second in (("prompt_tokens", "completion_tokens"),
                          ("input_tokens", "output_tokens")):
        a, b = usage.get(first), usage.get(second)
        if isinstance(a, int) or isinstance(b, int):
            return (a if isinstance(a, int) else 0) + (b if isinstance(b, int) else 0)
    return None


def build_limiter(environ: Mapping[str, str] | None = None) -> Limiter:
    """The Redis limiter if ``ROUTEYARD_REDIS_URL`` is set, else the in-process one.

    Makes no connection (call it in a startup hook); ``ROUTEYARD_REDIS_PREFIX`` namespaces
    the Redis keys (default ``routeyard:rl:``).
    """
    env = os.environ if environ is None else environ
    url = env.get("ROUTEYARD_REDIS_URL")
    if not url:
        return LocalLimiter()
    from router.tenants.limits_redis import RedisLimiter

    return RedisLimiter(url, prefix=env.get("ROUTEYARD_REDIS_PREFIX", "routeyard:rl:"))
