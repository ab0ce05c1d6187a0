"""Hostile and broken clients, over raw sockets, against a real router.

Slow heads and bodies (slowloris) are closed by their deadlines while normal requests go
on; past the connection limit a new connection gets a clear 503; heads that are not strict
HTTP/1.1 (RFC 9112) are a 400 and a closed connection before anything reaches the engine;
a key is checked, and a declared size, before any body is read or ``100 Continue`` sent;
one size limit holds for every route; a head over its limit is a 431. Deadlines are set
small for the test (1 s) and every loop is bounded.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from router.tenants.config import hash_key
from tests.conftest import routes_yaml
from tests.harness import Router, start_router, wait_until

KEY = "ry-attack-" + "k" * 40
CHAT = "/v1/chat/completions"
BODY = b'{"model":"chat-model","messages":[{"role":"user","content":"hi"}]}'
HEADER_TIMEOUT = 1.0
BODY_GRACE = 1.0
BODY_MIN_RATE = 1000
#: Slack on top of a deadline before a connection must be closed: the timer's tick
#: (0.5 s for bodies) plus a loaded test machine.
SLACK = 1.5
#: Paths the routers' health checks and model lists use on the engines.
PROBES = {"/health", "/ping", "/v1/models", "/version", "/load"}


def auth_yaml(tmp: Path) -> str:
    return (f"auth:\n  keys:\n    - id: attack\n      hash: {hash_key(KEY)}\n"
            "      models: [\"*\"]\n"
            f"batch:\n  database_url: sqlite+aiosqlite:///{tmp}/batch.db\n"
            f"  storage: {{url: {tmp}/files}}\n  poll_interval: 1s\n")


@pytest.fixture(scope="module")
def guarded(engines: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """A router with keys, the Files API and deadlines of a second (the default size limit)."""
    tmp = tmp_path_factory.mktemp("attacks")
    env = {"ROUTEYARD_REQUEST_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
           "ROUTEYARD_REQUEST_BODY_GRACE": str(BODY_GRACE),
           "ROUTEYARD_REQUEST_BODY_MIN_RATE": str(BODY_MIN_RATE)}
    with start_router(tmp, routes_yaml(engines) + auth_yaml(tmp), env=env) as router:
        yield router


def connect(router: Router, timeout: float = 5) -> socket.socket:
    return socket.create_connection(("127.0.0.1", router.port), timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float = 5) -> tuple[bytes, bool]:
    """What arrives until the router closes, and whether it did within ``timeout``."""
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return out, True
        except TimeoutError:
            break
        if not data:
            return out, True
        out += data
    return out, False


def read_all(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything until the router closes; fails if it does not close within ``timeout``."""
    out, closed = read_until_closed(sock, timeout)
    assert closed, f"the router kept the connection open; got {out[:300]!r}"
    return out


def exchange(router: Router, raw: bytes, timeout: float = 5) -> bytes:
    with connect(router, timeout) as sock:
        sock.sendall(raw)
        return read_all(sock, timeout)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def answers(raw: bytes) -> list[int]:
    """The statuses of the answers in ``raw``, one after another (each has a length)."""
    statuses = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        statuses.append(status_of(head))
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        raw = rest[length:]
    return statuses


def engine_calls(engines: dict[str, str]) -> list[dict]:
    seen = httpx.get(engines["generate"] + "/_fake/requests", timeout=10).json()
    return [e for e in seen if e["path"] not in PROBES]


def reset_engine(engines: dict[str, str]) -> None:
    httpx.post(engines["generate"] + "/_fake/reset", timeout=10).raise_for_status()


def request(head_lines: bytes = b"", body: bytes = BODY, *, key: bool = True,
            length: bool | int = True) -> bytes:
    """A POST of chat with the test's key and a Content-Length: the body's (True), this
    one (an int), or none (False)."""
    head = b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if key:
        head += b"Authorization: Bearer " + KEY.encode() + b"\r\n"
    if length is not False:
        head += b"Content-Length: %d\r\n" % (len(body) if length is True else length)
    return head + head_lines + b"\r\n" + body


