"""An in-memory ``Transport`` for tests of the code above ``upstream`` (relay, cluster,
health): a handler answers each request with a scripted reply, and the mock records what
was asked and whether the router gave up on the answer.

    def handler(request: MockRequest) -> MockReply:
        return MockReply(200, [(b"content-type", b"text/event-stream")],
                         [b"data: 1\\n\\n", 0.01, b"data: [DONE]\\n\\n"])

    transport = MockTransport(handler)
    response = await transport.handle(head, b"", timeouts)

Timeouts behave as with ``Pool``: a handler that never returns is cut off after
``timeouts.first_byte`` (``BackendTimeout``), a pause in the body longer than
``timeouts.idle`` ends it with ``BackendTimeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from router.upstream import Response, Timeouts, timeout_error

#: A reply's body, item by item: bytes are a chunk, a float waits that many seconds
#: before the next item, an exception breaks the body off with it.
BodyScript = list[bytes | float | Exception]


@dataclass(slots=True)
class MockRequest:
    """One request as the backend would have received it."""

    head: bytes
    body: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]  # names lower-cased, in the order sent
    #: The router gave up before the reply completed (``Response.close()`` on a partial
    #: body, an idle or first-byte timeout, or the caller cancelled): where a real
    #: backend would have seen the connection aborted.
    aborted: bool = False

    @classmethod
    def parse(cls, head: bytes, body: bytes) -> MockRequest:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
        return cls(head, body, method, target, headers)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), if sent."""
        return next((v for n, v in self.headers if n == name), None)


@dataclass(slots=True)
class MockReply:
    """What the backend answers: status and headers at once, then the body script."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: BodyScript = field(default_factory=list)


Handler = Callable[[MockRequest], MockReply | Awaitable[MockReply]]


class MockTransport:
    """A ``Transport`` whose backend is ``handler``; records requests and closes."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[MockRequest] = []
        self.closed = 0  # how many times close() was called

    async def handle(self, head: bytes, body: bytes, timeouts: Timeouts) -> Response:
        request = MockRequest.parse(head, body)
        self.requests.append(request)
        answer = self.handler(request)
        reply = (
            answer if isinstance(answer, MockReply)
            else await _first_byte(request, answer, timeouts.first_byte)
        )
        flow = _MockFlow(request)
        response = Response(flow, asyncio.get_running_loop(), timeouts.idle)
        response.status = reply.status
        response.headers = list(reply.headers)
        flow.start(response, reply.body)
        return response

    def close(self) -> None:
        self.closed += 1


async def _first_byte(
    request: MockRequest, answer: Awaitable[MockReply], timeout: float
) -> MockReply:
    task = asyncio.ensure_future(answer)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except BaseException:  # the caller was cancelled
        task.cancel()
        request.aborted = True
        raise
    if not done:
        task.cancel()
        request.aborted = True
        raise timeout_error("first-byte")
    return task.result()


class _MockFlow:
    """Plays a body script into a ``Response``, honouring its pause/resume/abort."""

    __slots__ = ("request", "response", "running", "task")

    def __init__(self, request: MockRequest) -> None:
        self.request = request
        self.running = asyncio.Event()
        self.running.set()
        self.task: asyncio.Task[None] | None = None
        self.response: Response | None = None

    def start(self, response: Response, script: BodyScript) -> None:
        """Feed what arrives at once (leading chunks, as in one packet with the headers);
        the rest, after a delay or a pause, plays in a task."""
        self.response = response
        items = iter(script)
        for item in items:
            if isinstance(item, bytes):
                response.feed(item)
                if not self.running.is_set():
                    break
            elif isinstance(item, Exception):
                response.finish(item)
                return
            else:
                self.task = asyncio.get_running_loop().create_task(self._play(item, items))
                return
        else:
            response.finish()
            return
        self.task = asyncio.get_running_loop().create_task(self._play(0.0, items))

    async def _play(self, delay: float, items: Iterator[bytes | float | Exception]) -> None:
        response = self.response
        assert response is not None
        await asyncio.sleep(delay)
        for item in items:
            if isinstance(item, bytes):
                await self.running.wait()
                response.feed(item)
            elif isinstance(item, Exception):
                response.finish(item)
                return
            else:
                await asyncio.sleep(item)
        await self.running.wait()
        response.finish()

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    def abort(self) -> None:
        self.request.aborted = True
        if self.task is not None:
            self.task.cancel()


__all__ = ["BodyScript", "Handler", "MockReply", "MockRequest", "MockTransport"]
