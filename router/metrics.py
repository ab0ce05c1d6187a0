"""Prometheus metrics, served on ``GET /metrics``; names and labels in docs/observability.md.

**The request path does plain arithmetic only.** A finished request adds to Python ints
and bucket lists of its (model, group, backend, key, origin) ``Series`` (one ``bisect`` per
histogram; the series is found by one dict lookup of a tuple of strings the request
already holds: key ids come from the config, so there are as many series as keys);
once a second, and before every scrape, ``flush`` moves the sums into the
``prometheus_client`` children and samples the gauges (in flight and health per backend,
queue length and backends up per model) from the endpoints themselves. Updating
``prometheus_client`` per request would cost about 1 µs per counter and 2 µs per
histogram (a lock and, with several workers, a memory-mapped write each), several times
what the arithmetic costs.
Label children are made once per series, never per request.

**Several workers.** With ``--workers N`` each worker writes its values to memory-mapped
files in ``PROMETHEUS_MULTIPROC_DIR`` (``routeyard serve`` makes a fresh directory per run
before the workers start) and a scrape, whichever worker answers it, merges the files of
all of them: counters and histograms add up, the in-flight and queue gauges add up over
live workers, backend health takes the minimum (a backend is up only if every worker sees
it up). The other workers' figures are at most one flush (1 s) old. ``prometheus_client``
picks its storage when it is imported, so this module imports it only inside ``Metrics``.

A scrape renders in a thread, so the event loop keeps relaying while the files are read.
``routeyard batch-worker`` has no Sanic app: ``serve`` answers its scrapes from
``prometheus_client``'s own HTTP server thread, with the figures of the last flush.

**Batches.** Where batches run in this process (``watch_lines``), their line counts
(``BatchSource.lines``) are sampled at each flush like the gauges. The batch gauges that
describe the whole database (batches by status, the oldest queued batch's age) are read
at scrape time from ``BatchSource.gauges`` (``watch_batches``: a bounded query, cached
briefly by the batch service), so every router process with a ``batch:`` block shows
them, whichever process runs the batches; ``routeyard batch-worker``
(``batch_database=False``) leaves them out. With several workers they are
``mostrecent`` gauges: the worker that answered the last scrape wrote the freshest figures.
"""

from __future__ import annotations

import asyncio
import logging
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from router.record import Outcome, Record

log = logging.getLogger("routeyard.metrics")

#: What the metrics sample once a second: the endpoints, and per model (name, queue
#: length, backends that get traffic, blocks in its prefix index or None without one).
ModelSample = tuple[str, int, int, "int | None"]
Sources = Callable[[], "tuple[Iterable[Sampled], Iterable[ModelSample]]"]


