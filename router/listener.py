"""The listener's client connections: Sanic's HTTP/1.1 protocol, made strict and bounded.

Sanic's own ``HttpProtocol`` and ``Http`` leave holes that no handler or middleware can
close, because each is open before a handler runs. ``Listener`` (the protocol ``routeyard
serve`` passes to Sanic) and its ``StrictHttp`` close them, for every route alike:

- **Framing** (RFC 9112). Sanic splits the head in Python: ``Content-Length : 5`` is an
  unknown header, so the body is read as a second request; obs-fold lines and names with
  spaces are forwarded; ``int()`` takes ``0x3e``, `` 3e`` and Unicode digits as sizes.
  Here every byte a client sends goes first through llhttp (httptools: the C parser of
  Node.js, strict by default) in ``data_received``, head and body framing alike. Bytes it
  refuses never reach Sanic's buffer; the request is answered 400 and the connection
  closed. llhttp costs one C call per received chunk (about 0.6 µs for a 1.5 KB request)
  and replaces the four scans of the head ``proxy.check_head`` made (about 1 µs).
- **Time.** Sanic's request timeout restarts on every byte and stops at the head. Here a
  new connection must send its first byte within ``header_timeout`` seconds (not the
  keep-alive timeout), a head must be complete ``header_timeout`` seconds after its first
  byte, and a body must arrive at ``body_min_rate`` bytes/s on average once
  ``body_grace`` seconds have passed since the head (time the router itself does not
  read, under backpressure, does not count). Both are checked by the protocol's one
  timer, as Sanic's own timeouts are: nothing per request.
- **Order.** Sanic reads the whole body before any handler runs, and sends
  ``100 Continue`` with any answer, even a refusal. Here a body is opened only once
  ``gate`` (the key) and the size rule (``request_max_size``, for every route, streamed
  ones included) have passed; ``100 Continue`` goes out then and never otherwise. An answer
  sent while a body is unread closes the connection instead of reading the rest.
- **Count.** Past ``max_connections`` connections per worker, a new one is answered a
  canned 503 and closed.
- **Size.** A head over Sanic's ``REQUEST_MAX_HEADER_SIZE`` is a 431 (Sanic: 413).

A connection closed with bytes still coming (a refusal, an answer before the body) stops
writing and drops what still arrives for up to ``LINGER`` seconds, so that the client
reads the answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any, cast

import orjson
from httptools import HttpRequestParser
from httptools.parser.errors import HttpParserError, HttpParserUpgrade
from sanic.exceptions import ServiceUnavailable
from sanic.http import Http, Stage
from sanic.log import error_logger
from sanic.server.protocols.http_protocol import HttpProtocol

from router.errors import ClientError, PayloadTooLarge

if TYPE_CHECKING:
    from sanic import Request
    from sanic.response import BaseHTTPResponse

HTTP_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Seconds a closing connection keeps dropping what the client still sends.
LINGER = 1.0
#: Lingering connections per worker at most; past it, connections close at once.
MAX_LINGERING = 256
#: Seconds between checks of a body's rate while it arrives.
BODY_TICK = 0.5
#: The most client connections a worker holds when the fd limit does not say less.
CONNECTIONS_CEILING = 10_000

#: Runs before a request's body is read; raises (a ``RouterError``) to refuse it.
Gate = Callable[["Request"], None]


@dataclass(frozen=True, slots=True)
class Limits:
    """What a client may take of a worker: time for its head and body, connections."""

    header_timeout: float = 10.0
    body_grace: float = 10.0
    body_min_rate: float = 16 * 1024
    max_connections: int = CONNECTIONS_CEILING


def connection_limit(setting: int) -> int:
    """``ROUTEYARD_MAX_CONNECTIONS``, or (0) what this process's fd limit leaves: half of
    the soft ``RLIMIT_NOFILE`` less 64 (each client request may hold an engine connection
    too; the rest is for listening sockets, pools, logs), at most 10,000."""
    if setting > 0:
        return setting
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return CONNECTIONS_CEILING
    return max(16, min(CONNECTIONS_CEILING, (soft - 64) // 2))


def configure(app: Any, limits: Limits, gate: Gate | None) -> None:
    """Give the app's connections their limits and the check before a body is read."""
    app.ctx.listener_limits = limits
    app.ctx.listener_gate = gate


# -- the errors a connection answers ------------------------------------------------------
class MalformedRequest(ClientError):
    """Raised for bytes llhttp refuses: they are not a valid HTTP/1.1 request."""

    code = "malformed_request"

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"The request is not valid HTTP/1.1 ({reason}). Header names are tokens followed "
            "at once by a colon; header values must not contain CR, LF or NUL characters, nor "
            "other controls, and are not folded; Content-Length and chunk sizes are plain "
            "digits.")


