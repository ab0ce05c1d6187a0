"""Headers across the router, both ways, against a raw loopback backend.

The backend here answers canned bytes, so what the engine sent is known exactly: repeated
headers, any casing, no content type, 204. The router passes response headers as the
bytes the engine sent (``RelayedResponse``) and refuses a client head that could smuggle a
header line (bare CR or LF, NUL) before anything reaches the engine.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Router, start_router

CHAT = "/v1/chat/completions"
BODY = b'{"model":"raw-model","messages":[]}'

# What the raw backend answers, by the request's x-answer header.
ANSWERS = {
    "headers": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"X-Engine-Note: one\r\nx-engine-note: two\r\nSet-Cookie: a=1\r\n"
                b"Set-Cookie: b=2\r\nContent-Length: 2\r\n\r\n{}"),
    "untyped": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    "empty": b"HTTP/1.1 204 No Content\r\nX-Engine-Note: none\r\n\r\n",
    "chunked": (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nX-Engine-Note: sse\r\n\r\n"
                b"e\r\ndata: {\"a\":1}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"),
    "own-id": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
               b"X-Request-Id: engine-7\r\nContent-Length: 2\r\n\r\n{}"),
    # an event stream of known length, whole, and one that breaks off early
    "sse-length": (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                   b"Content-Length: 29\r\n\r\ndata: {\"a\":1}\n\ndata: [DONE]\n\n"),
    "sse-cut": (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Content-Length: 500\r\n\r\ndata: {\"a\":1}\n\n"),
}
#: Answers after which the backend closes the connection.
CLOSE_AFTER = {"sse-cut"}


class RawBackend:
    """A loopback HTTP/1.1 server answering canned bytes; it records each request head."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.heads: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                answer = "headers"
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                    elif name.lower() == b"x-answer":
                        answer = value.strip().decode()
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                conn.sendall(ANSWERS[answer])
                if answer in CLOSE_AFTER:
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Router, RawBackend]]:
    backend = RawBackend()
    tmp: Path = tmp_path_factory.mktemp("raw")
    text = ("models:\n  raw-model:\n    backends:\n"
            f"      - url: http://127.0.0.1:{backend.port}\n    endpoints: [chat]\n")
    with start_router(tmp, text) as router:
        yield router, backend
    backend.close()


def exchange(router: Router, head_lines: bytes, body: bytes = BODY) -> bytes:
    """One raw request to the router; the whole response as bytes (connection closed)."""
    port = int(router.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\n" + head_lines
                  + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        out = b""
        while data := s.recv(65536):
            out += data
    return out


def header_lines(response: bytes) -> list[bytes]:
    return response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_engine_headers_pass_as_sent(raw) -> None:
    router, _ = raw
    response = exchange(router, b"x-answer: headers\r\nX-Request-Id: rid-1\r\n")
    lines = header_lines(response)
    assert lines[0] == b"HTTP/1.1 200 OK"
    for line in (b"X-Engine-Note: one", b"x-engine-note: two", b"Set-Cookie: a=1",
                 b"Set-Cookie: b=2", b"Content-Type: application/json",
                 b"x-request-id: rid-1", b"content-length: 2", b"connection: close"):
        assert line in lines, (line, lines)
    assert response.endswith(b"\r\n\r\n{}")


def test_untyped_body_gets_octet_stream(raw) -> None:
    router, _ = raw
    response = exchange(router, b"x-answer: untyped\r\n")
    lines = header_lines(response)
    assert b"content-type: application/octet-stream" in lines
    assert [x for x in lines if x.lower().startswith(b"content-type")] == [
        b"content-type: application/octet-stream"]
    assert response.endswith(b"abc")


def test_no_content_answer_stays_bodiless(raw) -> None:
    router, _ = raw
    response = exchange(router, b"x-answer: empty\r\n")
    lines = header_lines(response)
    assert lines[0] == b"HTTP/1.1 204 No Content"
    assert b"X-Engine-Note: none" in lines
    assert not any(x.lower().startswith((b"content-type", b"content-length")) for x in lines)
    assert response.endswith(b"\r\n\r\n")


def test_streamed_answer_keeps_headers(raw) -> None:
    router, _ = raw
    response = exchange(router, b"x-answer: chunked\r\n")
    lines = header_lines(response)
    assert b"X-Engine-Note: sse" in lines
    assert b"transfer-encoding: chunked" in lines
    assert b"data: [DONE]" in response


@pytest.mark.parametrize("smuggled", [
    b"X-Request-Id: abc\nInjected: yes\r\n",
    b"X-Request-Id: abc\rInjected: yes\r\n",
    b"X-Note: a\x00b\r\n",
])
def test_header_line_smuggling_is_refused(raw, smuggled: bytes) -> None:
    router, backend = raw
    before = len(backend.heads)
    response = exchange(router, smuggled)
    lines = header_lines(response)
    assert lines[0] == b"HTTP/1.1 400 Bad Request", lines
    assert b'"type":"invalid_request_error"' in response
    assert b"CR, LF or NUL" in response
    assert not any(x.lower().startswith(b"injected") for x in lines)
    assert len(backend.heads) == before  # nothing reached the engine


def test_engine_request_id_is_not_duplicated(raw) -> None:
    router, _ = raw
    lines = header_lines(exchange(router, b"x-answer: own-id\r\nX-Request-Id: client-1\r\n"))
    ids = [x for x in lines if x.lower().startswith(b"x-request-id")]
    assert ids == [b"X-Request-Id: engine-7"]


def test_header_bytes_are_kept_exactly(raw) -> None:
    """Header values that are not ASCII (RFC 9110 allows obs-text) reach the engine and
    come back byte for byte; a request id that is not UTF-8 does not break the answer."""
    router, backend = raw
    response = exchange(router, b"x-answer: headers\r\nX-Note: caf\xc3\xa9\r\n"
                                b"X-Request-Id: r\xff1\r\n")
    assert header_lines(response)[0] == b"HTTP/1.1 200 OK"
    head = backend.heads[-1]
    assert b"\r\nx-note: caf\xc3\xa9" in head.lower()
    assert b"\r\nx-request-id: r\xff1" in head.lower()
    assert b"x-request-id: r\xff1" in header_lines(response)


def test_event_stream_of_known_length(raw) -> None:
    router, _ = raw
    response = exchange(router, b"x-answer: sse-length\r\n")
    lines = header_lines(response)
    assert b"content-length: 29" in lines
    assert response.endswith(b"\r\n\r\ndata: {\"a\":1}\n\ndata: [DONE]\n\n")


def test_event_stream_of_known_length_cut_short_is_truncated(raw) -> None:
    """No error event can follow once a length was promised: the connection is closed."""
    router, _ = raw
    response = exchange(router, b"x-answer: sse-cut\r\n")
    assert b"content-length: 500" in header_lines(response)
    body = response.split(b"\r\n\r\n", 1)[1]
    assert body == b'data: {"a":1}\n\n'  # what the engine sent, and nothing after it
