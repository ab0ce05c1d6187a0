"""The record of one request, and the sinks that read it once it has ended.

A ``Record`` is plain data, written in parts by the phase that knows each part: the
listener (what was asked), admission (which model), the relay (its ``Outcome``: backend,
times, bytes, tokens) and settlement (the final status). When the request ends, however
it ends, ``Sinks.settle`` hands the record to every sink: metrics, the access log, tracing
and the tenant limiter each implement ``Sink``. No sink writes into the record; tracing
keeps its spans in its own per-request object (``Record.trace``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from router.errors import RouterError
from router.usage import USAGE_SCAN, tokens_in

if TYPE_CHECKING:
    from router.upstream import Origin

_USAGE = b'"usage"'
#: Endpoint group → ``gen_ai.operation.name`` (GenAI semantic conventions); other groups
#: use their own name, as the conventions ask for operations they do not list.
GEN_AI_OPERATIONS = {
    "chat": "chat", "responses": "chat", "messages": "chat", "cohere": "chat",
    "completions": "text_completion", "generate": "text_completion",
    "embeddings": "embeddings",
}
#: nginx's "client closed request": the client left before the answer ended.
CLIENT_CLOSED = 499


class Target(Protocol):
    """What tracing needs to know of the endpoint an attempt goes to."""

    @property
    def key(self) -> str: ...
    @property
    def origin(self) -> Origin: ...


class AttemptTrace(Protocol):
    """The tracing of one request as the relay sees it: a CLIENT span per attempt."""

    def attempt(self, target: Target, number: int) -> str | None:
        """An attempt starts; returns the trace header lines for the backend (or None to
        pass the client's on)."""
        ...

    def attempt_ended(self, status: int, error: str | None) -> None: ...

    def trace_id(self) -> str | None:
        """The request's trace id (32 hex digits), if it has one."""
        ...


class Outcome:
    """What the relay reports about its attempts and the answer it relayed."""

    __slots__ = (
        "attempt_error", "attempt_status", "backend", "bytes_out", "error", "explain",
        "input_tokens",
        "output_tokens", "queue_rejected", "queue_wait", "reads_usage", "retried_from",
        "retries", "status", "t_first", "t_sent",
    )

    def __init__(self, reads_usage: bool = True) -> None:
        #: False for an answer whose tokens were counted when it was made (a stored one).
        self.reads_usage = reads_usage
        self.backend = ""  # the endpoint key of the last attempt
        #: Answer headers that explain the last attempt's pick (``Lease.explain``).
        self.explain: tuple[tuple[bytes, bytes], ...] = ()
        self.retries = 0
        #: The backends of the attempts that were retried elsewhere, in order.
        self.retried_from: tuple[str, ...] = ()
        self.status = 0  # the answer's status (the last attempt's)
        self.attempt_status = 0
        self.attempt_error: str | None = None
        #: Set when the answer broke off after its head went to the client.
        self.error: str | None = None
        self.t_sent = 0.0
        self.t_first = 0.0
        self.queue_wait = 0.0
        #: The model's queue refused the request (full, or no backend freed up in time).
        self.queue_rejected = False
        self.bytes_out = 0
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None

    def body(self, data: bytes, content_type: str) -> None:
        """A response body read whole."""
        self.t_first = perf_counter()
        self.bytes_out = len(data)
        if "json" in content_type or "event-stream" in content_type:
            self._usage(data if len(data) <= USAGE_SCAN else data[-4096:])

    def chunk(self, data: bytes) -> None:
        """One relayed chunk of a streamed body."""
        if not self.t_first:
            self.t_first = perf_counter()
        self.bytes_out += len(data)
        if _USAGE in data:
            self._usage(data)

    def _usage(self, data: bytes) -> None:
        if not self.reads_usage:
            return
        found = tokens_in(data)
        if found is not None:
            if found[0] is not None:
                self.input_tokens = found[0]
            if found[1] is not None:
                self.output_tokens = found[1]

    @property
    def tokens(self) -> int | None:
        """Input plus output tokens, once the answer reported them."""
        if self.input_tokens is None:
            return None
        return self.input_tokens + (self.output_tokens or 0)


class Record:
    """One request, from arrival to its last byte."""

    __slots__ = (
        "admission", "backend_model", "bytes_in", "client_ip", "error", "failed", "group",
        "headers",
        "key_id", "label_model", "method", "model", "operation", "origin", "outcome", "path",
        "request_id", "scheme", "status", "t0", "trace",
    )

    def __init__(self, method: str, path: str, headers: Mapping[str, str], group: str,
                 operation: str, request_id: str, t0: float, bytes_in: int,
                 client_ip: str | None = None, scheme: str = "http", origin: str = "online",
                 reads_usage: bool = True, key_id: str | None = None) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.scheme = scheme
        self.client_ip = client_ip
        self.group = group
        self.operation = operation
        self.request_id = request_id
        #: ``online`` for a client's request, ``batch`` for a batch line.
        self.origin = origin
        self.t0 = t0
        self.bytes_in = bytes_in
        self.model: str | None = None  # the name the client asked for
        self.label_model = ""  # the configured model, once found (a metric label)
        self.backend_model: str | None = None
        #: The id of the API key the request was admitted with (``auth:``), else None.
        self.key_id = key_id
        self.outcome = Outcome(reads_usage)
        self.status = 0
        self.error: str | None = None
        #: The request ended with an exception (an error answer of the router's, a
        #: client that left, a failure).
        self.failed = False
        #: The limiter's ticket for this request (``router.tenants.limits.Admission``).
        self.admission: Any = None
        #: The tracing sink's state for this request, when tracing is on.
        self.trace: AttemptTrace | None = None

    def ended(self, exc: BaseException | None) -> None:
        """Settle the final status and error: the answer's, or the failure's."""
        outcome = self.outcome
        self.failed = exc is not None
        if exc is None:
            self.status = outcome.status
            self.error = outcome.error
        elif isinstance(exc, RouterError):
            self.status = exc.status
            self.error = exc.code or exc.type
        elif isinstance(exc, asyncio.CancelledError):
            self.error = "client_disconnected"
            self.status = outcome.status or CLIENT_CLOSED
        else:
            self.status = getattr(exc, "status_code", 500)
            self.error = type(exc).__name__


class Sink(Protocol):
    """Reads each finished record; may return an awaitable that must complete (the
    limiter's usage correction), which settlement waits for, shielded."""

    def finish(self, record: Record) -> Awaitable[None] | None: ...


class Tracer(Sink, Protocol):
    """A sink that also sees each request start (to open its spans)."""

    def start(self, record: Record) -> None: ...


class Sinks:
    """The sinks of one worker process."""

    def __init__(self, sinks: Iterable[Sink], tracer: Tracer | None = None) -> None:
        self.tracer = tracer
        self.sinks = tuple(sinks) + ((tracer,) if tracer is not None else ())

    def opened(self, record: Record) -> Record:
        """A request started."""
        if self.tracer is not None:
            self.tracer.start(record)
        return record

    def settle(self, record: Record, exc: BaseException | None) -> Awaitable[None] | None:
        """The request ended: every sink reads its record. Returns what must still be
        awaited (the limiter's usage correction), shielded: the client may hang up once
        it has its answer, which cancels the handler, and the correction must still land.
        None when nothing is pending (the common case: no coroutine made)."""
        record.ended(exc)
        pending = None
        for sink in self.sinks:
            done = sink.finish(record)
            if done is not None:
                pending = [done] if pending is None else [*pending, done]
        return None if pending is None else _shielded(pending)


async def _shielded(pending: list[Awaitable[None]]) -> None:
    for done in pending:
        await asyncio.shield(done)
