"""A lean HTTP/1.1 client for the hot path: keep-alive pools on asyncio + httptools.

Why not httpx or aiohttp here: one small POST over a kept-alive connection costs about
950 µs of CPU with httpx and 300 µs with aiohttp on this machine kind; this client costs a
fraction of that (docs/architecture.md has the numbers). It does only what a proxy needs:
send one request with a known body, hand back status and headers as soon as they arrive,
then the body chunk by chunk as the backend sends it, with flow control (reading from the
backend pauses while the client is slow), per-phase timeouts, and abort on close.

Errors from the socket and the parser are translated here into ``router.errors`` types.
What it keeps of a response head is bounded (``HeadLimits``: 64 KiB and 100 header lines by
default), so an engine that sends header lines forever costs the router nothing.
``Transport`` is the seam callers depend on: ``Pool`` is the real one, and
``router.upstream_mock.MockTransport`` answers from a script in memory, for tests.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httptools

from router.errors import (
    BackendHeadTooLarge,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ConnectTimeout,
)
from router.settings import UpstreamSettings

#: Pause reading from the backend while this many body bytes wait for the client; reading
#: resumes as soon as the client has taken them.
HIGH_WATER = 256 * 1024


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """Bounds on one response head: its bytes (header lines, and whatever arrived while the
    head was incomplete) and its header lines, interim 1xx answers included."""

    max_bytes: int
    max_headers: int


@functools.cache
def default_head_limits() -> HeadLimits:
    """The process's bounds, from ``ROUTEYARD_UPSTREAM_MAX_HEADER_BYTES`` and
    ``ROUTEYARD_UPSTREAM_MAX_HEADERS``; read once, for every ``Pool`` made without its own."""
    settings = UpstreamSettings()
    return HeadLimits(settings.upstream_max_header_bytes, settings.upstream_max_headers)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-phase limits of one exchange, in seconds; none of them bounds a whole body."""

    connect: float  # until the connection is up
    first_byte: float  # from sending the request until status and headers arrived
    idle: float  # the longest silence between two pieces of the body


class FlowControl(Protocol):
    """What a ``Response`` needs from whatever produces its body."""

    def pause(self) -> None:
        """Stop producing: the reader has ``HIGH_WATER`` bytes waiting."""

    def resume(self) -> None:
        """Produce again: the reader took what was waiting."""

    def abort(self) -> None:
        """Give up on the body (and let the backend know)."""


class Transport(Protocol):
    """Sends requests to one backend, like httpx's ``handle_async_request``."""

    async def handle(self, head: bytes, body: bytes, timeouts: Timeouts) -> Response:
        """Send ``head`` (request line and headers, ending in a blank line) and ``body``;
        return once status and headers arrived. Failures raise ``UpstreamError``s."""
        ...

    def close(self) -> None:
        """Drop idle connections; exchanges under way go on."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a backend listens, parsed once at config load."""

    scheme: str
    host: str
    port: int
    base_path: str
    host_header: bytes
    name: str  # the host name from the URL, for TLS server name checks

    @classmethod
    def from_url(cls, url: str, address: str | None = None) -> Origin:
        """From a backend URL; ``address`` (a resolved IP) replaces the host to connect to,
        while the Host header keeps the name."""
        parts = urlsplit(url)
        scheme = parts.scheme
        port = parts.port or (443 if scheme == "https" else 80)
        host = parts.hostname or ""
        default = (scheme == "http" and port == 80) or (scheme == "https" and port == 443)
        netloc = host if default else f"{host}:{port}"
        if ":" in host and not default:
            netloc = f"[{host}]:{port}"
        path = parts.path.rstrip("/")
        return cls(scheme, address or host, port, path, netloc.encode("idna"), host)


class Reachable(Protocol):
    """A backend as a request to it needs it: where it listens, its transport, and the
    engine key header it must carry (``router.endpoint.Endpoint`` is one)."""

    @property
    def origin(self) -> Origin: ...
    @property
    def transport(self) -> Transport: ...
    @property
    def api_key_header(self) -> str | None: ...