def authorized(router: Router) -> httpx.Response:
    return router.client.post(CHAT, content=BODY, headers={
        "authorization": f"Bearer {KEY}", "content-type": "application/json"})


# -- 1. slowloris --------------------------------------------------------------------------------

def trickle(socks: list[socket.socket], next_byte: Callable[[int], bytes], limit: float,
            during: Callable[[], None] | None = None) -> tuple[list[float | None], list[bytes]]:
    """Send each socket one byte per 0.1 s until the router closes it or ``limit`` seconds
    pass; ``during`` runs once, half a second in. When each was closed (None: never), and
    what each received."""
    started = time.monotonic()
    closed: list[float | None] = [None] * len(socks)
    got = [b""] * len(socks)
    sent = 0
    while time.monotonic() - started < limit and None in closed:
        for i, sock in enumerate(socks):
            if closed[i] is None:
                try:
                    sock.send(next_byte(sent))
                except OSError:
                    closed[i] = time.monotonic() - started
        sent += 1
        readable, _, _ = select.select([s for i, s in enumerate(socks) if closed[i] is None],
                                       [], [], 0.1)
        for sock in readable:
            i = socks.index(sock)
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            got[i] += data
            if not data:
                closed[i] = time.monotonic() - started
        if during is not None and time.monotonic() - started > 0.5:
            during()
            during = None
    return closed, got


def test_trickled_heads_are_closed_at_the_whole_head_deadline(guarded: Router) -> None:
    """20 heads at 10 bytes/s: Sanic's timeout restarted on every byte and kept them open;
    the whole-head deadline closes each 1 s after its first byte, with a 408, while a normal
    request is answered."""
    socks = [connect(guarded) for _ in range(20)]
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 4000
    _closed_at_deadline(guarded, socks, lambda n: head[n:n + 1], HEADER_TIMEOUT,
                        b"REQUEST_HEADER_TIMEOUT")


def _closed_at_deadline(guarded: Router, socks: list[socket.socket],
                        piece: Callable[[int], bytes], deadline: float, setting: bytes) -> None:
    """Trickle ``piece(n)`` into every socket: each is answered 408 naming ``setting`` and
    closed at ``deadline`` (plus slack), while one normal request is answered 200."""
    answered: list[int] = []
    try:
        closed, got = trickle(socks, piece, deadline + SLACK + 2,
                              lambda: answered.append(authorized(guarded).status_code))
    finally:
        for sock in socks:
            sock.close()
    assert answered == [200]
    assert None not in closed, closed
    assert all(deadline - 0.2 <= t <= deadline + SLACK for t in closed), closed
    assert all(g.startswith(b"HTTP/1.1 408 ") and setting in g for g in got)


def test_trickled_bodies_are_closed_by_the_body_rate(guarded: Router, engines: dict) -> None:
    """20 bodies at 10 bytes/s after a complete head: Sanic never timed a body out; the
    rate rule closes each once the grace is over, and nothing reaches the engine."""
    reset_engine(engines)
    head = request(body=b"", length=4000)
    socks = [connect(guarded) for _ in range(20)]
    for sock in socks:
        sock.sendall(head)
    _closed_at_deadline(guarded, socks, lambda n: b" ", BODY_GRACE, b"BODY_MIN_RATE")
    assert [e["path"] for e in engine_calls(engines)] == [CHAT]  # the normal request only


def test_a_silent_connection_is_closed_at_the_header_deadline(guarded: Router) -> None:
    """A connection that never sends a byte held its slot for the keep-alive timeout (75 s);
    it gets the head's time."""
    with connect(guarded) as sock:
        started = time.monotonic()
        _, closed = read_until_closed(sock, HEADER_TIMEOUT + SLACK + 1)
        took = time.monotonic() - started
    assert closed and HEADER_TIMEOUT - 0.2 <= took <= HEADER_TIMEOUT + SLACK, took


