"""The relay: one request to one of a model's endpoints, and its answer back, bytes unchanged.

``forward`` holds an endpoint (``Cluster.lease``), sends, and retries on another endpoint
while nothing has reached the client: a connection failure or timeout before any answer,
or a 502/503 answer, with jittered exponential backoff up to ``retries.attempts`` times (a
first-byte timeout is not retried: the engine may be working on it). Then it hands the
answer to a ``Deliver`` (``send_answer`` writes it to the client; batch reads it whole)
and reports what happened in the request's ``Outcome``.

The request keeps its method, target (path and query, aliases included), end-to-end
headers and body; the router adds ``x-request-id`` and ``x-forwarded-for`` and drops
hop-by-hop headers; with tracing on, ``traceparent`` names the attempt's CLIENT span. The
answer keeps status, content type and end-to-end headers. A small body of known length is
sent in one piece; anything else, SSE above all, is relayed chunk by chunk as the backend
sends it. When the client leaves, the handler is cancelled and the backend connection is
aborted, so the engine stops generating.

A ``Placement`` (see ``router.stored_responses``) may name an endpoint to try first,
move on from answers that are not the one wanted, and watch the answer it accepts.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sanic import HTTPResponse, Request
from sanic.http import Http

from router.endpoint import Endpoint
from router.errors import QueueTimeout, StreamError, UpstreamError

if TYPE_CHECKING:
    from router.record import AttemptTrace, Outcome
    from router.snapshot import ModelEntry
    from router.upstream import Response

log = logging.getLogger("routeyard.relay")

#: RFC 9110 §7.6.1 hop-by-hop headers, plus those the router sets itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host",
    "content-length", "expect", "x-forwarded-for",
})
_RESPONSE_SKIP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
    b"trailer", b"content-length",
})
#: With tracing on, the router writes its own trace headers in place of the incoming ones.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
HOP_BY_HOP_TRACED = HOP_BY_HOP | TRACE_HEADERS
#: Where clients put their API key; never forwarded to the engine when auth is on.
CLIENT_KEY_HEADERS = frozenset({"authorization", "x-api-key"})
#: Statuses that count against a backend for outlier detection (501: the API is missing).
FAILURE_STATUSES = frozenset({500, 502, 503, 504})
#: Backend answers that are retried on another endpoint (nothing has reached the client).
RETRY_STATUSES = frozenset({502, 503})
#: Bodies of known length up to this size are read whole and sent in one write.
SMALL_BODY = 1024 * 1024

T = TypeVar("T")
#: Sees the body, or each chunk until it returns True (to learn something of the answer).
Capture = Callable[[bytes], bool]
#: Consumes an accepted answer (status and headers known) while its endpoint is held.
Deliver = Callable[["Response", "Capture | None"], Awaitable[T]]


class NotHere(Exception):
    """Every endpoint of the model passed on the request (``Placement.passes``)."""


class Placement(Protocol):
    """Where a request must go, for requests about state an engine holds."""

    @property
    def prefer(self) -> str | None:
        """The key of the endpoint to try first, when it is up and has capacity."""
        ...

    def passes(self, status: int, more: bool) -> bool:
        """Whether an answer with ``status`` is not the one wanted, so another endpoint is
        asked (``more``: another endpoint of this model is up); when none is left, the
        relay raises ``NotHere``. Only answers sent before any generation may pass."""
        ...

    def answered(self, endpoint: Endpoint, status: int) -> Capture | None:
        """The answer of ``endpoint`` is about to be delivered."""
        ...


class Outbound:
    """The request as it goes to an engine, whichever endpoint gets it."""

    __slots__ = ("body", "client_ip", "headers", "method", "request_id", "strip_keys",
                 "target")

    def __init__(self, method: str, target: str, headers: Any, body: bytes, request_id: str,
                 client_ip: str = "", strip_keys: bool = False) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.request_id = request_id
        self.client_ip = client_ip
        #: The client's API key is the router's (``auth:``): never forward it.
        self.strip_keys = strip_keys

    def head(self, endpoint: Endpoint, trace: str | None) -> bytes:
        return build_head(self.method, self.target, self.headers, endpoint, len(self.body),
                          self.request_id, self.client_ip, trace, self.strip_keys)


async def forward(model: ModelEntry, outbound: Outbound, outcome: Outcome,
                  deliver: Deliver[T], *, trace: AttemptTrace | None = None,
                  key: str | None = None, placement: Placement | None = None,
                  tried: set[Endpoint] | None = None) -> T:
    """Send ``outbound`` to one of ``model``'s endpoints, retrying before the first
    byte (module docstring), and return what ``deliver`` made of the answer.

    ``key`` is the balancing key; ``tried`` starts the set of endpoints not to use (and
    collects those tried)."""
    cluster = model.cluster
    retries = model.retries
    if tried is None:
        tried = set()
    prefer = placement.prefer if placement is not None else None
    attempt = 0
    while True:
        lease = cluster.lease(key, tried, prefer)
        prefer = None
        try:
            async with lease as endpoint:
                outcome.queue_wait += lease.waited
                outcome.backend = endpoint.key
                outcome.explain = lease.explain
                outcome.retries = attempt
                outcome.status = outcome.attempt_status = 0
                outcome.attempt_error = None
                header = trace.attempt(endpoint, attempt) if trace is not None else None
                try:
                    head = outbound.head(endpoint, header)
                    if not outcome.t_sent:
                        outcome.t_sent = perf_counter()
                    try:
                        response = await endpoint.transport.handle(head, outbound.body,
                                                                   model.timeouts)
                    except UpstreamError as exc:
                        outcome.attempt_error = exc.code or exc.type
                        cluster.failed(endpoint, str(exc))
                        tried.add(endpoint)
                        retry = (exc.retryable and attempt < retries.attempts
                                 and cluster.any_up(tried))
                        log.warning("backend %s failed before answering (request %s): %s%s",
                                    endpoint.key, outbound.request_id, exc,
                                    "; retrying on another backend" if retry else "")
                        if not retry:
                            raise
                    else:
                        try:
                            status = outcome.status = outcome.attempt_status = response.status
                            if placement is not None:
                                more = cluster.any_up(tried | {endpoint})
                                if placement.passes(status, more):
                                    tried.add(endpoint)
                                    await response.read()
                                    if more:
                                        continue  # not this endpoint's to answer: the next, now
                                    raise NotHere
                            if status in FAILURE_STATUSES:
                                cluster.failed(endpoint, f"status {status}", status)
                                retry = (status in RETRY_STATUSES and attempt < retries.attempts
                                         and cluster.any_up(tried | {endpoint}))
                            else:
                                cluster.succeeded(endpoint)
                                retry = False
                            if not retry:
                                if 300 <= status < 400:
                                    _hide_backend(response, endpoint)
                                capture = (placement.answered(endpoint, status)
                                           if placement is not None else None)
                                return await deliver(response, capture)
                            tried.add(endpoint)
                        finally:
                            response.close()  # a no-op once complete; else an abort
                finally:
                    if trace is not None:
                        trace.attempt_ended(outcome.attempt_status, outcome.attempt_error)
        except QueueTimeout:
            outcome.queue_wait += lease.waited
            outcome.queue_rejected = True
            raise
        outcome.retried_from += (endpoint.key,)
        attempt += 1
        delay = min(retries.max_backoff, retries.backoff * 2 ** (attempt - 1))
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))


def _hide_backend(response: Response, endpoint: Endpoint) -> None:
    """An engine's redirect names the address the router sent it to (Starlette builds the
    ``Location`` of its trailing-slash redirect from the Host header): make such a
    ``Location`` relative, so no backend address reaches the client."""
    origin = endpoint.origin
    prefixes = tuple(f"{scheme}://{origin.host_header.decode()}".encode()
                     for scheme in ("http", "https"))
    headers = response.headers
    for i, (name, value) in enumerate(headers):
        if name.lower() == b"location" and value.startswith(prefixes):
            rest = value.split(b"/", 3)[3] if value.count(b"/") >= 3 else b""
            path = b"/" + rest
            base = origin.base_path.encode()
            if base and path.startswith(base):
                path = path[len(base):] or b"/"
            headers[i] = (name, path)


def build_head(
    method: str,
    target: str,
    headers: Any,
    endpoint: Endpoint,
    body_length: int,
    request_id: str,
    client_ip: str,
    trace: str | None = None,
    strip_keys: bool = False,
) -> bytes:
    """The request line and headers for the backend, ending in the blank line.

    ``headers`` is the client's (anything with ``items()`` and ``get()`` of lower-case
    names). ``trace`` (header lines from ``Tracing.attempt``) replaces the incoming
    ``traceparent``/``tracestate``; without it they pass through unchanged."""
    origin = endpoint.origin
    parts = [
        f"{method} {origin.base_path}{target} HTTP/1.1\r\n"
        f"host: {origin.host_header.decode()}\r\ncontent-length: {body_length}\r\n"
    ]
    skip = HOP_BY_HOP
    if trace is not None:
        skip = HOP_BY_HOP_TRACED
        parts.append(trace)
    if strip_keys or endpoint.api_key_header is not None:
        # The client's key is the router's business, never the engine's.
        skip = skip | CLIENT_KEY_HEADERS
    if endpoint.api_key_header is not None:
        parts.append(endpoint.api_key_header)
    connection = headers.get("connection")
    if connection:
        skip = skip | {h.strip().lower() for h in connection.split(",")}
    for name, value in headers.items():
        if name not in skip:
            parts.append(f"{name}: {value}\r\n")
    if "x-request-id" not in headers:
        parts.append(f"x-request-id: {request_id}\r\n")
    forwarded = headers.get("x-forwarded-for")
    parts.append(f"x-forwarded-for: {forwarded + ', ' if forwarded else ''}{client_ip}\r\n\r\n")
    # Sanic decoded the client's header bytes as UTF-8 with surrogateescape: this gives
    # back exactly the bytes the client sent (the rest is ASCII).
    return "".join(parts).encode("utf-8", "surrogateescape")


class RelayedResponse(HTTPResponse):
    """A backend's answer on its way out: its end-to-end headers go as the bytes it sent.

    Sanic re-encodes and re-sanitizes every header of a plain ``HTTPResponse`` (a
    ``str.translate`` per value), about a tenth of the router's CPU per request. These
    headers were parsed by llhttp, which refuses CR, LF and NUL in them, and what the router
    adds (``x-request-id``, rate-limit headers) is checked where it comes from, so only
    the few headers Sanic sets itself (length, connection) are encoded here."""

    __slots__ = ("raw_headers",)

    def __init__(self, body: bytes | None, status: int,
                 raw_headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(body, status)
        self.raw_headers = raw_headers

    @property
    def processed_headers(self) -> Iterator[tuple[bytes, bytes]]:
        yield from self.raw_headers
        for name, value in self.headers.items():
            yield name.encode("ascii"), str(value).encode("ascii")


def _has_message_body(status: int) -> bool:
    """RFC 9110 §6.4.1: 1xx, 204 and 304 answers have no body."""
    return not (status < 200 or status in (204, 304))


def _cut(request: Request, stream: HTTPResponse) -> None:
    """End a response whose body broke off: the client's connection is closed, so it sees
    a truncated body, never a clean end. Sanic is told the response is over (no more to
    send), else it would end it itself once the handler returns: a chunked body's last
    chunk on a closed connection, or, with a content length, an ERROR and a traceback
    ("Response was smaller than content-length") for what the engine did."""
    request.transport.close()
    http = stream.stream
    if isinstance(http, Http):
        http.response_func = None  # type: ignore[assignment]  # as Sanic does at a body's end
        http.keep_alive = False


async def send_answer(request: Request, response: Response, outcome: Outcome,
                      request_id: str, stream_error: StreamError | None,
                      extra_headers: list[tuple[str, str]] | None = None,
                      capture: Capture | None = None) -> None:
    """Send ``response`` (status, headers, body) to the client: in one write when small
    and complete, else chunk by chunk, counting it in ``outcome``. If the engine's stream
    breaks off after the head went out, an SSE stream ends with ``stream_error``'s event,
    anything else is cut (the client sees a truncated body, not a clean end)."""
    content_type = b""
    length = -1
    headers: list[tuple[bytes, bytes]] = []
    has_request_id = False
    for header in response.headers:
        lname = header[0].lower()
        if lname == b"content-type":
            content_type = header[1]
        elif lname in _RESPONSE_SKIP:
            if lname == b"content-length":
                length = int(header[1])
            continue
        elif lname == b"x-request-id":
            has_request_id = True
        headers.append(header)
    if not has_request_id:
        headers.append((b"x-request-id", request_id.encode("utf-8", "surrogateescape")))
    if extra_headers:
        headers.extend((n.encode("ascii"), v.encode("ascii")) for n, v in extra_headers)
    if outcome.explain:
        headers.extend(outcome.explain)
    status = response.status
    if not content_type and _has_message_body(status):
        # RFC 9110 §8.3: a recipient may assume this when the sender names no type.
        content_type = b"application/octet-stream"
        headers.append((b"content-type", content_type))

    is_sse = content_type.startswith(b"text/event-stream")
    if response.complete or (0 <= length <= SMALL_BODY and not is_sse):
        try:
            body = await response.read()
        except UpstreamError as exc:
            # Nothing went to the client yet: it gets the router's error (502, 504).
            log.warning("backend answer broke off before it was relayed (request %s): %s",
                        request_id, exc)
            raise
        outcome.body(body, content_type.decode("latin-1"))
        if capture is not None:
            capture(body)
        relayed = RelayedResponse(body, status, headers)
        sent = await request.respond(relayed)
        await sent.send()  # head and body in one write, before the caller's bookkeeping
        return None

    relayed = RelayedResponse(None, status, headers)
    if length >= 0:
        relayed.headers["content-length"] = length
    stream = await request.respond(relayed)
    assert stream is not None
    try:
        async for chunk in response.iter_chunks():
            outcome.chunk(chunk)
            if capture is not None and capture(chunk):
                capture = None
            await stream.send(chunk)
    except UpstreamError as exc:
        # Headers are gone already: the status cannot change any more.
        log.warning("backend stream broke off (request %s): %s", request_id, exc)
        outcome.error = outcome.attempt_error = exc.code or exc.type
        if is_sse and stream_error is not None and length < 0:
            await stream.send(stream_error(exc, request_id))
            await stream.eof()
        else:
            _cut(request, stream)
        return None
    await stream.eof()
    return None
