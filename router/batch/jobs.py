"""One claimed batch, moved along its state machine by the worker holding the lease.

    validating ─► failed | in_progress ─► finalizing ─► completed
                           in_progress ─► expired                (past expires_at)
    validating | in_progress ─► cancelling ─► cancelled          (set by the API)

Every line is checked and sent as the API key that created the batch (``key_id``): its
models, and its rate limits (a line over them gets a 429, retried with backoff like any
overload). Lines already in the checkpoint (``batch_results``) are never sent again; each
finished line is checkpointed with the counters in one transaction fenced by the lease
epoch, so a worker that lost its lease can neither record nor finalize.

Each change of status a job makes is logged at INFO with the batch's id and counts; the
process's ``LineCounts`` count the lines its jobs run (the metrics read them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.batch.config import BatchConfig
from router.batch.db import MetaStore, Result
from router.batch.dispatch import Dispatcher
from router.batch.errors import LeaseLost
from router.batch.finalize import write_outputs
from router.batch.jsonl import LineTooLong, iter_lines
from router.batch.limiter import AdaptiveLimit
from router.batch.models import error_line, response_line, usage_of
from router.batch.objects import ObjectMissing, Objects
from router.batch.schema import AnyRow
from router.batch.validate import validate

log = logging.getLogger("routeyard.batch")

#: Statuses worth another attempt: the engine or router was busy, down or slow.
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
OVERLOAD = frozenset({429, 503})


class LineCounts:
    """The lines a process's jobs ran since the metrics last took the counts, and the lines
    being sent now: plain ints, read by ``router.metrics`` at its flush."""

    __slots__ = ("completed", "failed", "in_flight", "retried")

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.retried = 0  # attempts that are tried again (429, 5xx, 408)
        self.in_flight = 0

    def take(self) -> tuple[int, int, int]:
        """Completed, failed and retried since the last call; zeroes them."""
        counts = self.completed, self.failed, self.retried
        self.completed = self.failed = self.retried = 0
        return counts


@dataclass
class Context:
    """What every job of a process shares."""

    db: MetaStore
    objects: Objects
    dispatcher: Dispatcher
    config: BatchConfig
    clock: Callable[[], float] = time.time
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    lines: LineCounts = field(default_factory=LineCounts)


class ResultWriter:
    """Group commit of finished lines: one transaction per burst, not per line."""

    def __init__(self, db: MetaStore, batch_id: str, epoch: int,
                 on_status: Callable[[str], None]) -> None:
        self.db, self.batch_id, self.epoch = db, batch_id, epoch
        self.on_status = on_status
        self._pending: list[Result] = []
        self._event = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._loop())

    def add(self, result: Result) -> None:
        self._pending.append(result)
        self._event.set()

    def error(self) -> BaseException | None:
        if self._task.done() and not self._task.cancelled():
            return self._task.exception()
        return None

    async def close(self) -> None:
        self._closing = True
        self._event.set()
        await self._task

    def abort(self) -> None:
        self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            while self._pending:
                chunk, self._pending = self._pending[:500], self._pending[500:]
                await self._write(chunk)
            if self._closing:
                return

    async def _write(self, chunk: list[Result]) -> None:
        for attempt in range(5):
            try:
                self.on_status(await self.db.record(self.batch_id, self.epoch, chunk))
                return
            except LeaseLost:
                raise
            except Exception:
                if attempt == 4:
                    raise
                log.warning("batch %s: checkpoint failed, retrying", self.batch_id,
                            exc_info=True)
                await asyncio.sleep(0.2 * 2**attempt)


class Job:
    def __init__(self, ctx: Context, row: AnyRow) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.row = row
        self.id: str = row.id
        self.epoch: int = row.lease_epoch
        self.status: str = row.status
        self.started = row.in_progress_at is not None
        #: Lines finished, as far as this job knows (the checkpoint's, plus its own): logs.
        self.total: int = row.total
        self.completed: int = row.completed
        self.failed: int = row.failed
        self.lost = False
        self._wake = asyncio.Event()

    # the lease ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until the batch is terminal, the lease is lost, or the worker drains."""
        inner = asyncio.create_task(self._run())
        beat = asyncio.create_task(self._heartbeat(inner))
        try:
            await inner
        except LeaseLost:
            log.warning("batch %s: lease taken over by another worker", self.id)
        except asyncio.CancelledError:
            if not self.lost:
                raise
            log.warning("batch %s: lease lost, stopped", self.id)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _heartbeat(self, inner: asyncio.Task[None]) -> None:
        lease = self.config.lease
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(min(lease / 4, self.config.poll_interval))
            try:
                status = await self.ctx.db.renew(self.id, self.epoch, self.ctx.clock() + lease)
                last_ok = time.monotonic()
                self._observe(status)
            except LeaseLost:
                self.lost = True
            except Exception:
                log.warning("batch %s: lease renewal failed", self.id, exc_info=True)
                # Stop before the lease can lapse, so no other worker runs our lines.
                self.lost = time.monotonic() - last_ok > lease * 0.6
            if self.lost:
                inner.cancel()
                return

    def _observe(self, status: str) -> None:
        """The stored status, as read by a heartbeat or checkpoint: notice a cancel."""
        if status == "cancelling" and self.status in ("validating", "in_progress"):
            self.status = "cancelling"
            log.info("batch %s: cancelling seen by its worker (%s)", self.id, self._counts())
            self._wake.set()

    def _counts(self) -> str:
        return f"{self.completed} completed, {self.failed} failed of {self.total}"

    def _expired(self) -> bool:
        return bool(self.ctx.clock() >= self.row.expires_at)

    def _stop_reason(self) -> str | None:
        if self.status == "cancelling":
            return "cancel"
        if self._expired():
            return "expire"
        if self.ctx.draining.is_set():
            return "drain"
        return None

    # the state machine ----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while await self._step():
                pass
        except ObjectMissing:
            await self._fail([{"code": "input_file_missing", "line": None, "param": None,
                               "message": f"The input file {self.row.input_file_id} is gone."}])

    async def _step(self) -> bool:
        """Do the work of the current status; True to go on with the next one."""
        db = self.ctx.db
        if self.status == "validating":
            if self._expired():
                return await self._finish("expired")
            return await self._validate()
        if self.status == "in_progress":
            outcome = await self._execute()
            if outcome == "drain":
                await db.release(self.id, self.epoch)
                log.info("batch %s: released by its draining worker, stays in_progress (%s)",
                         self.id, self._counts())
                return False
            if outcome == "expire":
                return await self._finish("expired")
            if outcome == "cancel":
                return await self._finish("cancelled")
            now = int(self.ctx.clock())
            if await db.transition(self.id, self.epoch, ("in_progress",),
                                   {"status": "finalizing", "finalizing_at": now}):
                self.status = "finalizing"
                log.info("batch %s: finalizing (%s)", self.id, self._counts())
            else:
                self.status = "cancelling"
            return True
        if self.status == "finalizing":
            return await self._finish("completed")
        if self.status == "cancelling":
            return await self._finish("cancelled")
        return False

    async def _validate(self) -> bool:
        config = self.config
        try:
            result = await validate(self._input(), self.row.endpoint, self.row.key_id,
                                    self.ctx.dispatcher, config.max_requests,
                                    config.max_embedding_inputs, config.max_reported_errors)
        except LineTooLong as exc:
            await self._fail([{"code": "line_too_long", "message": str(exc),
                               "param": None, "line": exc.line}])
            return False
        if result.error_count:
            await self._fail(result.errors)
            return False
        values = {"status": "in_progress", "in_progress_at": int(self.ctx.clock()),
                  "total": result.requests, "model": result.model}
        if await self.ctx.db.transition(self.id, self.epoch, ("validating",), values):
            self.status, self.started = "in_progress", True
            self.total = result.requests
            log.info("batch %s: in_progress (%d requests)", self.id, result.requests)
        else:
            self.status = "cancelling"
        return True

    async def _fail(self, errors: list[dict[str, Any]]) -> None:
        values = {"status": "failed", "failed_at": int(self.ctx.clock()),
                  "errors": orjson.dumps(errors).decode()}
        if await self.ctx.db.finish(self.id, self.epoch, ("validating", "in_progress"),
                                    values, []):
            self.status = "failed"
            log.info("batch %s: failed (%d errors, first: %s)", self.id, len(errors),
                     errors[0].get("code") if errors else None)
        else:
            self.status = "cancelling"
            await self._finish("cancelled")

    async def _finish(self, outcome: str) -> bool:
        """Write the output and error files, then the terminal status; True to go on
        (the status moved under us: an expiring batch was cancelled meanwhile)."""
        db, now = self.ctx.db, int(self.ctx.clock())
        fresh = await db.get_batch(self.id)
        assert fresh is not None
        new_files = []
        values: dict[str, object] = {"status": outcome, f"{outcome}_at": now}
        if self.started:
            new_files = await write_outputs(db, self.ctx.objects, fresh, outcome, now,
                                            self.config.max_line_bytes)
            for row in new_files:
                key = "output_file_id" if row["purpose_kind"] == "output" else "error_file_id"
                values[key] = row["id"]
        rows = [{k: v for k, v in r.items() if k != "purpose_kind"} for r in new_files]
        from_ = {"completed": ("finalizing",), "cancelled": ("cancelling",),
                 "expired": ("validating", "in_progress")}[outcome]
        if await db.finish(self.id, self.epoch, from_, values, rows):
            self.status = outcome
            self.total, self.completed, self.failed = fresh.total, fresh.completed, fresh.failed
            log.info("batch %s: %s (%s)", self.id, outcome, self._counts())
            return False
        self.status = "cancelling"
        return True

    # execution ------------------------------------------------------------------------

    def _input(self) -> AsyncIterator[tuple[int, bytes]]:
        key = Objects.key(self.row.input_file_id)
        return iter_lines(self.ctx.objects.read(key), self.config.max_line_bytes)

    async def _execute(self) -> str:
        """Send every line not yet checkpointed; the reason it stopped ("done" if none)."""
        config = self.config
        done = await self.ctx.db.done_lines(self.id)
        limiter = AdaptiveLimit(config.min_concurrency, config.initial_concurrency,
                                config.max_concurrency, config.pressure_high)
        writer = ResultWriter(self.ctx.db, self.id, self.epoch, self._observe)
        in_flight: set[asyncio.Task[None]] = set()
        reason: str | None = None
        try:
            async for number, raw in self._input():
                if number in done or not raw.strip():
                    continue
                while (reason := self._stop_reason()) is None and len(in_flight) >= \
                        limiter.allowed(self.ctx.dispatcher.pressure()):
                    await asyncio.wait(in_flight, timeout=0.05,
                                       return_when=asyncio.FIRST_COMPLETED)
                if (error := writer.error()) is not None:
                    raise error
                if reason is not None:
                    break
                line = orjson.loads(raw)
                task = asyncio.create_task(self._line(
                    number, line["custom_id"], orjson.dumps(line["body"]), limiter, writer))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.gather(*in_flight)  # cancel and expiry let in-flight lines end
            await writer.close()
        except BaseException:
            for task in in_flight:
                task.cancel()
            writer.abort()
            raise
        return reason or self._stop_reason() or "done"

    async def _line(self, number: int, custom_id: str, body: bytes, limiter: AdaptiveLimit,
                    writer: ResultWriter) -> None:
        lines = self.ctx.lines
        lines.in_flight += 1
        try:
            await self._send_line(number, custom_id, body, limiter, writer, lines)
        finally:
            lines.in_flight -= 1

    async def _send_line(self, number: int, custom_id: str, body: bytes,
                         limiter: AdaptiveLimit, writer: ResultWriter,
                         lines: LineCounts) -> None:
        attempt = 1
        while True:
            try:
                status, payload = await self.ctx.dispatcher.dispatch(self.row.endpoint, body,
                                                                      self.row.key_id)
            except Exception as exc:  # a broken dispatcher must not wedge the batch
                log.exception("batch %s: dispatcher raised", self.id)
                status, payload = 502, orjson.dumps({"error": {
                    "message": f"routing failed: {type(exc).__name__}", "type": "server_error",
                    "param": None, "code": "dispatch_error"}})
            if status in OVERLOAD:
                limiter.on_overload()
            elif status < 400:
                limiter.on_success()
            if status not in RETRYABLE or attempt >= self.config.max_attempts:
                break
            if (reason := self._stop_reason()) is not None:
                if reason == "drain":
                    return  # unrecorded: the next owner sends it again
                break
            lines.retried += 1
            await self._backoff(attempt)
            attempt += 1
        result = self._result(number, custom_id, status, payload)
        if result.ok:
            lines.completed += 1
            self.completed += 1
        else:
            lines.failed += 1
            self.failed += 1
        writer.add(result)

    async def _backoff(self, attempt: int) -> None:
        config = self.config
        delay = min(config.max_retry_backoff, config.retry_backoff * 2 ** (attempt - 1))
        delay *= random.uniform(0.5, 1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    @staticmethod
    def _result(number: int, custom_id: str, status: int, payload: bytes) -> Result:
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            body = None
        if 200 <= status < 300:
            if body is None:
                return Result(number, False, error_line(
                    custom_id, "invalid_response",
                    f"The engine answered {status} with a body that is not JSON."))
            return Result(number, True, response_line(custom_id, status, body), usage_of(body))
        if body is None:
            text = payload[:2000].decode(errors="replace")
            body = {"error": {"message": text, "type": "upstream_error", "param": None,
                              "code": status}}
        return Result(number, False, response_line(custom_id, status, body))