def test_connections_past_the_limit_are_refused_with_503(
        engines: dict, launch_router: Callable[..., Router]) -> None:
    router = launch_router(routes_yaml(engines), env={"ROUTEYARD_MAX_CONNECTIONS": "8"})
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    once = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    held = []
    try:
        for _ in range(8):  # each answered: the router holds it
            sock = connect(router)
            sock.sendall(health)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            held.append(sock)
        refused = exchange(router, once)
        assert status_of(refused) == 503
        assert b"connection: close" in refused and b"retry-after: 1" in refused
        error = orjson.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "too_many_connections"
        held.pop().close()  # one fewer: a new connection is served again
        wait_until(lambda: status_of(exchange(router, once)) == 200, 5,
                   "a connection is accepted once one closed")
    finally:
        for sock in held:
            sock.close()


# -- 2. strict request heads ----------------------------------------------------------------------

INNER = request()  # a whole second request, smuggled as a body the router must not see


def arabic(digits: str) -> str:
    return digits.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))


def chunked(size: bytes, body: bytes = BODY) -> bytes:
    return request(b"Transfer-Encoding: chunked\r\n", size + b"\r\n" + body + b"\r\n0\r\n\r\n",
                   length=False)


MALFORMED = {
    # the space makes it an unknown header: the body would be parsed as a second request
    "content-length-space-colon": request(b"Content-Length : %d\r\n" % len(INNER), INNER,
                                          length=False),
    "transfer-encoding-space-colon": request(b"Transfer-Encoding : chunked\r\n", INNER,
                                             length=False),
    "obs-fold": request(b"X-Note: a\r\n\tfolded: yes\r\n"),
    "space-in-name": request(b"X Note: a\r\n"),
    "chunk-size-0x": chunked(b"0x%x" % len(BODY)),
    "chunk-size-padded": chunked(b" %x" % len(BODY)),
    "chunk-size-unicode-digits": chunked(arabic(f"{len(BODY):x}").encode()),
    "content-length-unicode-digit": request(
        f"Content-Length: {arabic(str(len(BODY)))}\r\n".encode(), length=False),
    "content-length-plus": request(b"Content-Length: +%d\r\n" % len(BODY), length=False),
    "control-in-value": request(b"X-Note: a\x0bb\r\n"),
    # llhttp takes a tunnel for an upgrade; Sanic then failed on the authority-form target
    # (no answer, an ERROR traceback per connection)
    "connect-tunnel": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_heads_are_400_and_closed_before_the_engine(
        guarded: Router, engines: dict, fake_only: None, raw: bytes) -> None:
    reset_engine(engines)
    with connect(guarded) as sock:
        sock.sendall(raw)
        response, closed = read_until_closed(sock, 3)
    assert engine_calls(engines) == []
    assert answers(response) == [400], response  # one answer: no second request was read
    assert closed and b"connection: close" in response
    assert b'"code":"malformed_request"' in response


def test_a_trailing_slash_reaches_the_engine_in_the_catalogs_spelling(
        guarded: Router, engines: dict, fake_only: None) -> None:
    """``/v1/chat/completions/`` matches the chat route; forwarded as sent, vLLM would
    answer a 307 to its own address. The engine gets the catalog's path, query kept."""
    reset_engine(engines)
    raw = request(b"Connection: close\r\n").replace(
        CHAT.encode(), CHAT.encode() + b"/?trace=1", 1)
    assert answers(exchange(guarded, raw)) == [200]
    [call] = engine_calls(engines)
    assert (call["path"], call["query"]) == (CHAT, "trace=1")


def test_valid_requests_keep_working_on_one_connection(guarded: Router) -> None:
    """Pipelined requests, chunked and not, then an h2c upgrade (ignored; Sanic closes
    after any ``Connection`` other than keep-alive): llhttp checks each message on the
    connection and Sanic answers each."""
    upgrade = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    raw = request() + chunked(b"%x" % len(BODY)) + request() + upgrade
    assert answers(exchange(guarded, raw)) == [200, 200, 200, 200]


def test_an_answer_before_the_body_says_whether_the_connection_stays(guarded: Router) -> None:
    """A 404 for a POST (routing refuses before the body is read): a body already all
    in is dropped and the connection serves the next request; a body still to come is
    left unread, and the answer's head says ``connection: close`` before the router
    closes (else the client sends its next request into a closing connection)."""
    lost = request(body=BODY).replace(CHAT.encode(), b"/v1/nothing-here", 1)
    assert answers(exchange(guarded, lost + request(b"Connection: close\r\n"))) == [404, 200]
    with connect(guarded) as sock:
        sock.sendall(request(body=b"{", length=100_000)
                     .replace(CHAT.encode(), b"/v1/nothing-here", 1))
        answer, closed = read_until_closed(sock)
    assert status_of(answer) == 404 and closed
    assert b"connection: close" in answer


def test_bytes_after_a_connection_close_request_do_not_cost_it_its_answer(
        guarded: Router) -> None:
    """A request that says ``Connection: close`` and whatever follows it in the same
    read (here a second request, or garbage): the first is answered, nothing after it is
    read, and the connection closes (llhttp refused the whole read before)."""
    first = request(b"Connection: close\r\n")
    for after in (request(), b"\x00garbage\r\n\r\n"):
        assert answers(exchange(guarded, first + after)) == [200]


# -- 3. before authentication -------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:")))


def test_unauthenticated_body_is_refused_unread(guarded: Router) -> None:
    """Four strangers each declare 200 MB: each is answered 401 at once from the head, the
    connection closes, and what they send after is dropped (memory stays flat)."""
    before = rss_kib(guarded.pid)
    head = request(body=b"", key=False, length=200_000_000)
    chunk = b"x" * (1 << 20)
    for _ in range(4):
        with connect(guarded, timeout=3) as sock:
            sock.sendall(head)
            started = time.monotonic()
            answer = sock.recv(65536)
            assert time.monotonic() - started < 2
            assert status_of(answer) == 401 and b"100 Continue" not in answer
            assert b"connection: close" in answer
            try:  # the rest of the body: dropped, never kept
                for _ in range(32):
                    sock.sendall(chunk)
            except OSError:
                pass
    assert rss_kib(guarded.pid) - before < 64 * 1024


def test_expect_continue_without_a_key_is_401_without_100(guarded: Router) -> None:
    raw = request(b"Expect: 100-continue\r\n", b"", key=False, length=1000)
    response = exchange(guarded, raw, timeout=3)
    assert status_of(response) == 401
    assert b"100 Continue" not in response


def test_expect_continue_over_the_size_limit_is_413_without_100(guarded: Router) -> None:
    raw = request(b"Expect: 100-continue\r\n", b"", length=300_000_000)
    response = exchange(guarded, raw, timeout=3)
    assert status_of(response) == 413
    assert b"100 Continue" not in response
    assert b"ROUTEYARD_MAX_REQUEST_SIZE" in response


def test_expect_continue_with_a_key_gets_100_then_the_answer(guarded: Router) -> None:
    raw = request(b"Expect: 100-continue\r\nConnection: close\r\n", b"", length=len(BODY))
    with connect(guarded) as sock:
        sock.sendall(raw)
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(BODY)
        assert status_of(read_all(sock)) == 200


def test_uploads_have_the_one_size_limit(engines: dict, tmp_path: Path,
                                         launch_router: Callable[..., Router]) -> None:
    """``/v1/files`` raised its own cap to 513 MiB; now ROUTEYARD_MAX_REQUEST_SIZE holds."""
    text = routes_yaml(engines) + (f"batch:\n  database_url: sqlite+aiosqlite:///{tmp_path}/b.db\n"
                                   f"  storage: {{url: {tmp_path}/files}}\n")
    router = launch_router(text, env={"ROUTEYARD_MAX_REQUEST_SIZE": "65536"})
    big = router.client.post("/v1/files", data={"purpose": "user_data"},
                             files={"file": ("a.txt", b"x" * 100_000)})
    assert big.status_code == 413, big.text
    assert "ROUTEYARD_MAX_REQUEST_SIZE" in big.json()["error"]["message"]
    small = router.client.post("/v1/files", data={"purpose": "user_data"},
                               files={"file": ("a.txt", b"x" * 1000)})
    assert small.status_code == 200, small.text


# -- 4. the head's size ---------------------------------------------------------------------------

def test_header_over_the_limit_is_431(guarded: Router) -> None:
    response = exchange(guarded, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
                        + b"a" * 10_000 + b"\r\n\r\n")
    assert status_of(response) == 431
    assert b"HTTP/1.1 431 Request Header Fields Too Large" in response