class Response:
    """One upstream response: status and headers now, the body as it arrives."""

    __slots__ = (
        "_buffered", "_done", "_error", "_flow", "_idle_timeout", "_loop", "_waiter", "chunks",
        "headers", "status",
    )

    def __init__(
        self, flow: FlowControl, loop: asyncio.AbstractEventLoop, idle_timeout: float
    ) -> None:
        self._flow: FlowControl | None = flow
        self._loop = loop
        self._idle_timeout = idle_timeout
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- fed by the transport ---------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        """A piece of the body arrived."""
        self.chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER and self._flow is not None:
            self._flow.pause()
        self._wake()

    def finish(self, error: Exception | None = None) -> None:
        """The body is over: complete, or broken off with ``error``."""
        self._done = True
        self._error = error
        self._flow = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by the relay -----------------------------------------------------------
    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still wait in ``chunks``)."""
        return self._done and self._error is None

    def _take(self) -> bytes:
        """Everything buffered, as one piece: chunks that arrived together leave together
        (one write to the client instead of several; no chunk waits for a later one)."""
        chunks = self.chunks
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._flow is not None:
            self._flow.resume()
        return chunk

    async def _wait(self) -> None:
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._idle_timeout, _expire, waiter, "idle")
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Yield body chunks as the backend sends them; raise if the body breaks off."""
        while True:
            if self.chunks:
                yield self._take()
            elif self._done:
                if self._error is not None:
                    raise self._error
                return
            else:
                try:
                    await self._wait()
                except BackendTimeout:
                    self.close()
                    raise

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.iter_chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Abort the backend connection unless the response already completed.

        An aborted connection is how the engine learns the client went away, so vLLM
        stops generating."""
        flow = self._flow
        if flow is not None and not self._done:
            self.finish(BackendUnavailable("response abandoned"))
            flow.abort()


def timeout_error(phase: str) -> BackendTimeout:
    return BackendTimeout(f"the backend sent nothing within the {phase} timeout")


def _expire(waiter: asyncio.Future[None], phase: str) -> None:
    if not waiter.done():
        waiter.set_exception(timeout_error(phase))


def _switched() -> BackendProtocolError:
    return BackendProtocolError(
        "the backend switched protocols (status 101), which the router does not relay")


class Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection; carries one exchange at a time. It is the
    ``FlowControl`` of the response it carries.

    It keeps its event loop: ``asyncio.get_running_loop()`` costs a ``getpid`` syscall per
    call on Python 3.11, about 8% of the router's CPU when called per request.

    The response head is bounded (``Pool.limits``): each header line is charged to
    ``head_left`` (the one counter per header), the header lines are counted against
    ``headers_left`` once the head (or an interim answer's) is complete, and while the head
    is incomplete every byte that arrives is charged to ``head_fed`` (a header line still
    being received is held by httptools, not here). Past a bound the connection is aborted
    and the exchange fails with ``BackendHeadTooLarge``."""

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.headers_ready: asyncio.Future[None] | None = None
        self.reused = False
        self.paused = False
        self.closed = False
        self.got_bytes = False
        self.until_close = False
        # What the current exchange's head may still use (set by ``_exchange``).
        self.head_left = self.headers_left = self.head_fed = 0
        self.in_head = False

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._abort_with(BackendProtocolError(f"invalid HTTP from the backend: {exc}"))
            return
        except httptools.HttpParserUpgrade:  # a 101 (failed already in on_headers_complete)
            self._abort_with(_switched())
            return
        if self.in_head:
            self.head_fed += len(data)
            if self.head_fed > self.pool.limits.max_bytes:
                self._head_too_large()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.in_head = False
        self.pool.discard(self)
        response = self.response
        if response is not None and not response._done:
            if self.until_close and response.status:
                response.finish()
            else:
                self._fail(BackendUnavailable("the backend closed the connection"))
        self.response = None
        # The parser calls back bound methods of this connection: a reference cycle that
        # only the cyclic GC would free. Nothing is parsed after this: break it.
        del self.parser

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is not None:
            self.head_left -= len(name) + len(value) + 4  # ": " and CRLF
            if self.head_left < 0:
                self._head_too_large()
            else:
                response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        status = self.parser.get_status_code()
        if status < 200:  # 100-continue and friends: wait for the real answer
            if status == 101:  # what follows is another protocol, not that answer
                self._abort_with(_switched())
                return
            self.headers_left -= len(response.headers)  # they count toward the bounds
            response.headers.clear()
            return
        if len(response.headers) > self.headers_left:
            self._head_too_large()
            return
        self.in_head = False
        response.status = status
        self.until_close = not any(
            n.lower() in (b"content-length", b"transfer-encoding") for n, _ in response.headers
        )
        ready = self.headers_ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or not response.status:
            return
        self.response = None
        keep = self.parser.should_keep_alive() and not self.until_close
        response.finish()
        if keep:
            self.pool.release(self)
        else:
            self.abort()

    # -- used by Response and Pool -------------------------------------------------------
    def _fail(self, error: Exception) -> None:
        ready = self.headers_ready
        if ready is not None and not ready.done():
            ready.set_exception(error)
        response = self.response
        self.response = None
        if response is not None and not response._done:
            if not response.status:
                # Never handed out: drop what was buffered of its head at once (the
                # exception's traceback may keep the response itself for a while).
                response.headers.clear()
            response.finish(error)

    def _abort_with(self, error: Exception) -> None:
        if not self.closed:  # (httptools may report a 101 twice: callback, then upgrade)
            self._fail(error)
            self.abort()

    def _head_too_large(self) -> None:
        limits = self.pool.limits
        if self.head_left < 0 or self.head_fed > limits.max_bytes:
            what = f"response headers over {limits.max_bytes} bytes"
        else:
            what = f"more than {limits.max_headers} response headers"
        self._abort_with(BackendHeadTooLarge(f"the backend sent {what}"))

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        self.in_head = False  # nothing more is read
        self.pool.discard(self)
        if self.transport is not None:
            self.transport.abort()


