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
when ``ROUTEYARD_REDIS_URL`` is set, so limits hold across router replicas. Its pool of
``ROUTEYARD_REDIS_MAX_CONNECTIONS`` connections is waited on for at most
``ROUTEYARD_REDIS_POOL_TIMEOUT`` seconds; a request that gets none in time is refused
(503, ``limits_redis.LimiterBusy``), a Redis that fails is replaced by local limits.

The buckets, ``Admission`` and ``LocalLimiter`` live in ``buckets`` (which both limiters
import) and are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

from router.tenants.buckets import (
    REQUESTS,
    TOKENS,
    WINDOW_MS,
    Admission,
    Bucket,
    LimiterStatus,
    LocalLimiter,
    decide,
    plan,
)
from router.tenants.keys import Tenant

__all__ = [
    "REQUESTS",
    "TOKENS",
    "WINDOW_MS",
    "Admission",
    "Bucket",
    "Limiter",
    "LimiterStatus",
    "LocalLimiter",
    "build_limiter",
    "decide",
    "estimate_tokens",
    "plan",
    "reported_tokens",
]

_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class Limiter(Protocol):
    async def admit(self, tenant: Tenant, model: str, estimated_tokens: int) -> Admission: ...

    async def record(self, admission: Admission, actual_tokens: int | None) -> None: ...

    async def close(self) -> None: ...

    @property
    def status(self) -> LimiterStatus: ...


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
    the Redis keys (default ``routeyard:rl:``); ``ROUTEYARD_REDIS_MAX_CONNECTIONS`` and
    ``ROUTEYARD_REDIS_POOL_TIMEOUT`` size the pool and bound the wait for a connection
    (defaults and checks: ``router.settings.Settings``; a bad value is a ``ValueError``).
    """
    env = os.environ if environ is None else environ
    url = env.get("ROUTEYARD_REDIS_URL")
    if not url:
        return LocalLimiter()
    from router.settings import Settings
    from router.tenants.limits_redis import RedisLimiter

    # Settings() checked these at start (routeyard serve); here they are only read.
    fields = Settings.model_fields
    return RedisLimiter(
        url, prefix=env.get("ROUTEYARD_REDIS_PREFIX", fields["redis_prefix"].default),
        max_connections=int(env.get("ROUTEYARD_REDIS_MAX_CONNECTIONS",
                                    fields["redis_max_connections"].default)),
        pool_timeout=float(env.get("ROUTEYARD_REDIS_POOL_TIMEOUT",
                                   fields["redis_pool_timeout"].default)),
    )
