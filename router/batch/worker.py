"""A process that only runs batches: ``run_worker`` (``routeyard batch-worker``).

It opens a ``BatchService`` with a ``pool.WorkerPool`` of its own and runs until stopped;
see ``pool`` for how workers share a database.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from router.batch.config import BatchConfig
from router.batch.dispatch import Dispatcher
from router.batch.service import BatchService

log = logging.getLogger("routeyard.batch")


async def run_worker(config: BatchConfig, dispatcher: Dispatcher, *, workers: int | None = None,
                     stop: asyncio.Event | None = None, grace: float = 30.0,
                     started: Callable[[BatchService], None] | None = None) -> None:
    """Run batch workers in this process until ``stop`` is set (or SIGTERM/SIGINT).

    ``workers`` defaults to ``config.workers`` (at least 1). ``started`` gets the running
    service (the metrics watch its lines). Call inside the event loop that the dispatcher
    uses: ``asyncio.run(run_worker(config, dispatcher))``.
    """
    service = BatchService(config)
    await service.start(dispatcher, workers=max(1, config.workers if workers is None else workers))
    if started is not None:
        started(service)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("batch worker running (%s)", service.pool.name if service.pool else "idle")
    try:
        await stop.wait()
    finally:
        await service.close(grace)
