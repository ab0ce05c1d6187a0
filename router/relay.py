"""Relay one request to a backend and its response back, bytes unchanged.

The request keeps its method, target (path and query, aliases included), end-to-end
headers and body; the router adds ``x-request-id`` and ``x-forwarded-for`` and drops
hop-by-hop headers; with tracing on, ``traceparent`` names the attempt's CLIENT span. The
response keeps status, content type and end-to-end headers. A small body of known length
is sent in one piece; anything else, SSE above all, is relayed chunk by chunk as the
backend sends it. When the client leaves, the handler is cancelled and the backend
connection is aborted, so the engine stops generating.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sanic import HTTPResponse, Request
from sanic.helpers import has_message_body

from router import upstream
from router.cluster import FAILURE_STATUSES, Cluster, Endpoint
from router.config import OutlierDetection
from router.errors import QueueTimeout, ResponseNotFound, StreamError, UpstreamError
from router.snapshot import ModelEntry

if TYPE_CHECKING:
    from router.telemetry import Exchange

log = logging.getLogger("routeyard.relay")

_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A unique id without a syscall per request: a random per-process prefix and a counter."""
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"

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
#: Backend answers that are retried on another endpoint (nothing has reached the client).
RETRY_STATUSES = frozenset({502, 503})
#: Bodies of known length up to this size are read whole and sent in one write.
SMALL_BODY = 1024 * 1024


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


def unsafe_head(head: bytes) -> bool:
    """Whether a client's request head holds a bare CR or LF or a NUL.

    Sanic's parser splits header lines on CRLF only, so ``X-Request-Id: a\nInjected: b``
    arrives as one value; forwarded, it would become two headers at the engine, and echoed
    it would split the response. Four scans of the head in C, well under a microsecond."""
    crlf = head.count(b"\r\n")
    return head.count(b"\n") != crlf or head.count(b"\r") != crlf or b"\0" in head


@dataclass(frozen=True, slots=True)
class Pin:
    """A request about a stored Responses API answer (``router.response_ids``).

    ``backend``: the endpoint key that holds it, tried first when it is up; ``probe``: a
    404 answer (vLLM's "Response with id … not found", sent before any generation) moves
    on to the model's next backend instead of being the answer; ``found``: called with the
    endpoint that accepted a probed request (it holds the answer asked about);
    ``capture``: called with (endpoint, the first bytes of a 2xx answer) until it returns
    True, to learn the id of a new answer."""

    backend: str | None = None
    probe: bool = False
    found: Callable[[Endpoint], None] | None = None
    capture: Callable[[Endpoint, bytes], bool] | None = None


#: Builds the head for one attempt: (endpoint, trace header lines or None) → bytes.
HeadBuilder = Callable[[Endpoint, "str | None"], bytes]


async def forward(
    request: Request,
    model: ModelEntry,
    body: bytes,
    request_id: str,
    stream_error: StreamError | None,
    key: str | None,
    outlier: OutlierDetection,
    on_eject: Callable[[Endpoint], None],
    ex: Exchange | None = None,
    extra_headers: list[tuple[str, str]] | None = None,
    strip_keys: bool = False,
    pin: Pin | None = None,
) -> None:
    """Send the request to one of the model's endpoints and relay the answer.

    ``extra_headers`` go on the response (rate-limit headers); ``strip_keys`` keeps the
    client's API key from the engine (it is the router's key, not the engine's); ``pin``
    places requests about stored Responses API answers."""
    head = head_builder(request, len(body), request_id, strip_keys)
    endpoint, response = await exchange(model, head, body, key, outlier, on_eject, ex, pin)
    capture = None
    if pin is not None and 200 <= response.status < 300:
        if pin.found is not None:
            pin.found(endpoint)
        if pin.capture is not None:
            capture = partial(pin.capture, endpoint)
    try:
        await relay(request, response, request_id, stream_error, ex, extra_headers, capture)
    finally:
        _release(model, endpoint, response, ex)