class HeaderTooLarge(ClientError):
    status = 431
    code = "request_header_fields_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request head is larger than this router accepts ({limit} bytes "
                         "with the request line).")


class RequestTimeout(ClientError):
    status = 408
    code = "request_timeout"


def _refusal() -> bytes:
    body = orjson.dumps({"error": {
        "message": "This router worker has as many client connections open as it allows "
                   "(ROUTEYARD_MAX_CONNECTIONS); retry shortly, or on another replica.",
        "type": "server_error", "param": None, "code": "too_many_connections"}})
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%b"
            % (len(body), body))


#: The answer to a connection past the limit, made once.
REFUSAL = _refusal()
_NO_CALLBACKS = object()  # llhttp validates only: no Python callback per header


def _parser() -> HttpRequestParser:
    """llhttp, strict, except for bytes after a ``Connection: close`` request: those are
    never read (Sanic answers that request and closes), so they must not cost it its
    answer, as they would when TCP delivers both in one read."""
    parser = HttpRequestParser(_NO_CALLBACKS)
    parser.set_dangerous_leniencies(lenient_data_after_close=True)
    return parser


# -- one request's head and body ------------------------------------------------------------
class StrictHttp(Http):
    """Sanic's ``Http`` with the head's size answered 431, the refusals of ``Listener``
    raised where Sanic waits for bytes, and the body opened only through ``open_body``.

    ``http1_request_header`` and ``read`` are not coroutines themselves: in the common
    case (the head is in, the body is open) they return Sanic's own, adding no frame."""

    __slots__ = ("head_t0", "opened")
    protocol: Listener

    def __init__(self, protocol: Listener) -> None:
        super().__init__(protocol)  # type: ignore[no-untyped-call]
        #: perf_counter at the head's first byte (the whole-head deadline counts from it).
        self.head_t0 = 0.0
        #: Whether this request's body passed the checks and may be read.
        self.opened = False

    def http1_request_header(self) -> Coroutine[Any, Any, None]:
        self.head_t0 = perf_counter()
        self.opened = False
        pos = self.recv_buffer.find(b"\r\n\r\n")
        if -1 < pos < self.HEADER_MAX_SIZE and self.protocol.refused is None:
            return super().http1_request_header()  # type: ignore[no-untyped-call]
        return self._await_head()

    async def _await_head(self) -> None:
        """Until the head is in: a refusal of ``Listener`` is raised here, and a head over
        the limit is a 431."""
        protocol = self.protocol
        buf = self.recv_buffer
        limit = self.HEADER_MAX_SIZE
        start = 0
        while True:
            if protocol.refused is not None:
                raise MalformedRequest(protocol.refused)
            pos = buf.find(b"\r\n\r\n", start)
            if pos != -1:
                break
            start = max(0, len(buf) - 3)
            if start >= limit:
                raise HeaderTooLarge(limit)
            await self._receive_more()
        if pos >= limit:
            raise HeaderTooLarge(limit)
        await super().http1_request_header()  # type: ignore[no-untyped-call]

    def read(self) -> Coroutine[Any, Any, bytes | None]:
        if self.response is not None:  # answered before the body was read: not read at all
            self.stop_reading()
            return _nothing()
        if not self.opened:
            self.open_body()
        return super().read()  # Sanic's: it sends 100 Continue, if asked, on this first read

    def open_body(self) -> None:
        """The checks that need no body, before its first byte is read: the gate (the key),
        then its size against the router's one limit (a streamed route, which Sanic lets
        read without limit, or an upload route that raises its own, included)."""
        self.opened = True
        protocol = self.protocol
        self.request_max_size = min(self.request_max_size, protocol.request_max_size)
        try:
            if protocol.gate is not None:
                protocol.gate(self.request)
            size = self.request_bytes or 0
            if size > self.request_max_size:
                raise PayloadTooLarge(
                    f"The request body is {size} bytes; this router accepts at most "
                    f"{self.request_max_size} (ROUTEYARD_MAX_REQUEST_SIZE).")
        except BaseException:
            self.keep_alive = False  # the answer says close: the body stays unread
            self.expecting_continue = False
            raise

    def respond(self, response: BaseHTTPResponse) -> BaseHTTPResponse:
        # A final answer before the body was asked for: Sanic would put 100 Continue in
        # front of it (a refusal included); the client is told to close instead.
        self.expecting_continue = False
        if self.request_body and not self._drop_buffered_body():
            # the body stays unread and the connection closes after this answer: its head
            # must say so, or the client sends its next request into a closing connection
            self.keep_alive = False
        return super().respond(response)

    def _drop_buffered_body(self) -> bool:
        """An unread body that is already all in the buffer (a 404 or 405 for a small
        JSON body) is dropped, and the connection stays open."""
        left = self.request_bytes_left or 0
        framing: object = self.request_body  # Sanic: True (a length) or "chunked"
        if framing == "chunked" or left > len(self.recv_buffer):
            return False
        del self.recv_buffer[:left]
        self.request_bytes_left = 0
        self.request_body = None
        return True

    def stop_reading(self) -> None:
        """Leave the rest of the body unread: the connection closes after the answer."""
        self.keep_alive = False
        self.request_body = None
        self.protocol.linger = True

    async def error_response(self, exception: Exception) -> None:
        if self.request_body:
            self.keep_alive = False
        await super().error_response(exception)
        if self.request_body:
            self.stop_reading()


