"""Engines that misbehave at the HTTP level, behind a real router.

The engine here is a small asyncio server on loopback that answers each request as its
mode says (or the request's ``x-answer`` header): a head that never ends, invalid HTTP, a
101 or another 1xx and then a hang-up, a body cut short of its length. What the router
must do: bound what it keeps of an engine's head (``ROUTEYARD_UPSTREAM_MAX_HEADER_BYTES``,
``ROUTEYARD_UPSTREAM_MAX_HEADERS``), answer 502 in its own envelope while nothing reached
the client, retry on another backend when one is up, cut the body when its head went out
already, and log one WARNING line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import FakeEngine, Router, run_cli, running, start_router, wait_until

CHAT = "/v1/chat/completions"
BODY = b'{"model":"raw-model","messages":[{"role":"user","content":"hi"}]}'

#: How much of an endless head the engine writes at most (so a router that keeps reading
#: it ends the test in bounded time too).
ENDLESS_CAP = 64 * 1024 * 1024

Answer = Callable[[asyncio.StreamWriter], Awaitable[bool]]


def _endless_head(line_size: int) -> Answer:
    """``HTTP/1.1 200 OK`` and then header lines of ``line_size`` bytes, until the router
    hangs up (or ``ENDLESS_CAP``)."""
    block = (b"X-a: " + b"b" * (line_size - 7) + b"\r\n") * (100_000 // line_size)

    async def answer(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        sent = 0
        while sent < ENDLESS_CAP:
            writer.write(block)
            await writer.drain()
            sent += len(block)
        return False

    return answer


def _canned(data: bytes, keep: bool = False) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return answer


ANSWERS: dict[str, Answer] = {
    "endless": _endless_head(100),
    "endless-long": _endless_head(4000),
    "garbage": _canned(b"HTTP/1.1 abc\r\n\r\n"),
    "switch": _canned(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\n\r\n"),
    "switch-bare": _canned(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
    "continue": _canned(b"HTTP/1.1 100 Continue\r\n\r\n"),
    "hints": _canned(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"),
    # a small JSON body (read whole before the head goes out) cut short
    "cut-small": _canned(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"partial\":"),
    # a body over the router's whole-read size (streamed) cut short
    "cut-large": _canned(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 2000000\r\n\r\n" + b"x" * 100_000),
    "cut-chunked": _canned(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n"),
    "cut-sse": _canned(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n"
                       b"f\r\ndata: {\"a\":1}\n\n\r\n"),
    "ok": _canned(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 2\r\n\r\n{}", keep=True),
    # two headers of an interim answer, then the two of "ok"
    "hints-ok": _canned(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\nLink: </b>\r\n\r\n"
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 2\r\n\r\n{}", keep=True),
}


class MisbehavingEngine:
    """An asyncio HTTP/1.1 server on loopback, in a thread of its own, answering every
    request with ``ANSWERS[mode]`` (the request's ``x-answer`` header picks another)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)
        assert self.server is not None
        self.port: int = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                mode, length = self.mode, 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                    elif name.lower() == b"x-answer":
                        mode = value.strip().decode()
                await reader.readexactly(length)
                self.requests += 1
                if not await ANSWERS[mode](writer):
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def close(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.loop)
        self.thread.join(5)


def routes(*urls: str, model: str = "raw-model") -> str:
    """A routes file with one model on ``urls``; no active health checks, no ejection (so
    every request meets the engine it was sent to)."""
    lines = ["defaults:", "  health_checks: {enabled: false}",
             "  outlier_detection: {consecutive_failures: 1000}",
             "  timeouts: {first_byte: 20s}",
             "models:", f"  {model}:", "    backends:"]
    lines += [f"      - url: {url}" for url in urls]
    lines.append("    endpoints: [chat]")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def engine() -> Iterator[MisbehavingEngine]:
    server = MisbehavingEngine("ok")
    yield server
    server.close()


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory,
           engine: MisbehavingEngine) -> Iterator[Router]:
    with start_router(tmp_path_factory.mktemp("faults"), routes(engine.url)) as started:
        yield started


