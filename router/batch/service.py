"""``BatchService``: the Files and Batch API's operations, and the process's workers.

Made at import without I/O; ``start()`` opens the database (running migrations), the
object store and ``config.workers`` workers; ``close()`` drains and closes them. The
HTTP layer (``api.register``) calls the methods below with the caller's tenant; a new
batch also records the caller's API key (``key_of``), whose rules its lines run under.
For the metrics: ``lines`` (what this process's workers run) and ``gauges`` (the whole
database's batches, read at most once per ``GAUGES_TTL``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson

from router.batch.config import BatchConfig
from router.batch.db import MetaStore, create_engine, migrate
from router.batch.dispatch import Dispatcher
from router.batch.errors import BatchNotFound, Conflict, FileNotFound, InvalidBatch
from router.batch.jobs import Context, LineCounts
from router.batch.models import (
    BATCH_ENDPOINTS,
    UNSERVED_ENDPOINTS,
    batch_object,
    file_object,
    new_id,
    page,
)
from router.batch.objects import Objects, open_store
from router.batch.pool import WorkerPool
from router.errors import BadRequest


def _tenant(tenant: str | None) -> str:
    return tenant or ""


def _limit(value: Any, default: int, maximum: int, name: str) -> int:
    if value is None:
        return default
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be an integer from 1 to {maximum}.", param=name) from None
    if not 1 <= limit <= maximum:
        raise BadRequest(f"{name} must be from 1 to {maximum}; got {limit}.", param=name)
    return limit


log = logging.getLogger("routeyard.batch")

#: Seconds the batch gauges of the metrics are reused before the database is asked again.
GAUGES_TTL = 5.0

#: Settings read once at start (storage, database, workers).
RESTART_SETTINGS = ("database_url", "database_schema", "database_pool_size", "storage",
                    "workers")


class BatchService:
    def __init__(self, config: BatchConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or BatchConfig()
        self.clock = clock
        self._db: MetaStore | None = None
        self._objects: Objects | None = None
        self._dispatcher: Dispatcher | None = None
        self.pool: WorkerPool | None = None
        self._gauges: tuple[float, tuple[dict[str, int], float]] | None = None

    # lifecycle -----------------------------------------------------------------------

    async def start(self, dispatcher: Dispatcher | None = None, *,
                    workers: int | None = None) -> None:
        """Open storage and migrate; start workers if a dispatcher is given."""
        engine = create_engine(self.config)
        await migrate(engine, self.config.database_schema)
        self._db = MetaStore(engine)
        self._objects = Objects(open_store(self.config.storage))
        self._dispatcher = dispatcher
        count = self.config.workers if workers is None else workers
        if dispatcher is not None and count > 0:
            ctx = Context(self.db, self.objects, dispatcher, self.config, self.clock)
            self.pool = WorkerPool(ctx, count)
            self.pool.start()

    def reconfigure(self, config: BatchConfig | None) -> list[str]:
        """A reload's ``batch:`` block. Limits and timings apply at once (new uploads, and
        batches that start from now on); the database, the storage and the number of
        workers are fixed at start: a change to them is logged and takes effect at the
        next restart, as does adding or removing the block. Returns those settings."""
        fixed = [name for name in RESTART_SETTINGS
                 if config is None or getattr(config, name) != getattr(self.config, name)]
        if config is None:
            log.warning("batch: removed from the routes file; the Files and Batch API keep "
                        "running until the next restart")
            return fixed
        if fixed:
            log.warning("batch: %s changed; takes effect at the next restart",
                        ", ".join(fixed))
        live = config.model_copy(update={n: getattr(self.config, n) for n in RESTART_SETTINGS})
        if live != self.config:
            self.config = live
            if self.pool is not None:
                self.pool.ctx.config = live
        return fixed

    async def close(self, grace: float = 30.0) -> None:
        """Stop claiming, let running lines end (up to ``grace`` s), close the pools."""
        if self.pool is not None:
            await self.pool.stop(grace)
            self.pool = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def lines(self) -> LineCounts | None:
        """The line counts of this process's workers; None when it runs none."""
        return self.pool.ctx.lines if self.pool is not None else None

    async def gauges(self) -> tuple[dict[str, int], float]:
        """Batches by status, and the age (seconds) of the oldest unfinished batch that no
        worker holds (0 when none waits): two indexed queries, reused for ``GAUGES_TTL``."""
        now = time.monotonic()
        cached = self._gauges
        if cached is not None and now - cached[0] < GAUGES_TTL:
            return cached[1]
        clock = self.clock()
        counts, oldest = await self.db.batch_gauges(clock)
        figures = counts, (max(0.0, clock - oldest) if oldest is not None else 0.0)
        self._gauges = (now, figures)
        return figures

    @property
    def db(self) -> MetaStore:
        if self._db is None:
            raise RuntimeError("BatchService.start() has not run (call it at server start)")
        return self._db

    @property
    def objects(self) -> Objects:
        if self._objects is None:
            raise RuntimeError("BatchService.start() has not run (call it at server start)")
        return self._objects

    def now(self) -> int:
        return int(self.clock())

    def key_of(self, headers: Mapping[str, str]) -> str | None:
        """The API key a request presents, as the routing core names it (None without a
        dispatcher, or when the core has no authentication)."""
        return None if self._dispatcher is None else self._dispatcher.key_of(headers)

    # files -------------------------------------------------------------------------

    async def add_file(self, tenant: str | None, values: dict[str, Any]) -> dict[str, Any]:
        """Register an uploaded object (see ``upload.receive``)."""
        await self.db.insert_file({**values, "tenant": _tenant(tenant)})
        return await self.get_file(tenant, values["id"])

    async def get_file(self, tenant: str | None, file_id: str) -> dict[str, Any]:
        row = await self.db.get_file(_tenant(tenant), file_id, self.now())
        if row is None:
            raise FileNotFound(file_id)
        return file_object(row)

    async def list_files(self, tenant: str | None, purpose: str | None = None,
                         limit: Any = None, order: str | None = None,
                         after: str | None = None) -> dict[str, Any]:
        count = _limit(limit, 10_000, 10_000, "limit")
        if order not in (None, "asc", "desc"):
            raise BadRequest(f"order must be asc or desc; got {order!r}.", param="order")
        found = await self.db.list_files(_tenant(tenant), purpose, count, order != "asc",
                                         after, self.now())
        if found is None:
            raise BadRequest(f"after={after!r} names no file of yours.", param="after")
        rows, more = found
        return page([file_object(r) for r in rows], more)

    async def file_content(self, tenant: str | None,
                           file_id: str) -> tuple[int, AsyncIterator[bytes]]:
        """The file's size and its bytes as a stream of chunks."""
        row = await self.db.get_file(_tenant(tenant), file_id, self.now())
        if row is None:
            raise FileNotFound(file_id)
        return row.bytes, self.objects.read(row.object_key)

    async def delete_file(self, tenant: str | None, file_id: str) -> dict[str, Any]:
        row = await self.db.delete_file(_tenant(tenant), file_id)
        if row is None:
            raise FileNotFound(file_id)
        await self.objects.delete(row.object_key)
        return {"id": file_id, "object": "file", "deleted": True}

    async def purge_expired_files(self) -> int:
        keys = await self.db.take_expired_files(self.now())
        for key in keys:
            await self.objects.delete(key)
        return len(keys)

    # batches -----------------------------------------------------------------------

    async def create_batch(self, tenant: str | None, params: Any,
                           key: str | None = None) -> dict[str, Any]:
        """A new batch of ``tenant``'s, created with API key ``key`` (its lines run with
        that key's models and limits)."""
        if not isinstance(params, dict):
            raise InvalidBatch("The body must be a JSON object.")
        input_file_id = params.get("input_file_id")
        endpoint = params.get("endpoint")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise InvalidBatch("input_file_id is required.", param="input_file_id")
        if endpoint not in BATCH_ENDPOINTS:
            served = ", ".join(BATCH_ENDPOINTS)
            why = " (no vLLM engine serves it)" if endpoint in UNSERVED_ENDPOINTS else ""
            raise InvalidBatch(f"endpoint {endpoint!r} is not supported{why}; use one of "
                               f"{served}.", param="endpoint")
        if params.get("completion_window") != "24h":
            raise InvalidBatch("completion_window must be \"24h\".", param="completion_window")
        metadata = _metadata(params.get("metadata"))
        expires_after = _output_expiry(params.get("output_expires_after"))
        file = await self.db.get_file(_tenant(tenant), input_file_id, self.now())
        if file is None:
            raise FileNotFound(input_file_id)
        if file.purpose != "batch":
            raise InvalidBatch(f"File {input_file_id} has purpose {file.purpose!r}; upload the "
                               "input with purpose=batch.", param="input_file_id")
        now = self.now()
        batch_id = new_id("batch_")
        row = await self.db.insert_batch({
            "id": batch_id, "tenant": _tenant(tenant), "key_id": key, "endpoint": endpoint,
            "input_file_id": input_file_id, "completion_window": "24h", "status": "validating",
            "created_at": now, "expires_at": int(now + self.config.completion_window),
            "metadata": None if metadata is None else orjson.dumps(metadata).decode(),
            "output_expires_after": expires_after, "total": 0, "completed": 0, "failed": 0,
            "input_tokens": 0, "cached_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0,
            "total_tokens": 0, "lease_epoch": 0,
        })
        created = batch_object(row)
        log.info("batch %s: validating (created for %s, %s, input %s)", batch_id, endpoint,
                 f"key {key}" if key else "no key", input_file_id)
        if self.pool is not None:
            self.pool.wake()
        return created

    async def get_batch(self, tenant: str | None, batch_id: str) -> dict[str, Any]:
        row = await self.db.get_batch(batch_id, _tenant(tenant))
        if row is None:
            raise BatchNotFound(batch_id)
        return batch_object(row)

    async def list_batches(self, tenant: str | None, after: str | None = None,
                           limit: Any = None) -> dict[str, Any]:
        count = _limit(limit, 20, 100, "limit")
        found = await self.db.list_batches(_tenant(tenant), count, after)
        if found is None:
            raise BadRequest(f"after={after!r} names no batch of yours.", param="after")
        rows, more = found
        return page([batch_object(r) for r in rows], more)

    async def active_batches(self, limit: int) -> list[dict[str, Any]]:
        """Batches of every tenant still running, oldest first, at most ``limit``: id,
        tenant, status, endpoint, model, ``request_counts`` and ``created_at``."""
        rows = await self.db.active_batches(limit)
        return [{"id": r.id, "tenant": r.tenant, "status": r.status, "endpoint": r.endpoint,
                 "model": r.model, "created_at": r.created_at,
                 "request_counts": {"total": r.total, "completed": r.completed,
                                    "failed": r.failed}} for r in rows]

    async def cancel_batch(self, tenant: str | None, batch_id: str) -> dict[str, Any]:
        """validating/in_progress → cancelling (a worker then ends it as cancelled)."""
        if not await self.db.request_cancel(_tenant(tenant), batch_id, self.now()):
            current = await self.get_batch(tenant, batch_id)
            if current["status"] not in ("cancelling", "cancelled"):
                raise Conflict(f"Batch {batch_id} is {current['status']} and can no longer "
                               "be cancelled.", param="batch_id")
            return current
        if self.pool is not None:
            self.pool.wake()
        cancelling = await self.get_batch(tenant, batch_id)
        counts = cancelling["request_counts"]
        log.info("batch %s: cancelling (requested; %d completed, %d failed of %d)", batch_id,
                 counts["completed"], counts["failed"], counts["total"])
        return cancelling


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()):
        raise InvalidBatch("metadata must be at most 16 string pairs (keys up to 64 "
                           "characters, values up to 512).", param="metadata")
    return value


def _output_expiry(value: Any) -> int | None:
    if value is None:
        return None
    seconds = value.get("seconds") if isinstance(value, dict) else None
    if (not isinstance(value, dict) or value.get("anchor") != "created_at"
            or not isinstance(seconds, int) or not 3600 <= seconds <= 2_592_000):
        raise InvalidBatch('output_expires_after must be {"anchor": "created_at", "seconds": '
                           "3600..2592000}.", param="output_expires_after")
    return seconds
