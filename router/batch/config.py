"""``BatchConfig``: where files and batch state live, and how batches run.

The lead maps a ``batch:`` block (routes.yaml or settings) onto this model. Durations
accept seconds or strings such as ``500ms``/``30s``/``24h``; sizes accept bytes or
``200MiB``. Secrets may be left out: obstore then reads the provider's standard
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SECONDS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BYTES = {None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
          "gb": 1000**3, "gib": 1024**3}


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 500ms or 24h")
        return float(match[1]) * _SECONDS[match[2]]
    return value


def _size(value: Any) -> Any:
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. 200MiB or 1048576")
        return int(float(match[1]) * _BYTES[(match[2] or "b").lower()])
    return value


Duration = Annotated[float, BeforeValidator(_duration), Field(gt=0)]
Size = Annotated[int, BeforeValidator(_size), Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Strict):
    """Object storage for uploaded and produced files (obstore).

    ``url`` is a local directory (``./batch-files``, ``file:///var/lib/routeyard``) or
    ``s3://bucket/prefix`` (also ``gs://``, ``az://``: obstore's providers). For an
    S3-compatible server (MinIO, Ceph, moto) set ``endpoint``; ``http://`` endpoints
    need ``allow_http: true``. ``options`` passes any further obstore config key.
    """

    url: str = "./routeyard-batch-files"
    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    allow_http: bool = False
    options: dict[str, str] = Field(default_factory=dict)


class BatchConfig(_Strict):
    """Everything the Files and Batch API need; every field has a working default."""

    #: SQLAlchemy URL: ``sqlite+aiosqlite:///path.db`` (one host) or
    #: ``postgresql+asyncpg://user@host/db`` (several replicas).
    database_url: str = "sqlite+aiosqlite:///routeyard-batch.db"
    #: PostgreSQL only: the schema for the tables (created if missing).
    database_schema: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    database_pool_size: int = Field(default=5, ge=1, le=100)
    storage: StorageConfig = StorageConfig()

    #: Batch workers inside each server process (each runs one batch at a time); 0 = none.
    workers: int = Field(default=1, ge=0, le=64)
    #: A worker that stops renewing its claim loses it after this long.
    lease: Duration = 30.0
    #: How often an idle worker looks for work (local creations wake it at once).
    poll_interval: Duration = 1.0
    #: The ``24h`` window; shorter only for tests.
    completion_window: Duration = 86400.0

    #: Per-batch concurrency: AIMD between min and max, starting at initial.
    min_concurrency: int = Field(default=1, ge=1)
    initial_concurrency: int = Field(default=4, ge=1)
    max_concurrency: int = Field(default=32, ge=1, le=4096)
    #: ``Dispatcher.pressure()`` above this holds a batch at ``min_concurrency``.
    pressure_high: float = Field(default=0.8, gt=0, le=1)
    #: Attempts per line for transient failures (429, 5xx, 408).
    max_attempts: int = Field(default=4, ge=1, le=20)
    retry_backoff: Duration = 0.5
    max_retry_backoff: Duration = 30.0

    max_file_bytes: Size = 512 * 1024**2
    max_batch_file_bytes: Size = 200 * 1024**2
    max_line_bytes: Size = 32 * 1024**2
    max_requests: int = Field(default=50_000, ge=1)
    max_embedding_inputs: int = Field(default=50_000, ge=1)
    #: Validation errors kept in a failed batch's ``errors.data`` (the rest are counted).
    max_reported_errors: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _check(self) -> BatchConfig:
        if not self.min_concurrency <= self.initial_concurrency <= self.max_concurrency:
            raise ValueError(
                "need min_concurrency <= initial_concurrency <= max_concurrency; got "
                f"{self.min_concurrency}, {self.initial_concurrency}, {self.max_concurrency}"
            )
        if self.max_batch_file_bytes > self.max_file_bytes:
            raise ValueError("max_batch_file_bytes cannot exceed max_file_bytes")
        if self.poll_interval >= self.lease or self.lease < 1:
            raise ValueError("lease must be at least 1s and longer than poll_interval")
        return self

    def relative_to(self, base: Path) -> BatchConfig:
        """This config with its relative paths (a SQLite database file, a local storage
        directory) taken as relative to ``base`` (the routes file's directory, as for
        ``key_file``)."""
        from sqlalchemy.engine import make_url  # not at import: config loading stays light

        base = base.absolute()
        update: dict[str, Any] = {}
        url = make_url(self.database_url)
        database = url.database
        if (url.get_backend_name() == "sqlite" and database and database != ":memory:"
                and not database.startswith("file:") and not Path(database).is_absolute()):
            update["database_url"] = url.set(database=str(base / database)).render_as_string(
                hide_password=False)
        storage = self.storage.url
        scheme = urlsplit(storage).scheme
        path = storage.removeprefix("file://") if scheme == "file" else storage
        if scheme in ("", "file") and not Path(path).expanduser().is_absolute():
            update["storage"] = self.storage.model_copy(update={"url": str(base / path)})
        return self.model_copy(update=update) if update else self