def exchange(router: Router, answer: str) -> tuple[bytes, bytes]:
    """One raw request to the router, the engine's answer picked by ``answer``: the
    response's head and body as bytes (the router's connection read to its end)."""
    with socket.create_connection(("127.0.0.1", router.port), timeout=30) as s:
        s.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nx-answer: " + answer.encode() + b"\r\n"
                  + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)
        out = b""
        while data := s.recv(65536):
            out += data
    head, _, body = out.partition(b"\r\n\r\n")
    return head, body


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def log_mark(router: Router) -> int:
    """Where the router's log ends now."""
    return len(router.log_text())


def no_traceback(router: Router, mark: int = 0) -> str:
    """The router's log since ``mark``, checked for tracebacks and ERROR lines."""
    log = router.log_text()[mark:]
    assert "Traceback" not in log, log[-4000:]
    assert " ERROR " not in log, log[-4000:]
    return log


# -- defect 1: an engine head that never ends ------------------------------------------------

@pytest.mark.parametrize("answer", ["endless", "endless-long"])
def test_endless_response_head_is_cut_off_and_not_kept(router: Router, answer: str) -> None:
    """An engine that sends header lines forever: 502 each time, and the router's memory
    stays where it was (before the bound, each such answer grew it by over 150 MB)."""
    exchange(router, "ok")  # warm up: a connection, the answer path, the allocator
    mark = log_mark(router)
    baseline = rss_kib(router.pid)
    answers = [exchange(router, answer) for _ in range(5)]
    grown = rss_kib(router.pid) - baseline
    peak = rss_kib(router.pid, "VmHWM") - baseline
    print(f"router RSS ({answer}): baseline {baseline} KiB, +{grown} KiB after 5 endless "
          f"heads, peak +{peak} KiB")
    assert grown < 30 * 1024, f"the router grew by {grown} KiB"
    assert peak < 30 * 1024, f"the router peaked {peak} KiB above its baseline"
    for head, body in answers:
        assert status_of(head) == 502, head
        assert b'"code":"backend_protocol_error"' in body, body
        assert b"header" in body
    warned(router, mark, "failed before answering .*: the backend sent .*header")


def test_head_limits_are_settings(tmp_path: Path, engine: MisbehavingEngine) -> None:
    """The bounds come from ``ROUTEYARD_UPSTREAM_MAX_HEADERS`` and ``..._HEADER_BYTES``;
    the headers of an interim answer count toward them."""
    text = routes(engine.url)
    assert status_of(exchange_with(tmp_path, text, {}, "hints-ok")[0]) == 200
    low = {"ROUTEYARD_UPSTREAM_MAX_HEADERS": "3"}
    assert status_of(exchange_with(tmp_path, text, low, "ok")[0]) == 200  # 2 headers
    head, body = exchange_with(tmp_path, text, low, "hints-ok")  # 2 + 2 headers
    assert status_of(head) == 502 and b"more than 3 response headers" in body, body
    tiny = {"ROUTEYARD_UPSTREAM_MAX_HEADER_BYTES": "40"}
    head, body = exchange_with(tmp_path, text, tiny, "ok")
    assert status_of(head) == 502 and b"over 40 bytes" in body, body


def exchange_with(tmp_path: Path, text: str, env: dict[str, str],
                  answer: str) -> tuple[bytes, bytes]:
    """One exchange through a router of its own, started with ``env``."""
    with start_router(tmp_path, text, env=env) as router:
        return exchange(router, answer)


def test_bad_head_limit_setting_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(routes("http://127.0.0.1:9"))
    done = run_cli("serve", "--config", str(tmp_path / "routes.yaml"), "--port", "0",
                   env={"ROUTEYARD_UPSTREAM_MAX_HEADERS": "0"})
    assert done.returncode == 2
    assert "ROUTEYARD_UPSTREAM_MAX_HEADERS='0'" in done.stderr, done.stderr[-2000:]