async def _nothing() -> None:
    return None


# -- the connection ---------------------------------------------------------------------------
class Listener(HttpProtocol):
    """Sanic's ``HttpProtocol`` with llhttp in front of its buffer, whole-head and body-rate
    deadlines in its timer, a connection limit and a lingering close (module docstring)."""

    HTTP_CLASS = StrictHttp
    __slots__ = ("buffer_size", "gate", "limits", "linger", "parser", "rate_b0", "rate_for",
                 "rate_t0", "refused")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ctx = self.app.ctx
        self.limits: Limits = getattr(ctx, "listener_limits", None) or Limits()
        self.gate: Gate | None = getattr(ctx, "listener_gate", None)
        self.buffer_size: int = self.app.config.REQUEST_BUFFER_SIZE
        self.parser = _parser()
        #: Why llhttp refused a byte of this connection; nothing after it is read.
        self.refused: str | None = None
        #: Close with a linger: the client may still be sending a body nobody reads.
        self.linger = False
        # the body-rate rule: the request measured, and since when and how many bytes
        self.rate_for: float | None = None
        self.rate_t0 = 0.0
        self.rate_b0 = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.connections) >= self.limits.max_connections:
            cast(asyncio.Transport, transport).write(REFUSAL)
            linger(cast(asyncio.Transport, transport))
            return
        super().connection_made(transport)  # type: ignore[no-untyped-call]

    def data_received(self, data: bytes) -> None:
        """llhttp first, then Sanic's own ``data_received`` (inlined: it runs for every
        chunk a client sends)."""
        if self.refused is not None:
            return  # nothing after a refused byte is read
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if not self._after_upgrade(data, exc):
                return
        except HttpParserError as exc:
            self.refuse(str(exc) or type(exc).__name__)
            return
        self._time = monotonic()
        buf = self.recv_buffer
        buf += data
        if len(buf) >= self.buffer_size and self.transport is not None:
            self.transport.pause_reading()
        self._data_received.set()

    def _after_upgrade(self, data: bytes, exc: HttpParserUpgrade) -> bool:
        """llhttp stops at a message asking for an upgrade (``Upgrade: h2c``, CONNECT);
        Sanic upgrades nothing here and parses what follows as the next request, so a
        fresh parser checks it."""
        while True:
            if self.parser.get_method() == b"CONNECT":  # a tunnel: not a request we serve
                self.refuse("CONNECT is not served")
                return False
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            data = data[offset:]
            self.parser = _parser()
            try:
                if data:
                    self.parser.feed_data(data)
                return True
            except HttpParserUpgrade as again:
                exc = again
            except HttpParserError as error:
                self.refuse(str(error) or type(error).__name__)
                return False

    def refuse(self, reason: str) -> None:
        """Bytes that are not HTTP/1.1: the request they belong to is answered 400 where
        Sanic waits for them, and nothing more is read from this connection."""
        self.refused = reason
        self._answer_refusal(retry=True)

    def _answer_refusal(self, retry: bool = False) -> None:
        http: StrictHttp | None = getattr(self, "_http", None)
        task = self._task
        if http is None:
            # the first bytes came before the connection's task made its Http (uvloop
            # reads in the same turn): once that task is waiting for them, wake it
            if retry and task is not None:
                self.loop.call_soon(self._answer_refusal)
            return
        http.keep_alive = False
        if http.stage is Stage.IDLE:
            self._data_received.set()  # the wait for the next head wakes and raises
        elif task is not None and (http.stage is Stage.REQUEST or http.request_body):
            http.exception = MalformedRequest(self.refused or "refused")
            task.cancel()

    def close(self, timeout: float | None = None) -> None:
        transport = self.transport
        if self.linger and transport is not None and not transport.is_closing():
            self.linger = False
            if self._callback_check_timeouts is not None:
                self._callback_check_timeouts.cancel()
            # what connection_lost would have done: the transport is the linger's now
            self.connections.discard(self)
            if self.conn_info is not None:
                self.conn_info.lost = True
            linger(transport)
            return
        super().close(timeout)

    def check_timeouts(self) -> None:
        """Sanic's timer, with the head's deadline counted from its first byte and the
        body's rate; it never sleeps past a head's whole deadline."""
        try:
            task, http = self._task, cast("StrictHttp | None", getattr(self, "_http", None))
            if task is None or http is None:
                return
            limits = self.limits
            idle = monotonic() - self._time
            stage = http.stage
            wait = limits.header_timeout  # a head may start at any moment
            if stage is Stage.IDLE:
                # a connection that never sent a byte gets the head's time, not keep-alive's
                limit = self.keep_alive_timeout if http.head_t0 else min(
                    self.keep_alive_timeout, limits.header_timeout)
                if idle > limit:
                    task.cancel()
                    return
                wait = min(wait, limit - idle)
            elif stage is Stage.REQUEST:
                left = http.head_t0 + limits.header_timeout - perf_counter()
                if left <= 0:
                    self._expire(http, RequestTimeout(
                        f"The request head was not complete {limits.header_timeout:g} s after "
                        "its first byte (ROUTEYARD_REQUEST_HEADER_TIMEOUT)."))
                    return
                if idle > self.request_timeout:
                    self._expire(http, RequestTimeout(
                        f"No byte of the request head arrived for {self.request_timeout:g} s "
                        "(ROUTEYARD_REQUEST_TIMEOUT)."))
                    return
                wait = min(left, self.request_timeout - idle)
            elif stage is Stage.HANDLER and http.upgrade_websocket:
                return
            else:
                if http.request_body:
                    if self._body_too_slow(http):
                        self._expire(http, RequestTimeout(
                            f"The request body arrived slower than {limits.body_min_rate:g} "
                            f"bytes/s after its first {limits.body_grace:g} s "
                            "(ROUTEYARD_REQUEST_BODY_MIN_RATE, ROUTEYARD_REQUEST_BODY_GRACE)."))
                        return
                    wait = min(wait, BODY_TICK)
                if idle > self.response_timeout:
                    self._expire(http, ServiceUnavailable("Response Timeout"))
                    return
                wait = min(wait, self.response_timeout - idle)
            self._callback_check_timeouts = self.loop.call_later(
                max(wait, 0.05), self.check_timeouts)
        except Exception:
            error_logger.exception("protocol.check_timeouts")

    def _body_too_slow(self, http: StrictHttp) -> bool:
        start = http.perft0
        if start is None:
            return False
        now = perf_counter()
        received = ((http.request_bytes or 0) - (http.request_bytes_left or 0)
                    + len(self.recv_buffer))
        if self.rate_for != start:  # a new request: its clock starts at its head's end
            self.rate_for, self.rate_t0, self.rate_b0 = start, start, 0
        transport = self.transport
        if transport is not None and not transport.is_reading():
            # the router holds the body back (backpressure): that time is not the client's
            self.rate_t0, self.rate_b0 = now, received
            return False
        over = now - self.rate_t0 - self.limits.body_grace
        return over > 0 and received - self.rate_b0 < self.limits.body_min_rate * over

    def _expire(self, http: StrictHttp, exc: Exception) -> None:
        """Answer ``exc`` (Sanic's error path, as its own timeouts do) and close."""
        http.exception = exc
        if self._task is not None:
            self._task.cancel()


# -- closing while the client still sends ---------------------------------------------------------
class _Discard(asyncio.Protocol):
    """What a closing connection's transport talks to: it drops what arrives, and closes
    when the client does or after ``LINGER`` seconds."""

    count = 0

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.closed = False
        _Discard.count += 1
        self.timer = asyncio.get_running_loop().call_later(LINGER, self.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        return None  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        if not self.closed:
            self.closed = True
            _Discard.count -= 1

    def close(self) -> None:
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # the client reads nothing: it gets a reset
        else:
            self.transport.close()


def linger(transport: asyncio.Transport) -> None:
    """Close ``transport`` gently: finish writing, send FIN, then drop what the client still
    sends until it closes or ``LINGER`` passes (a reset would cost it the answer)."""
    if _Discard.count >= MAX_LINGERING or not transport.can_write_eof():
        transport.close()
        return
    transport.write_eof()
    transport.set_protocol(_Discard(transport))
    transport.resume_reading()
