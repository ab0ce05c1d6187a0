"""router/upstream.py without sockets: the real Connection and httptools over an in-memory
asyncio transport, and MockTransport's own contract."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

import pytest

from router.errors import (
    BackendHeadTooLarge,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ConnectTimeout,
)
from router.record import Outcome
from router.relay import forward
from router.upstream import (
    HIGH_WATER,
    Connection,
    HeadLimits,
    Origin,
    Pool,
    Response,
    Timeouts,
    Transport,
    default_head_limits,
)
from router.upstream_mock import MockReply, MockRequest, MockTransport
from tests.unit.core import Fleet, answers, assert_idle, model_of, outbound, read_all, reply

FAST = Timeouts(connect=0.05, first_byte=0.05, idle=0.05)
SLOW = Timeouts(connect=5, first_byte=5, idle=5)
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: engine\r\nContent-Length: 2\r\n\r\n"
BODY = b"{}"


class FakeTransport(asyncio.Transport):
    """The socket side of one connection: records writes, lets the test play the peer."""

    def __init__(self, protocol: Connection) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.wrote = asyncio.Event()
        self.reading = True
        self.aborted = False
        self.closing = False

    # -- what the Connection calls ---------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        self.wrote.set()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def abort(self) -> None:
        self.aborted = True
        self._lose()

    def close(self) -> None:
        self._lose()

    # -- what the test does as the backend ---------------------------------------------
    def _lose(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    async def request(self) -> bytes:
        """Wait until a request was written; return (and forget) it."""
        await self.wrote.wait()
        self.wrote.clear()
        data = bytes(self.written)
        self.written.clear()
        return data

    def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.protocol.data_received(piece)

    def hang_up(self) -> None:
        """The backend closes its end."""
        self.closing = True
        self.protocol.connection_lost(None)


class Network:
    """An ``Opener`` for Pool: every connect makes a FakeTransport (or fails as told)."""

    def __init__(self) -> None:
        self.transports: list[FakeTransport] = []
        self.opened: asyncio.Queue[FakeTransport] = asyncio.Queue()
        self.failure: OSError | None = None
        self.hang = False

    async def open(
        self, factory: Callable[[], Connection]
    ) -> tuple[asyncio.BaseTransport, Connection]:
        if self.hang:
            await asyncio.get_running_loop().create_future()
        if self.failure is not None:
            raise self.failure
        protocol = factory()
        transport = FakeTransport(protocol)
        protocol.connection_made(transport)
        self.transports.append(transport)
        self.opened.put_nowait(transport)
        return transport, protocol

    async def next(self) -> FakeTransport:
        return await asyncio.wait_for(self.opened.get(), 1)


@pytest.fixture
def network() -> Network:
    return Network()


@pytest.fixture
def pool(network: Network) -> Pool:
    return Pool(Origin.from_url("http://engine:8000"), opener=network.open)


def start(pool: Pool, timeouts: Timeouts = SLOW) -> asyncio.Task[Response]:
    return asyncio.ensure_future(pool.handle(HEAD, BODY, timeouts))


async def answer(pool: Pool, network: Network, *pieces: bytes) -> Response:
    """One exchange on a new connection whose backend sends ``pieces``."""
    task = start(pool)
    transport = await network.next()
    assert await transport.request() == HEAD + BODY
    transport.send(*pieces)
    return await task


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


# -- response parsing through the real Connection and httptools ----------------------------

async def test_content_length_body(pool: Pool, network: Network) -> None:
    response = await answer(pool, network, OK)
    assert response.status == 200
    assert response.headers == [(b"content-length", b"5")]
    assert response.complete
    assert await response.read() == b"hello"


async def test_headers_kept_as_sent(pool: Pool, network: Network) -> None:
    response = await answer(
        pool, network,
        b"HTTP/1.1 201 Created\r\nX-Request-ID: abc\r\nSet-Cookie: a=1\r\n"
        b"set-cookie: b=2\r\nContent-Length: 0\r\n\r\n",
    )
    assert response.status == 201
    assert response.headers == [
        (b"X-Request-ID", b"abc"), (b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"),
        (b"Content-Length", b"0"),
    ]
    assert await response.read() == b""


async def test_chunked_body_split_across_reads(pool: Pool, network: Network) -> None:
    wire = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    task = start(pool)
    transport = await network.next()
    await transport.request()
    head_end = wire.index(b"\r\n\r\n") + 4
    transport.send(*(wire[i:i + 1] for i in range(head_end)))
    response = await task
    assert response.status == 200 and not response.complete
    chunks = response.iter_chunks()
    transport.send(*(wire[i:i + 1] for i in range(head_end, len(wire))))
    assert [chunk async for chunk in chunks] == [b"hello world"]
    assert response.complete
    assert pool.idle == [transport.protocol]


async def test_body_until_close(pool: Pool, network: Network) -> None:
    response = await answer(pool, network, b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart 1,")
    assert not response.complete
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"part 1,"
    transport = network.transports[0]
    transport.send(b" part 2")
    transport.hang_up()
    assert [chunk async for chunk in chunks] == [b" part 2"]
    assert response.complete
    assert pool.idle == []


async def test_interim_answers_are_skipped(pool: Pool, network: Network) -> None:
    response = await answer(
        pool, network,
        b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK,
    )
    assert response.status == 200
    assert response.headers == [(b"content-length", b"5")]
    assert await response.read() == b"hello"


async def test_invalid_http_is_a_protocol_error(pool: Pool, network: Network) -> None:
    with pytest.raises(BackendProtocolError):
        await answer(pool, network, b"SPDY/9 nonsense\r\n\r\n")
    assert network.transports[0].aborted
    assert pool.idle == []


async def test_invalid_http_mid_body(pool: Pool, network: Network) -> None:
    response = await answer(
        pool, network, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    network.transports[0].send(b"zz\r\n")
    with pytest.raises(BackendProtocolError):
        await response.read()
    assert network.transports[0].aborted


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
])
async def test_switching_protocols_is_a_protocol_error(
    pool: Pool, network: Network, head: bytes
) -> None:
    """What follows a 101 is not HTTP: the exchange fails (httptools' upgrade signal does
    not escape ``data_received``, where asyncio would log it as a fatal error)."""
    with pytest.raises(BackendProtocolError, match="switched protocols"):
        await answer(pool, network, head + b"\x81\x05hello")
    assert network.transports[0].aborted
    assert pool.idle == []


def test_protocol_errors_are_retryable_502s() -> None:
    for error in (BackendProtocolError("x"), BackendHeadTooLarge("x")):
        assert isinstance(error, BackendProtocolError)
        assert error.retryable and error.status == 502
        assert error.code == "backend_protocol_error"


async def test_large_body_is_written_in_two_pieces(pool: Pool, network: Network) -> None:
    body = b"x" * 70000
    task = asyncio.ensure_future(pool.handle(HEAD, body, SLOW))
    transport = await network.next()
    assert await transport.request() == HEAD + body
    transport.send(OK)
    assert (await task).status == 200


# -- keep-alive ------------------------------------------------------------------------------

async def test_keep_alive_reuses_the_idle_connection(pool: Pool, network: Network) -> None:
    first = await answer(pool, network, OK)
    assert await first.read() == b"hello"
    transport = network.transports[0]
    assert pool.idle == [transport.protocol]
    task = start(pool)
    assert await transport.request() == HEAD + BODY
    transport.send(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye")
    assert await (await task).read() == b"bye"
    assert len(network.transports) == 1
    assert pool.idle == [transport.protocol]


async def test_connection_close_is_not_kept(pool: Pool, network: Network) -> None:
    response = await answer(
        pool, network, b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
    )
    assert await response.read() == b"ok"
    assert network.transports[0].aborted
    assert pool.idle == []


async def test_stale_kept_alive_connection_is_retried_once(
    pool: Pool, network: Network
) -> None:
    await (await answer(pool, network, OK)).read()
    stale = network.transports[0]
    task = start(pool)
    await stale.request()
    stale.hang_up()  # closed by the backend before it read the request
    fresh = await network.next()
    assert await fresh.request() == HEAD + BODY
    fresh.send(OK)
    assert await (await task).read() == b"hello"
    assert pool.idle == [fresh.protocol]


async def test_no_retry_after_bytes_arrived(pool: Pool, network: Network) -> None:
    await (await answer(pool, network, OK)).read()
    transport = network.transports[0]
    task = start(pool)
    await transport.request()
    transport.send(b"HTTP/1.1 200 OK\r\n")
    transport.hang_up()
    with pytest.raises(BackendUnavailable):
        await task
    assert len(network.transports) == 1


async def test_no_retry_on_a_fresh_connection(pool: Pool, network: Network) -> None:
    task = start(pool)
    transport = await network.next()
    await transport.request()
    transport.hang_up()
    with pytest.raises(BackendUnavailable):
        await task
    assert len(network.transports) == 1


async def test_closed_idle_connection_is_skipped(pool: Pool, network: Network) -> None:
    await (await answer(pool, network, OK)).read()
    network.transports[0].closing = True  # closing, its connection_lost not yet run
    response = await answer(pool, network, OK)
    assert response.status == 200
    assert len(network.transports) == 2


async def test_pool_close_aborts_idle_connections(pool: Pool, network: Network) -> None:
    await (await answer(pool, network, OK)).read()
    pool.close()
    assert network.transports[0].aborted
    assert pool.idle == []


# -- timeouts, abort, flow control ---------------------------------------------------------------

async def test_first_byte_timeout(pool: Pool, network: Network) -> None:
    task = start(pool, FAST)
    transport = await network.next()
    with pytest.raises(BackendTimeout, match="first-byte"):
        await task
    assert transport.aborted
    assert pool.idle == []


async def test_idle_timeout_mid_body(pool: Pool, network: Network) -> None:
    task = start(pool, FAST)
    transport = await network.next()
    await transport.request()
    transport.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    response = await task
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"abc"
    with pytest.raises(BackendTimeout, match="idle"):
        await anext(chunks)
    assert transport.aborted
    assert not response.complete


async def test_close_aborts_an_incomplete_response(pool: Pool, network: Network) -> None:
    response = await answer(pool, network, b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    response.close()
    transport = network.transports[0]
    assert transport.aborted
    with pytest.raises(BackendUnavailable):
        await response.read()
    assert pool.idle == []
    await answer(pool, network, OK)
    assert len(network.transports) == 2


async def test_close_after_complete_keeps_the_connection(pool: Pool, network: Network) -> None:
    response = await answer(pool, network, OK)
    response.close()
    assert not network.transports[0].aborted
    assert pool.idle == [network.transports[0].protocol]


async def test_cancelled_request_aborts(pool: Pool, network: Network) -> None:
    task = start(pool)
    transport = await network.next()
    await transport.request()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.aborted


async def test_flow_control(pool: Pool, network: Network) -> None:
    size = 2 * HIGH_WATER
    response = await answer(
        pool, network, f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n".encode()
    )
    transport = network.transports[0]
    transport.send(b"a" * HIGH_WATER)
    assert transport.reading
    transport.send(b"b")
    assert not transport.reading
    chunks = response.iter_chunks()
    assert len(await anext(chunks)) == HIGH_WATER + 1
    assert transport.reading
    transport.send(b"c" * (size - HIGH_WATER - 1))
    assert len(await anext(chunks)) == size - HIGH_WATER - 1
    assert response.complete


# -- connecting -----------------------------------------------------------------------------------

async def test_connect_refused(pool: Pool, network: Network) -> None:
    network.failure = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    with pytest.raises(BackendUnavailable, match="engine:8000: Connection refused"):
        await pool.handle(HEAD, BODY, SLOW)


async def test_connect_timeout(pool: Pool, network: Network) -> None:
    network.hang = True
    with pytest.raises(ConnectTimeout, match="connecting to engine:8000 timed out"):
        await pool.handle(HEAD, BODY, FAST)


def test_both_are_transports() -> None:
    transports: list[Transport] = [
        Pool(Origin.from_url("http://engine")), MockTransport(lambda r: MockReply())
    ]
    assert all(callable(t.handle) and callable(t.close) for t in transports)


# -- MockTransport ------------------------------------------------------------------------------

async def test_mock_records_and_parses_requests() -> None:
    mock = MockTransport(lambda request: MockReply(204))
    response = await mock.handle(HEAD, BODY, SLOW)
    assert response.status == 204 and response.complete
    assert await response.read() == b""
    (request,) = mock.requests
    assert (request.method, request.target, request.body) == ("POST", "/v1/chat/completions", BODY)
    assert request.headers == [("host", "engine"), ("content-length", "2")]
    assert request.header("host") == "engine" and request.header("x-missing") is None
    assert request.head == HEAD and not request.aborted
    mock.close()
    mock.close()
    assert mock.closed == 2


async def test_mock_chunks_and_delays() -> None:
    headers = [(b"Content-Type", b"text/event-stream")]
    mock = MockTransport(lambda r: MockReply(200, headers, [b"a", b"b", 0.01, b"c", 0.0]))
    response = await mock.handle(HEAD, BODY, SLOW)
    assert response.headers == headers
    assert [chunk async for chunk in response.iter_chunks()] == [b"ab", b"c"]
    assert response.complete and not mock.requests[0].aborted


async def test_mock_async_handler() -> None:
    async def handler(request: MockRequest) -> MockReply:
        await asyncio.sleep(0)
        return MockReply(200, [], [request.body])

    response = await MockTransport(handler).handle(HEAD, BODY, SLOW)
    assert await response.read() == BODY


@pytest.mark.parametrize("delay", [False, True])
async def test_mock_body_breaks_off(delay: bool) -> None:
    error = BackendUnavailable("the backend closed the connection")
    script: list[bytes | float | Exception] = [b"a", 0.0, error] if delay else [b"a", error]
    response = await MockTransport(lambda r: MockReply(200, [], script)).handle(HEAD, b"", SLOW)
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"a"
    with pytest.raises(BackendUnavailable) as raised:
        await anext(chunks)
    assert raised.value is error
    assert not response.complete


async def test_mock_handler_raises() -> None:
    def refuse(request: MockRequest) -> MockReply:
        raise ConnectTimeout("connecting to engine:8000 timed out")

    with pytest.raises(ConnectTimeout):
        await MockTransport(refuse).handle(HEAD, BODY, SLOW)


async def test_mock_first_byte_timeout() -> None:
    never = asyncio.Event()

    async def silent(request: MockRequest) -> MockReply:
        await never.wait()
        return MockReply()

    mock = MockTransport(silent)
    with pytest.raises(BackendTimeout, match="first-byte"):
        await mock.handle(HEAD, BODY, FAST)
    assert mock.requests[0].aborted


async def test_mock_idle_timeout() -> None:
    mock = MockTransport(lambda r: MockReply(200, [], [b"a", 5.0, b"b"]))
    response = await mock.handle(HEAD, BODY, FAST)
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"a"
    with pytest.raises(BackendTimeout, match="idle"):
        await anext(chunks)
    assert mock.requests[0].aborted


async def test_mock_close_before_complete_aborts() -> None:
    mock = MockTransport(lambda r: MockReply(200, [], [b"a", 5.0, b"b"]))
    response = await mock.handle(HEAD, BODY, SLOW)
    response.close()
    assert mock.requests[0].aborted
    with pytest.raises(BackendUnavailable):
        await response.read()


async def test_mock_close_after_complete_does_not_abort() -> None:
    mock = MockTransport(lambda r: MockReply(200, [], [b"a"]))
    response = await mock.handle(HEAD, BODY, SLOW)
    response.close()
    assert not mock.requests[0].aborted
    assert await response.read() == b"a"


async def test_mock_flow_control() -> None:
    big = b"x" * HIGH_WATER
    mock = MockTransport(lambda r: MockReply(200, [], [big, b"y", b"z"]))
    response = await mock.handle(HEAD, BODY, SLOW)
    assert list(response.chunks) == [big, b"y"]  # paused past HIGH_WATER
    assert await response.read() == big + b"yz"
    assert response.complete



# -- the response head's bounds ----------------------------------------------------------------

def header_lines(count: int, size: int = 20) -> bytes:
    """``count`` header lines of ``size`` bytes each, CRLF included."""
    return b"".join(b"X-%04d: " % i + b"v" * (size - 10) + b"\r\n" for i in range(count))


async def over_bound(pool: Pool, network: Network, *pieces: bytes) -> BackendHeadTooLarge:
    """The exchange fails with ``BackendHeadTooLarge`` once the backend sent ``pieces``
    (those after the connection was aborted are not sent); nothing of the head is kept."""
    idle = pool.idle[-1].transport if pool.idle else None
    task = start(pool)
    transport = idle if isinstance(idle, FakeTransport) else await network.next()
    await transport.request()
    conn = transport.protocol
    assert conn.response is not None
    kept = conn.response.headers
    for piece in pieces:
        if not transport.aborted:
            transport.send(piece)
    with pytest.raises(BackendHeadTooLarge) as raised:
        await asyncio.wait_for(task, 1)
    assert transport.aborted
    await asyncio.sleep(0)  # connection_lost
    assert kept == [] and conn.response is None
    assert not hasattr(conn, "parser")  # the connection <-> parser cycle is broken
    assert pool.idle == []
    return raised.value


async def test_more_than_100_headers(pool: Pool, network: Network) -> None:
    error = await over_bound(pool, network, b"HTTP/1.1 200 OK\r\n" + header_lines(101)
                             + b"content-length: 0\r\n\r\n")
    assert "more than 100 response headers" in str(error)


async def test_100_headers_pass(pool: Pool, network: Network) -> None:
    response = await answer(pool, network, b"HTTP/1.1 200 OK\r\n" + header_lines(99)
                            + b"content-length: 0\r\n\r\n")
    assert response.status == 200 and len(response.headers) == 100


async def test_65_kib_of_headers(pool: Pool, network: Network) -> None:
    error = await over_bound(pool, network, b"HTTP/1.1 200 OK\r\n" + header_lines(65, 1024)
                             + b"content-length: 0\r\n\r\n")
    assert "over 65536 bytes" in str(error)


async def test_63_kib_of_headers_pass(pool: Pool, network: Network) -> None:
    response = await answer(pool, network, b"HTTP/1.1 200 OK\r\n" + header_lines(63, 1024)
                            + b"content-length: 2\r\n\r\nok")
    assert response.status == 200 and await response.read() == b"ok"


async def test_a_header_line_that_never_ends(pool: Pool, network: Network) -> None:
    """The line httptools is still collecting counts too: every byte that arrives while
    the head is incomplete."""
    await over_bound(pool, network, b"HTTP/1.1 200 OK\r\nX-a: ",
                     *(b"b" * 4096 for _ in range(17)))


async def test_endless_header_lines_in_small_pieces(pool: Pool, network: Network) -> None:
    """Header lines one by one, never the blank line: the byte bound ends it (the count is
    checked once the head is complete)."""
    error = await over_bound(pool, network, b"HTTP/1.1 200 OK\r\n",
                             *(header_lines(1) for _ in range(4000)))
    assert "over 65536 bytes" in str(error)


async def test_interim_answers_count_toward_the_bounds(pool: Pool, network: Network) -> None:
    await over_bound(pool, network, b"HTTP/1.1 103 Early Hints\r\n" + header_lines(60)
                     + b"\r\nHTTP/1.1 200 OK\r\n" + header_lines(41) + b"\r\n")


async def test_bounds_are_per_response(pool: Pool, network: Network) -> None:
    """On a kept-alive connection each response has the whole allowance, and the body that
    arrives with its head is not counted as head."""
    body = b"x" * (200 * 1024)
    wire = (b"HTTP/1.1 200 OK\r\n" + header_lines(60)
            + b"content-length: %d\r\n\r\n" % len(body) + body)
    first = await answer(pool, network, wire)
    assert await first.read() == body
    transport = network.transports[0]
    assert pool.idle == [transport.protocol] and not transport.aborted
    task = start(pool)
    await transport.request()
    transport.send(wire)
    assert await (await task).read() == body
    assert len(network.transports) == 1 and pool.idle == [transport.protocol]


async def test_pool_limits_of_its_own(network: Network) -> None:
    pool = Pool(Origin.from_url("http://engine:8000"), opener=network.open,
                limits=HeadLimits(max_bytes=1000, max_headers=2))
    ok = await answer(pool, network, b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n")
    assert ok.status == 200
    error = await over_bound(pool, network, b"HTTP/1.1 200 OK\r\n" + header_lines(3) + b"\r\n")
    assert "more than 2 response headers" in str(error)


def test_default_limits_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Pool(Origin.from_url("http://engine")).limits == HeadLimits(64 * 1024, 100)
    monkeypatch.setenv("ROUTEYARD_UPSTREAM_MAX_HEADER_BYTES", "8192")
    monkeypatch.setenv("ROUTEYARD_UPSTREAM_MAX_HEADERS", "7")
    default_head_limits.cache_clear()
    try:
        assert Pool(Origin.from_url("http://engine")).limits == HeadLimits(8192, 7)
    finally:
        default_head_limits.cache_clear()


# -- what the relay makes of protocol errors (over MockTransport) ---------------------------------

@pytest.mark.parametrize("error", [
    BackendProtocolError("invalid HTTP from the backend: Invalid status code"),
    BackendHeadTooLarge("the backend sent more than 100 response headers"),
])
async def test_protocol_error_is_retried_on_another_backend(error: Exception) -> None:
    fleet = Fleet(answers(error, reply(200, b"from the second")))
    model = await model_of(fleet, "a", "b")
    outcome = Outcome()
    assert await forward(model, outbound(), outcome, read_all) == (200, b"from the second")
    first, second = fleet.names
    assert first != second
    assert outcome.retries == 1 and outcome.retried_from == (Fleet.key(first),)
    assert_idle(model)


async def test_protocol_error_everywhere_is_raised() -> None:
    fleet = Fleet(answers(BackendProtocolError("invalid HTTP from the backend")))
    model = await model_of(fleet, "a", "b")
    outcome = Outcome()
    with pytest.raises(BackendProtocolError):
        await forward(model, outbound(), outcome, read_all)
    assert sorted(fleet.names) == ["a", "b"]
    assert outcome.attempt_error == "backend_protocol_error"
    assert_idle(model)