# -- defect 2: protocol errors are retried on a healthy backend ------------------------------

def test_protocol_error_is_retried_on_a_healthy_backend(tmp_path: Path) -> None:
    garbage = MisbehavingEngine("garbage")
    fake = FakeEngine("generate", ["chat-model"], tmp_path / "engine.log")
    try:
        with running([fake]):
            text = routes(garbage.url, fake.url, model="chat-model")
            with start_router(tmp_path, text) as router:
                body = {"model": "chat-model", "messages": [{"role": "user", "content": "a"}]}
                statuses = [router.client.post(CHAT, json=body).status_code
                            for _ in range(8)]
                assert statuses == [200] * 8
                assert garbage.requests >= 3  # round robin sent it its share, retried
                no_traceback(router)
    finally:
        garbage.close()


# -- defect 3: interim answers then a hang-up, bodies cut short -------------------------------

def warned(router: Router, mark: int, pattern: str) -> str:
    """The router's log since ``mark`` once a WARNING line matching ``pattern`` is in it;
    it has no traceback and no ERROR line."""
    found = re.compile(r"^\S+ WARNING .*" + pattern, re.MULTILINE)  # router/logs.py
    wait_until(lambda: found.search(router.log_text()[mark:]), 5,
               f"a WARNING line matching {pattern!r}")
    return no_traceback(router, mark)


@pytest.mark.parametrize("answer", ["switch", "switch-bare", "continue", "hints", "garbage"])
def test_interim_answer_then_close_is_a_502(router: Router, answer: str) -> None:
    mark = log_mark(router)
    head, body = exchange(router, answer)
    assert status_of(head) == 502, head
    assert b'"type":"server_error"' in body, body
    warned(router, mark, "failed before answering")


def test_small_body_cut_short_is_a_502(router: Router) -> None:
    mark = log_mark(router)
    head, body = exchange(router, "cut-small")
    assert status_of(head) == 502, head
    assert b"backend_unavailable" in body
    warned(router, mark, "closed the connection")


@pytest.mark.parametrize("answer", ["cut-large", "cut-chunked"])
def test_streamed_body_cut_short_is_truncated(router: Router, answer: str) -> None:
    """The head went out: the client sees a body shorter than its length, or a chunked
    body without its last chunk."""
    mark = log_mark(router)
    head, body = exchange(router, answer)
    assert status_of(head) == 200, head
    if answer == "cut-large":
        assert b"content-length: 2000000" in head.lower()
        assert 0 < len(body) < 2_000_000
    else:
        assert b"transfer-encoding: chunked" in head.lower()
        assert body.startswith(b"5\r\n{\"a\":\r\n") and not body.endswith(b"0\r\n\r\n")
    warned(router, mark, "broke off")


def test_event_stream_cut_short_ends_with_the_error_event(router: Router) -> None:
    mark = log_mark(router)
    head, body = exchange(router, "cut-sse")
    assert status_of(head) == 200, head
    assert b'data: {"a":1}' in body and b'"code":"backend_unavailable"' in body
    assert b"data: [DONE]" in body
    warned(router, mark, "broke off")


def test_router_still_answers(router: Router) -> None:
    head, body = exchange(router, "ok")
    assert status_of(head) == 200 and body == b"{}"
    assert httpx.get(f"{router.url}/health", timeout=5).status_code == 200


def test_an_engine_redirect_does_not_leak_the_backend_address(
        router: Router, engine: MisbehavingEngine) -> None:
    """Starlette's trailing-slash redirect is absolute, built from the Host the router sent:
    the client gets it relative, never the backend's address."""
    ANSWERS["redirect"] = _canned(
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:%d/v1/models\r\n"
        b"Content-Length: 0\r\n\r\n" % engine.port, keep=True)
    head, _ = exchange(router, "redirect")
    assert status_of(head) == 307, head
    assert b"\r\nlocation: /v1/models\r\n" in head.lower(), head
    assert str(engine.port).encode() not in head