#: Opens a connection as ``loop.create_connection`` does: makes the protocol with the
#: factory, connects it to a transport and returns both; raises ``OSError`` on failure.
Opener = Callable[
    [Callable[[], Connection]], Awaitable[tuple[asyncio.BaseTransport, Connection]]
]


class Pool:
    """The ``Transport`` to one origin: idle keep-alive connections, most recently used
    first. ``opener`` replaces the TCP (or TLS) connect, e.g. with an in-memory transport."""

    def __init__(self, origin: Origin, max_idle: int = 512, opener: Opener | None = None,
                 limits: HeadLimits | None = None) -> None:
        self.origin = origin
        self.max_idle = max_idle
        self.opener = opener
        self.limits = limits if limits is not None else default_head_limits()
        self.idle: list[Connection] = []
        self.closed = False
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if origin.scheme == "https" else None
        )

    async def handle(self, head: bytes, body: bytes, timeouts: Timeouts) -> Response:
        """Send ``head`` (request line and headers, ending in a blank line) and ``body``.

        Returns once status and headers arrived. A kept-alive connection that the backend
        had already closed is retried once on a fresh connection (nothing reached the
        backend's application in that case); every other failure raises an
        ``UpstreamError``.
        """
        for attempt in (0, 1):
            conn = await self.acquire(timeouts.connect)
            try:
                return await _exchange(conn, head, body, timeouts)
            except BackendUnavailable:
                if attempt == 0 and conn.reused and not conn.got_bytes:
                    continue
                raise
        raise AssertionError("unreachable")

    async def acquire(self, connect_timeout: float) -> Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        loop = asyncio.get_running_loop()
        origin = self.origin

        def factory() -> Connection:
            return Connection(self, loop)

        try:
            opened = (
                self.opener(factory) if self.opener is not None
                else loop.create_connection(
                    factory, origin.host, origin.port,
                    ssl=self.ssl, server_hostname=origin.name if self.ssl else None,
                )
            )
            _, conn = await asyncio.wait_for(opened, connect_timeout)
        except TimeoutError:
            raise ConnectTimeout(f"connecting to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            raise BackendUnavailable(
                f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
            ) from exc
        return conn

    def release(self, conn: Connection) -> None:
        conn.headers_ready = None
        conn.got_bytes = False
        if conn.paused:
            conn.resume()
        if len(self.idle) < self.max_idle and not conn.closed and not self.closed:
            self.idle.append(conn)
        else:
            conn.abort()

    def discard(self, conn: Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        self.closed = True
        for conn in list(self.idle):
            conn.abort()
        self.idle.clear()


async def _exchange(conn: Connection, head: bytes, body: bytes, timeouts: Timeouts) -> Response:
    loop = conn.loop
    response = conn.response = Response(conn, loop, timeouts.idle)
    limits = conn.pool.limits
    conn.head_left = limits.max_bytes
    conn.headers_left = limits.max_headers
    conn.head_fed = 0
    conn.in_head = True
    ready = conn.headers_ready = loop.create_future()
    transport = conn.transport
    assert transport is not None
    if len(body) < 65536:
        transport.write(head + body)
    else:
        transport.writelines((head, body))
    timer = loop.call_later(timeouts.first_byte, _expire, ready, "first-byte")
    try:
        await ready
    except BackendTimeout:
        conn.abort()
        raise
    except BaseException:
        # Cancelled (the client left) or the connection failed: never reuse it.
        conn._fail(BackendUnavailable("request abandoned"))
        conn.abort()
        raise
    finally:
        timer.cancel()
    return response
