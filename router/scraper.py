"""The scraper: each worker reads its endpoints' ``GET /metrics`` on an interval.

One task per worker walks the endpoints that a model's ``engine_metrics`` asks to read
(``Endpoint.scrape``, set by ``discovery.apply_limits``) and starts a scrape for each one
that is due and has none in flight, so a slow engine delays only its own readings. A scrape
goes through the endpoint's own transport (the keep-alive ``upstream.Pool`` the requests
use, so it costs no new connection), each phase bounded by ``timeout``; it never blocks a
request, which reads only the last reading (``EngineLoad``). A failed scrape keeps the last
reading, which ages until the scored balancers treat it as saturated; it does not touch the
endpoint's health (health checks decide that).

Per worker, not per process: each worker credits its own dispatches between scrapes
(``EngineLoad.base``), which needs a reading taken against its own in-flight count. The
cost is one HTTP exchange over a kept-alive connection plus a parse
(``router.engine_load``) per scrape, ``workers * backends / interval`` scrapes a second:
about 190 µs of CPU per scrape of the benchmark engine's 24 KB body on this machine kind,
so 0.1 % of a core per backend and worker at the default 200 ms (8 backends and 4 workers:
3 %).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Protocol

from router.engine_load import EngineLoad, ScrapeSettings, parse_engine_metrics
from router.errors import UpstreamError
from router.upstream import Reachable, Timeouts

if TYPE_CHECKING:
    pass

log = logging.getLogger("routeyard.scraper")

#: The longest the loop sleeps when nothing is due (a reload may add endpoints).
IDLE = 1.0


class Scraped(Reachable, Protocol):
    """An endpoint as the scraper sees it (``router.endpoint.Endpoint``)."""

    @property
    def key(self) -> str: ...
    @property
    def load(self) -> EngineLoad: ...
    @property
    def scrape(self) -> ScrapeSettings | None: ...
    @property
    def in_flight(self) -> int: ...

    def load_changed(self) -> None: ...


def _head(endpoint: Scraped, path: str) -> bytes:
    origin = endpoint.origin
    return (f"GET {origin.base_path}{path} HTTP/1.1\r\n"
            f"host: {origin.host_header.decode()}\r\n{endpoint.api_key_header or ''}"
            "user-agent: routeyard-scraper\r\ncontent-length: 0\r\n\r\n").encode()


async def scrape(endpoint: Scraped, settings: ScrapeSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
    """Read ``endpoint``'s metrics once into its ``EngineLoad``, or keep why not."""
    load = endpoint.load
    sent, base = clock(), endpoint.in_flight
    timeout = settings.timeout
    try:
        response = await endpoint.transport.handle(_head(endpoint, settings.path), b"",
                                                   Timeouts(timeout, timeout, timeout))
        try:
            body = await response.read()
        finally:
            response.close()
        if response.status != 200:
            raise ValueError(f"status {response.status}")
        reading = parse_engine_metrics(body)
    except (UpstreamError, ValueError, ArithmeticError) as exc:  # +Inf in a count, too
        if load.error is None:
            log.info("backend %s: cannot read %s: %s", endpoint.key, settings.path, exc)
        load.failed(f"{settings.path}: {exc}")
    else:
        if load.error is not None:
            log.info("backend %s: %s read again", endpoint.key, settings.path)
        load.update(reading, sent, time.time(), base)
    endpoint.load_changed()


class Scraper:
    """The scrapes of one worker: ``run`` until cancelled; ``endpoints`` gives the
    endpoints known now (read anew each round, so reloads and DNS refreshes apply)."""

    def __init__(self, endpoints: Callable[[], Iterable[Scraped]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = endpoints
        self.clock = clock
        #: When each endpoint's next scrape is due, and those in flight, by key.
        self.due: dict[str, float] = {}
        self.running: dict[str, asyncio.Task[None]] = {}
        #: Set when a scrape ends, so an endpoint overdue while its scrape ran is read next.
        self.ended = asyncio.Event()

    def start_due(self) -> float:
        """Start the scrapes that are due; the seconds until the next one is."""
        now = self.clock()
        soonest = now + IDLE
        seen = set()
        for endpoint in list(self.endpoints()):
            settings = endpoint.scrape
            if settings is None:
                continue
            key = endpoint.key
            seen.add(key)
            if key in self.running:
                continue  # its end sets ``ended``
            due = self.due.get(key, now)
            if due <= now:
                due = self.due[key] = now + settings.interval
                task = asyncio.get_running_loop().create_task(
                    scrape(endpoint, settings, self.clock))
                self.running[key] = task
                task.add_done_callback(partial(self._ended, key))
            soonest = min(soonest, due)
        for key in [k for k in self.due if k not in seen]:
            del self.due[key]
        return max(soonest - now, 0.005)

    def _ended(self, key: str, _task: asyncio.Task[None]) -> None:
        self.running.pop(key, None)
        self.ended.set()

    async def run(self) -> None:
        while True:
            self.ended.clear()
            delay = self.start_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), delay)

    def close(self) -> None:
        for task in list(self.running.values()):
            task.cancel()
