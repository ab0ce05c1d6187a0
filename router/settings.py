"""Process settings: command-line flags, else ``ROUTEYARD_*`` environment variables."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROUTEYARD_", extra="ignore")

    config: str = "routes.yaml"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    log_level: str = "INFO"
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