class Sampled(Protocol):
    """An endpoint as the metrics sample it."""

    @property
    def key(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def up(self) -> bool: ...

class LineCounts(Protocol):
    """What a process's batch workers did since the last flush, and what they do now."""

    @property
    def in_flight(self) -> int: ...

    def take(self) -> tuple[int, int, int]:
        """Lines completed, failed and retried since the last call (then zeroed)."""
        ...


class BatchSource(Protocol):
    """The batch service, as the metrics read it."""

    @property
    def lines(self) -> LineCounts | None:
        """None where this process runs no batch workers."""
        ...

    async def gauges(self) -> tuple[dict[str, int], float]:
        """Batches by status, and the age in seconds of the oldest one waiting for a
        worker (0 when none waits)."""
        ...


#: The ``outcome`` label of ``routeyard_batch_lines_total``, in ``LineCounts.take`` order.
LINE_OUTCOMES = ("completed", "failed", "retried")
#: How long a scrape waits for the batch database before it shows the last figures.
BATCH_QUERY_TIMEOUT = 2.0

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_INTERVAL = 1.0

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 1.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Histo:
    """Observations of one histogram child since the last flush."""

    __slots__ = ("bounds", "child", "counts", "sum")

    def __init__(self, child: Any, bounds: tuple[float, ...]) -> None:
        self.child = child
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        # flush() adds to the child's bucket values directly: check they are where expected
        if len(child._buckets) != len(self.counts) or not hasattr(child, "_sum"):
            raise RuntimeError("unsupported prometheus_client version: Histogram internals")

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # "le" buckets: value <= bound
        self.sum += value

    def flush(self) -> None:
        counts = self.counts
        if any(counts):
            buckets = self.child._buckets
            for i, n in enumerate(counts):
                if n:
                    buckets[i].inc(n)
                    counts[i] = 0
            self.child._sum.inc(self.sum)
            self.sum = 0.0


class Series:
    """The requests of one (model, group, backend, key, origin) since the last flush.

    Several series share one histogram child (the histograms have no ``key`` or
    ``origin`` label): each adds its own observations to it at flush."""

    __slots__ = ("codes", "counters", "duration", "input_tokens", "labels", "output_tokens",
                 "overhead", "tokens", "ttfb")

    def __init__(self, metrics: Metrics, model: str, group: str, backend: str, key: str,
                 origin: str) -> None:
        self.labels = (model, group, backend, key, origin)
        self.codes: dict[int, int] = {}
        self.counters: dict[int, Any] = {}
        self.duration = Histo(metrics.duration.labels(model, group, backend), DURATION_BUCKETS)
        self.ttfb = Histo(metrics.ttfb.labels(model, group, backend), TTFB_BUCKETS)
        self.overhead = Histo(metrics.overhead.labels(model, group), OVERHEAD_BUCKETS)
        self.input_tokens = 0
        self.output_tokens = 0
        self.tokens: tuple[Any, Any] | None = None  # made at the first tokens reported

    def flush(self, metrics: Metrics) -> None:
        if self.codes:
            codes = self.codes
            self.codes = {}
            for status, n in codes.items():
                counter = self.counters.get(status)
                if counter is None:
                    counter = self.counters[status] = metrics.requests.labels(
                        *self.labels, str(status))
                counter.inc(n)
        if self.input_tokens or self.output_tokens:
            tokens = self.tokens
            if tokens is None:
                model, _group, _backend, key, origin = self.labels
                tokens = self.tokens = (metrics.tokens.labels(model, key, origin, "input"),
                                        metrics.tokens.labels(model, key, origin, "output"))
            if self.input_tokens:
                tokens[0].inc(self.input_tokens)
                self.input_tokens = 0
            if self.output_tokens:
                tokens[1].inc(self.output_tokens)
                self.output_tokens = 0
        self.duration.flush()
        self.ttfb.flush()
        self.overhead.flush()


class ModelSeries:
    """Per model: the rare events (queue waits and refusals), updated directly."""

    __slots__ = ("queue_wait", "rejected")

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.queue_wait = metrics.queue_wait.labels(model)
        self.rejected = metrics.queue_rejections.labels(model)


class Metrics:
    """Every metric of one worker, its flush, and the scrape.

    ``batch_database=False`` leaves out the gauges read from the batch database (for
    ``routeyard batch-worker``, which leaves them to the routers)."""

    def __init__(self, *, batch_database: bool = True) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        # no *_created series: the multi-worker scrape has none
        disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
        self.multiprocess = multiprocess()
        registry = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        if self.multiprocess:
            from prometheus_client import multiprocess as mp

            self.registry = CollectorRegistry()
            mp.MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]  # unannotated upstream
        else:
            assert registry is not None
            self.registry = registry
        rg = ["model", "group", "backend"]
        self.requests = Counter(
            "routeyard_requests", "Proxied requests and batch lines by model, endpoint group, "
            "backend, API key id, origin (online, batch) and HTTP status code (router-made "
            "errors included; backend empty when none was chosen, key empty without one).",
            [*rg, "key", "origin", "code"], registry=registry)
        self.duration = Histogram(
            "routeyard_request_duration_seconds", "From request arrival to the last byte of "
            "the response.", rg, buckets=DURATION_BUCKETS, registry=registry)
        self.ttfb = Histogram(
            "routeyard_time_to_first_byte_seconds", "From request arrival to the first byte "
            "of the response body from the backend.", rg, buckets=TTFB_BUCKETS, registry=registry)
        self.overhead = Histogram(
            "routeyard_router_overhead_seconds", "From request arrival to the first upstream "
            "request being sent (includes any queue wait).", ["model", "group"],
            buckets=OVERHEAD_BUCKETS, registry=registry)
        self.in_flight = Gauge(
            "routeyard_backend_in_flight_requests", "Requests in flight to each backend.",
            ["backend"], multiprocess_mode="livesum", registry=registry)
        self.backend_up = Gauge(
            "routeyard_backend_up", "1 when the backend gets traffic: healthy and not "
            "ejected, or ejected but served in panic mode (with several workers: in every "
            "worker), else 0.", ["backend"],
            multiprocess_mode="livemin", registry=registry)
        self.retries = Counter(
            "routeyard_retries", "Requests retried on another backend, by the backend that "
            "failed.", ["model", "backend"], registry=registry)
        self.queue_wait = Histogram(
            "routeyard_queue_wait_seconds", "Time waited for a free backend, for requests "
            "that had to wait.", ["model"], buckets=QUEUE_BUCKETS, registry=registry)
        self.queued = Gauge(
            "routeyard_queued_requests", "Requests waiting for a free backend.", ["model"],
            multiprocess_mode="livesum", registry=registry)
        self.model_backends_up = Gauge(
            "routeyard_model_backends_up", "Backends of the model that get traffic (as "
            "routeyard_backend_up; with several workers: the fewest any worker sees); 0: "
            "the model's requests get 503.", ["model"],
            multiprocess_mode="livemin", registry=registry)
        self.prefix_index_blocks = Gauge(
            "routeyard_prefix_index_blocks", "Prompt blocks in the prefix index of a "
            "cache_aware model (each worker keeps its own; the sum over workers).",
            ["model"], multiprocess_mode="livesum", registry=registry)
        self.queue_rejections = Counter(
            "routeyard_queue_rejections", "Requests answered 429 because the queue was full "
            "or no backend freed up in time.", ["model"], registry=registry)
        self.tokens = Counter(
            "routeyard_tokens", "Tokens reported in responses' usage, by model, API key id, "
            "origin (online, batch) and type (input, output).",
            ["model", "key", "origin", "type"], registry=registry)
        self.reloads = Counter(
            "routeyard_config_reloads", "Config reloads by result (ok, error, unchanged); "
            "each worker counts its own.", ["result"], registry=registry)
        for result in ("ok", "error", "unchanged"):
            self.reloads.labels(result)  # export zeros: rate() needs the series to exist
        self.config_info = Gauge(
            "routeyard_config_info", "1 for the sha256 of the routes file being served (0 for "
            "one served earlier in this run, with several workers).",
            ["sha256"], multiprocess_mode="livemax", registry=registry)
        self.batches = Gauge(
            "routeyard_batches", "Batches in the batch database by status (read at scrape "
            "time).", ["status"], multiprocess_mode="livemostrecent",
            registry=registry if batch_database else None)
        self.batch_lines = Counter(
            "routeyard_batch_lines", "Batch lines run by the batch workers of this process, by "
            "outcome (completed, failed; retried: an attempt that is tried again).",
            ["outcome"], registry=registry)
        self.batch_lines_in_flight = Gauge(
            "routeyard_batch_lines_in_flight", "Batch lines being sent by the batch workers "
            "of this process.", multiprocess_mode="livesum", registry=registry)
        self.batch_oldest_queued_age = Gauge(
            "routeyard_batch_oldest_queued_age_seconds", "Age of the oldest unfinished batch "
            "that no worker holds (0 when none waits; read at scrape time).",
            multiprocess_mode="livemostrecent", registry=registry if batch_database else None)
        self._series: dict[tuple[str, str, str, str, str], Series] = {}
        self._models: dict[str, ModelSeries] = {}
        self._batch: BatchSource | None = None  # its lines
        self._database: BatchSource | None = None  # its gauges
        self._line_counters: tuple[Any, ...] = ()
        self._batch_statuses: dict[str, Any] = {}
        self._batch_failing = False
        self._backends: dict[str, tuple[Any, Any]] = {}
        self._queues: dict[str, tuple[Any, Any]] = {}
        self._sha: str | None = None
        self._sources: Sources | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- the request path: plain arithmetic ------------------------------------------------
    def series(self, model: str, group: str, backend: str, key: str = "",
               origin: str = "online") -> Series:
        labels = (model, group, backend, key, origin)
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = Series(self, *labels)
        return series

    def model(self, name: str) -> ModelSeries:
        series = self._models.get(name)
        if series is None:
            series = self._models[name] = ModelSeries(self, name)
        return series

    def finish(self, record: Record) -> None:
        """One finished request (the ``Sink`` protocol)."""
        end = perf_counter()
        outcome = record.outcome
        model = record.label_model
        labels = (model, record.group, outcome.backend, record.key_id or "", record.origin)
        series = self._series.get(labels)
        if series is None:
            series = self.series(*labels)
        codes = series.codes
        status = record.status
        codes[status] = codes.get(status, 0) + 1
        t0 = record.t0
        series.duration.observe(end - t0)
        if outcome.t_first:
            series.ttfb.observe(outcome.t_first - t0)
        if outcome.t_sent:
            series.overhead.observe(outcome.t_sent - t0)
        input_tokens, output_tokens = outcome.input_tokens, outcome.output_tokens
        if input_tokens:
            series.input_tokens += input_tokens
        if output_tokens:
            series.output_tokens += output_tokens
        if outcome.queue_wait or outcome.queue_rejected or outcome.retried_from:
            self._rare(model, outcome)

    def _rare(self, model: str, outcome: Outcome) -> None:
        """The queue and retry figures of a request that waited, was refused or retried."""
        per_model = self.model(model)
        if outcome.queue_wait:
            per_model.queue_wait.observe(outcome.queue_wait)
        if outcome.queue_rejected:
            per_model.rejected.inc()
        for backend in outcome.retried_from:
            self.retries.labels(model, backend).inc()

    # -- once a second, and before a scrape ------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, sources: Sources) -> None:
        """Flush every ``FLUSH_INTERVAL``; ``sources`` gives the endpoints and models now."""
        self._sources = sources
        self._tick(loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.flush()
        self._timer = loop.call_later(FLUSH_INTERVAL, self._tick, loop)

    def flush(self) -> None:
        for series in self._series.values():
            series.flush(self)
        if self._batch is not None:
            self._sample_lines(self._batch.lines)
        if self._sources is not None:
            endpoints, models = self._sources()
            self._sample_backends(endpoints)
            for name, queued, up, blocks in models:
                pair = self._queues.get(name)
                if pair is None:
                    pair = self._queues[name] = (self.queued.labels(name),
                                                 self.model_backends_up.labels(name))
                pair[0].set(queued)
                pair[1].set(up)
                if blocks is not None:
                    self.prefix_index_blocks.labels(name).set(blocks)

    def _sample_backends(self, endpoints: Iterable[Sampled]) -> None:
        seen = set()
        for endpoint in endpoints:
            key = endpoint.key
            seen.add(key)
            pair = self._backends.get(key)
            if pair is None:
                pair = self._backends[key] = (self.in_flight.labels(key),
                                              self.backend_up.labels(key))
            pair[0].set(endpoint.in_flight)
            pair[1].set(1 if endpoint.up else 0)
        for key in [k for k in self._backends if k not in seen]:  # gone from the config
            in_flight, _up = self._backends.pop(key)
            if self.multiprocess:  # a shared file cannot forget a series
                in_flight.set(0)
            else:
                self.in_flight.remove(key)
                self.backend_up.remove(key)

    # -- batches ---------------------------------------------------------------------------
    def watch_lines(self, source: BatchSource) -> None:
        """Export the lines ``source``'s workers run, at each flush (not the database's
        gauges: ``routeyard batch-worker`` leaves those to the routers)."""
        self._batch = source
        self._line_counters = tuple(self.batch_lines.labels(o) for o in LINE_OUTCOMES)

    def watch_batches(self, source: BatchSource, statuses: Iterable[str]) -> None:
        """Export ``source``'s figures: its lines at each flush, its gauges at each scrape
        (every status in ``statuses`` is exported, zeros included)."""
        self.watch_lines(source)
        self._database = source
        self._batch_statuses = {status: self.batches.labels(status) for status in statuses}

    def _sample_lines(self, lines: LineCounts | None) -> None:
        if lines is None:
            return
        for counter, n in zip(self._line_counters, lines.take(), strict=True):
            if n:
                counter.inc(n)
        self.batch_lines_in_flight.set(lines.in_flight)

    async def _sample_batches(self, source: BatchSource) -> None:
        """The database's batch gauges; on a slow or failing database the last figures
        stay (logged once per outage)."""
        try:
            counts, oldest = await asyncio.wait_for(source.gauges(), BATCH_QUERY_TIMEOUT)
        except Exception as exc:  # a scrape must answer even when the batch database does not
            if not self._batch_failing:  # once per outage, not once per scrape
                log.warning("batch metrics: the batch database did not answer (%s); the "
                            "batch gauges keep their last figures", repr(exc))
            self._batch_failing = True
            return
        if self._batch_failing:
            self._batch_failing = False
            log.info("batch metrics: the batch database answers again")
        for status, gauge in self._batch_statuses.items():
            gauge.set(counts.get(status, 0))
        self.batch_oldest_queued_age.set(oldest)

    def config_loaded(self, result: str | None, sha256: str) -> None:
        """A (re)load attempt: ``result`` is None for the first load."""
        if result is not None:
            self.reloads.labels(result).inc()
        if sha256 != self._sha:
            if self._sha is not None:
                if self.multiprocess:
                    self.config_info.labels(self._sha).set(0)
                else:
                    self.config_info.remove(self._sha)
            self.config_info.labels(sha256).set(1)
            self._sha = sha256

    # -- the scrape --------------------------------------------------------------------------
    def render_now(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    async def render(self) -> bytes:
        if self._database is not None:
            await self._sample_batches(self._database)
        self.flush()
        return await asyncio.get_running_loop().run_in_executor(None, self.render_now)

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve the registry on ``http://host:port/metrics`` from a thread of
        ``prometheus_client``'s own server, for a process without the Sanic app
        (``routeyard batch-worker``). A scrape there does not flush: it shows the figures
        of the last flush (at most ``FLUSH_INTERVAL`` old). ``OSError`` when it cannot
        listen; ``shutdown()`` the server to stop it."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, host, registry=self.registry)
        return server

    def close(self) -> None:
        """At worker stop: flush, then drop this worker's live gauges from the shared files."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        if self.multiprocess:
            from prometheus_client import multiprocess as mp

            mp.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # unannotated upstream


def prepare_multiprocess_dir(path: str) -> None:
    """Empty a user-given ``PROMETHEUS_MULTIPROC_DIR`` of a previous run's files."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