def _release(model: ModelEntry, endpoint: Endpoint, response: upstream.Response,
             ex: Exchange | None) -> None:
    """The end of an attempt that got an answer, however it ended: the response closed
    (a no-op once complete; else the connection is aborted, so the engine stops
    generating), the endpoint released, the attempt's CLIENT span ended."""
    response.close()
    model.cluster.release(endpoint)
    if ex is not None and ex.client_span is not None:
        ex.end_attempt()


def head_builder(request: Request, length: int, request_id: str,
                 strip_keys: bool) -> HeadBuilder:
    """The request's head for whichever endpoint an attempt picks (``build_head``)."""
    method, target = request.method, request.raw_url.decode("latin-1")
    headers = request.headers
    client_ip = request.conn_info.client_ip if request.conn_info else ""

    def head(endpoint: Endpoint, trace: str | None) -> bytes:
        return build_head(method, target, headers, endpoint, length, request_id, client_ip,
                          trace, strip_keys)

    return head


async def forward_stored(
    request: Request,
    response_id: str,
    holders: list[tuple[ModelEntry, str | None]],
    request_id: str,
    outlier: OutlierDetection,
    on_eject: Callable[[Endpoint], None],
    found: Callable[[ModelEntry, Endpoint], None],
    strip_keys: bool = False,
    ex: Exchange | None = None,
) -> None:
    """A request about a stored Responses API answer (``GET``/``cancel`` by id), which
    names no model: ask the backends of each (model, backend known to hold it) in turn,
    each backend once, and relay the first answer that is not a 404 (``found`` learns
    where it was), or the last 404. A model whose backends cannot answer now (none up,
    queue full, connection failures) is passed over while another model is left."""
    body = request.body
    head = head_builder(request, len(body), request_id, strip_keys)
    asked: set[Endpoint] = set()
    for n, (model, backend) in enumerate(holders, 1):
        last = n == len(holders)
        if asked.issuperset(model.cluster.endpoints):
            if last:
                raise ResponseNotFound(response_id)
            continue  # its backends (shared with a model asked before) said 404 already
        if ex is not None:
            ex.matched(model.name, model)
        try:
            endpoint, response = await exchange(model, head, body, None, outlier, on_eject,
                                                ex, Pin(backend, probe=True), asked)
        except (UpstreamError, QueueTimeout):
            if not last:
                continue
            raise
        try:
            if response.status == 404 and not last:
                asked.add(endpoint)
                await response.read()
                continue
            if response.status < 500 and response.status != 404:
                found(model, endpoint)
            await relay(request, response, request_id, None, ex)
            return
        finally:
            _release(model, endpoint, response, ex)


