"""Process settings: command-line flags, else ``ROUTEYARD_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "ROUTEYARD_"


class UpstreamSettings(BaseSettings):
    """The settings of the upstream client (``router.upstream``), which each process reads
    by itself when it makes its first connection pool; ``Settings`` has them too, so
    ``routeyard serve`` refuses a bad value before any worker starts."""

    model_config = SettingsConfigDict(env_prefix="ROUTEYARD_", extra="ignore")

    #: Bounds on one response head from an engine (status line, headers, any interim 1xx
    #: answers before it): past either, the connection is aborted and the request fails
    #: with 502 ``backend_protocol_error`` (Envoy's defaults are 60 KiB and 100).
    upstream_max_header_bytes: int = Field(default=64 * 1024, ge=1)
    upstream_max_headers: int = Field(default=100, ge=1)


class Settings(UpstreamSettings):
    model_config = SettingsConfigDict(env_prefix="ROUTEYARD_", extra="ignore")

    config: str = "routes.yaml"
    host: str = "127.0.0.1"
    #: 0: a free port the kernel picks (``serving on`` names it).
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    #: Any case; ``router.logs`` applies it in the main process and in every worker.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: ``text`` lines or one JSON object per line (``router.logs``).
    log_format: Literal["text", "json"] = "text"
    #: Hard cap on any request body, every route alike (``/v1/files`` included), before
    #: the per-model ``max_body_size``; a declared length over it is refused unread.
    max_request_size: int = 256 * 1024 * 1024
    #: Seconds a request head may go without a byte (Sanic's request timeout).
    request_timeout: float = 60.0
    #: Seconds a whole request head may take from its first byte (``router.listener``).
    request_header_timeout: float = 10.0
    #: Seconds after the head before the body's minimum rate applies.
    request_body_grace: float = 10.0
    #: Bytes per second a request body must average once the grace has passed.
    request_body_min_rate: float = 16 * 1024
    #: Client connections one worker holds at once; 0: derived from ``RLIMIT_NOFILE``
    #: (``router.listener.connection_limit``). Past it a connection gets 503 and is closed.
    max_connections: int = 0
    #: Seconds an idle client keep-alive connection stays open.
    keep_alive_timeout: float = 75.0
    #: Seconds in-flight requests get to finish on shutdown.
    graceful_shutdown: float = 30.0
    #: Watch the routes file and reload on change (SIGHUP always reloads).
    watch: bool = True
    #: Serve Prometheus metrics on ``GET /metrics`` (docs/observability.md).
    metrics: bool = True
    #: One JSON line per proxied request on stderr (docs/observability.md); off by
    #: default: it costs about as much CPU per request as the metrics and tokens together.
    access_log: bool = False
    #: OpenTelemetry tracing: unset means "on when the ``OTEL_*`` variables ask for it"
    #: (``router.tracing.tracing_wanted``); true or false overrides them.
    tracing: bool | None = None
    #: Redis for rate limits that every worker and replica shares
    #: (``router.tenants.limits.build_limiter`` reads it); unset: each process counts alone.
    redis_url: SecretStr | None = None
    #: Prefix of the rate-limit keys in Redis, for routers that share one Redis apart.
    redis_prefix: str = Field(default="routeyard:rl:", min_length=1)
    #: Replaces ``batch.database_url`` of the routes file (``router.config`` reads it), so
    #: a database password can come from a Secret rather than routes.yaml.
    batch_database_url: SecretStr | None = None
    #: ``routeyard batch-worker`` only: serve its Prometheus metrics on this port (on
    #: ``host``); unset: no metrics port. 0: a free port the kernel picks (logged).
    batch_worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: With ``ROUTEYARD_REDIS_URL``: the most Redis connections each worker process opens
    #: for rate limits (``router.tenants.limits_redis``). Read by ``build_limiter``;
    #: declared here so that a bad value stops ``routeyard serve`` at start.
    redis_max_connections: int = Field(default=100, ge=1)
    #: Seconds a request waits for a free one of those connections; then 503
    #: ``rate_limiter_busy`` with ``Retry-After`` (never a fall-back to per-process limits).
    redis_pool_timeout: float = Field(default=1.0, gt=0)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()

def describe(error: ValidationError, flags: dict[str, str] | None = None) -> str:
    """One line naming each refused setting (its variable, and its flag when one was
    given) with its value and what is accepted: what ``routeyard`` prints for it."""
    flags = flags or {}
    parts = []
    for item in error.errors(include_url=False):
        field = str(item["loc"][0]) if item["loc"] else ""
        given = (f"{flags[field]} {item['input']}" if field in flags
                 else f"{PREFIX}{field.upper()}={item['input']!r}")
        parts.append(f"{given}: {item['msg']}")
    return "; ".join(parts)
