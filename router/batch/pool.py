"""Batch workers: claim a batch, run it while holding its lease, look for the next.

A ``WorkerPool`` is one process's workers. Inside the server, ``BatchService.start`` runs
``config.workers`` of them per process; ``worker.run_worker`` runs them alone
(``routeyard batch-worker``). Any number of processes may share one PostgreSQL database:
claims skip locked rows, leases expire when a worker dies, and the next claim resumes
from the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time

from router.batch.jobs import Context, Job

log = logging.getLogger("routeyard.batch")

#: Seconds between sweeps for expired files (by the first worker of each process).
PURGE_INTERVAL = 300.0


class WorkerPool:
    def __init__(self, ctx: Context, count: int) -> None:
        self.ctx = ctx
        self.count = count
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._next_purge = 0.0

    def start(self) -> None:
        for index in range(self.count):
            task = asyncio.create_task(self._run(f"{self.name}/{index}", index == 0),
                                       name=f"routeyard.batch-worker.{index}")
            self._tasks.append(task)

    def wake(self) -> None:
        """A batch was created or cancelled here: look now, not at the next poll."""
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Drain: no new claims, running lines end (``grace`` s at most), leases released."""
        self.ctx.draining.set()
        self._wake.set()
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(self._tasks, timeout=grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _run(self, owner: str, purges: bool) -> None:
        ctx = self.ctx
        while not ctx.draining.is_set():
            try:
                row = await ctx.db.claim(owner, ctx.clock(), ctx.config.lease)
            except Exception:
                log.exception("batch worker %s: claim failed", owner)
                row = None
            if row is not None:
                try:
                    await Job(ctx, row).run()
                except Exception:
                    log.exception("batch %s: worker %s failed; the lease will lapse", row.id,
                                  owner)
                continue
            if purges:
                await self._purge()
            await self._idle()

    async def _idle(self) -> None:
        interval = self.ctx.config.poll_interval * random.uniform(0.8, 1.2)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), interval)
        self._wake.clear()

    async def _purge(self) -> None:
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + PURGE_INTERVAL
        try:
            keys = await self.ctx.db.take_expired_files(int(self.ctx.clock()))
            for key in keys:
                await self.ctx.objects.delete(key)
        except Exception:
            log.exception("batch: purging expired files failed")