async def exchange(
    model: ModelEntry,
    head: HeadBuilder,
    body: bytes,
    key: str | None,
    outlier: OutlierDetection,
    on_eject: Callable[[Endpoint], None],
    ex: Exchange | None = None,
    pin: Pin | None = None,
    tried: set[Endpoint] | None = None,
) -> tuple[Endpoint, upstream.Response]:
    """Pick an endpoint, send, and return it with the response's status and headers.

    The endpoint stays acquired: the caller must ``model.cluster.release`` it once the
    response is consumed. A failure before any byte went to the client (connect error or
    timeout, connection reset, a 502/503 answer) is retried on another endpoint that is
    up, with jittered exponential backoff, up to ``retries.attempts`` times. A first-byte
    timeout is not retried (the engine may be working on it; waiting that long twice helps
    nobody). ``ex``, when metrics, tracing or the access log are on, records what
    happened. ``pin`` (see ``Pin``) tries one backend first and may probe on 404;
    ``tried`` starts the set of endpoints not to use (and collects those tried)."""
    cluster = model.cluster
    retries = model.retries
    if tried is None:
        tried = set()
    attempt = 0
    first = pin.backend if pin is not None else None
    probe = pin is not None and pin.probe
    while True:
        endpoint = cluster.try_acquire_member(first) if first is not None else None
        first = None
        if endpoint is None:
            endpoint = cluster.try_acquire(key, tried) or await _queue(cluster, key, tried, ex)
        trace = ex.chosen(endpoint, attempt) if ex is not None else None
        done = False
        try:
            request_head = head(endpoint, trace)
            if ex is not None and not ex.t_sent:
                ex.t_sent = perf_counter()
            try:
                response = await upstream.request(
                    endpoint.pool,
                    request_head,
                    body,
                    connect_timeout=model.connect_timeout,
                    first_byte_timeout=model.first_byte_timeout,
                    idle_timeout=model.idle_timeout,
                )
            except UpstreamError as exc:
                if ex is not None:
                    ex.attempt_failed(exc.code or exc.type)
                if endpoint.record_failure(str(exc), outlier):
                    on_eject(endpoint)
                tried.add(endpoint)
                if not (exc.retryable and attempt < retries.attempts and cluster.any_up(tried)):
                    raise
            else:
                status = response.status
                if ex is not None:
                    ex.status = ex.attempt_status = status
                if status == 404 and probe and cluster.any_up(tried | {endpoint}):
                    # Not this backend's answer: ask the next one, at once.
                    tried.add(endpoint)
                    try:
                        await response.read()
                    finally:
                        response.close()
                    continue
                if status not in FAILURE_STATUSES:
                    endpoint.record_success()
                    done = True
                    return endpoint, response
                if endpoint.record_failure(f"status {status}", outlier):
                    on_eject(endpoint)
                if not (status in RETRY_STATUSES and attempt < retries.attempts
                        and cluster.any_up(tried | {endpoint})):
                    done = True
                    return endpoint, response
                response.close()
                tried.add(endpoint)
        finally:
            if not done:
                cluster.release(endpoint)
                if ex is not None and ex.client_span is not None:
                    ex.end_attempt()
        if ex is not None:
            ex.retrying()
        attempt += 1
        delay = min(retries.max_backoff, retries.backoff * 2 ** (attempt - 1))
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))


async def _queue(
    cluster: Cluster, key: str | None, tried: set[Endpoint], ex: Exchange | None
) -> Endpoint:
    """The slow path of acquiring an endpoint: wait in the model's queue (or fail)."""
    if ex is None:
        return await cluster.acquire(key, tried)
    series = ex.model_series()
    start = perf_counter()
    try:
        endpoint = await cluster.acquire(key, tried)
    except QueueTimeout:
        if series is not None:
            series.rejected.inc()
        raise
    waited = perf_counter() - start
    ex.queue_wait += waited
    if series is not None:
        series.queue_wait.observe(waited)
    return endpoint


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


async def relay(
    request: Request, response: upstream.Response, request_id: str,
    stream_error: StreamError | None,
    ex: Exchange | None, extra_headers: list[tuple[str, str]] | None = None,
    capture: Callable[[bytes], bool] | None = None,
) -> None:
    """Send ``response`` (status, headers, body) to the client: in one write when small
    and complete, else chunk by chunk. ``capture`` sees the body, or each chunk until it
    returns True. The caller closes ``response`` (``_release``)."""
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
    status = response.status
    if not content_type and has_message_body(status):
        # RFC 9110 §8.3: a recipient may assume this when the sender names no type.
        content_type = b"application/octet-stream"
        headers.append((b"content-type", content_type))

    is_sse = content_type.startswith(b"text/event-stream")
    if response.complete or (0 <= length <= SMALL_BODY and not is_sse):
        body = await response.read()
        if ex is not None:
            ex.body(body, content_type.decode("latin-1"))
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
        if ex is None and capture is None:
            async for chunk in response.iter_chunks():
                await stream.send(chunk)
        else:
            async for chunk in response.iter_chunks():
                if ex is not None:
                    ex.chunk(chunk)
                if capture is not None and capture(chunk):
                    capture = None
                await stream.send(chunk)
    except UpstreamError as exc:
        # Headers are gone already: the status cannot change any more.
        log.warning("backend stream broke off (request %s): %s", request_id, exc)
        if ex is not None:
            ex.error = ex.attempt_error = exc.code or exc.type
        if is_sse and stream_error is not None and length < 0:
            await stream.send(stream_error(exc, request_id))
            await stream.eof()
        else:
            request.transport.close()  # the client sees a truncated body, not a clean end
        return None
    await stream.eof()
    return None
