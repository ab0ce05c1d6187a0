"""Building blocks for socket-free tests of the request path: snapshots whose backends are
``MockTransport``s, scripted answers, and stubs of the relay's hooks.

    fleet = Fleet()
    fleet.on("a", answers(reply(502), reply(200)))
    snap = await snapshot_of(MODEL_YAML, fleet)
    status, body = await forward(snap.models["m"], outbound(), Outcome(), read_all)

Backend URLs are ``http://<name>:8000``: the fleet keys its transports (and handlers) by
``<name>``, the endpoint key is the URL (``fleet.key("a")``).
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from router.config import HealthChecks, OutlierDetection, parse
from router.discovery import Resolver
from router.endpoint import Endpoint, EndpointRegistry
from router.relay import Capture, Outbound
from router.snapshot import ModelEntry, Snapshot, build
from router.upstream import Origin, Response
from router.upstream_mock import Handler, MockReply, MockRequest, MockTransport

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]


def reply(status: int = 200, body: bytes | list[Any] = b'{"ok":true}',
          headers: list[tuple[bytes, bytes]] | None = None) -> MockReply:
    """A scripted answer: a body of known length, or a body script (list) streamed."""
    if isinstance(body, bytes):
        head = [*(JSON if headers is None else headers),
                (b"content-length", str(len(body)).encode())]
        return MockReply(status, head, [body])
    return MockReply(status, list(SSE if headers is None else headers), body)


def answers(*items: MockReply | Exception | Handler) -> Handler:
    """A handler answering the n-th request it gets with the n-th item (the last item
    repeats): a reply, an exception raised (a connect failure, say), or a handler."""
    script = list(items)
    calls = 0

    def handle(request: MockRequest) -> MockReply | Awaitable[MockReply]:
        nonlocal calls
        item = script[min(calls, len(script) - 1)]
        calls += 1
        if isinstance(item, Exception):
            raise item
        if isinstance(item, MockReply):
            return item
        return item(request)

    return handle


class Gate:
    """A backend that holds each request until ``open()``: ``arrived`` is set when the
    first request is in, so tests wait for that instead of sleeping."""

    def __init__(self, answer: MockReply | None = None) -> None:
        self.answer = answer or reply()
        self.arrived = asyncio.Event()
        self.opened = asyncio.Event()
        self.requests: list[MockRequest] = []

    async def __call__(self, request: MockRequest) -> MockReply:
        self.requests.append(request)
        self.arrived.set()
        await self.opened.wait()
        return self.answer

    def open(self) -> None:
        self.opened.set()


class Fleet:
    """Named mock backends; ``transport`` is the ``EndpointRegistry``'s factory."""

    def __init__(self, default: Handler | None = None) -> None:
        self.default: Handler = default or answers(reply())
        self.handlers: dict[str, Handler] = {}
        self.transports: dict[str, MockTransport] = {}
        #: (backend name, request) for every request any backend got, in order.
        self.asked: list[tuple[str, MockRequest]] = []

    def on(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    @staticmethod
    def key(name: str) -> str:
        return f"http://{name}:8000"

    def transport(self, origin: Origin) -> MockTransport:
        name = origin.host

        def handle(request: MockRequest) -> MockReply | Awaitable[MockReply]:
            self.asked.append((name, request))
            return self.handlers.get(name, self.default)(request)

        transport = self.transports[name] = MockTransport(handle)
        return transport

    def requests(self, name: str) -> list[MockRequest]:
        transport = self.transports.get(name)
        return transport.requests if transport is not None else []

    @property
    def names(self) -> list[str]:
        """The backend asked by each request, in order."""
        return [name for name, _ in self.asked]


async def snapshot_of(yaml_text: str, fleet: Fleet) -> Snapshot:
    config = parse(textwrap.dedent(yaml_text).encode())
    registry = EndpointRegistry(transports=fleet.transport)
    return await build(config, registry, Resolver())


FAST_RETRIES = "{attempts: 2, backoff: 1ms, max_backoff: 1ms}"


def model_yaml(*backends: str, name: str = "m", extra: str = "", defaults: str = "",
               endpoints: str = "[chat, responses]", retries: str = FAST_RETRIES) -> str:
    """routes.yaml with one model over ``backends`` (names), fast retries; ``extra``:
    more lines of the model (4-space indent), ``defaults``: lines under defaults."""
    lines = []
    if defaults:
        lines += ["defaults:", textwrap.indent(textwrap.dedent(defaults).strip("\n"), "  ")]
    lines += ["models:", *model_lines(name, backends, extra, endpoints, retries)]
    return "\n".join(lines) + "\n"


def model_lines(name: str, backends: tuple[str, ...] | list[str], extra: str = "",
                endpoints: str = "[chat, responses]", retries: str = FAST_RETRIES) -> list[str]:
    lines = [f"  {name}:", "    backends:"]
    lines += [f"      - url: {Fleet.key(b)}" for b in backends]
    lines += [f"    endpoints: {endpoints}",
              f"    retries: {retries}"]
    if extra:
        lines.append(textwrap.indent(textwrap.dedent(extra).strip("\n"), "    "))
    return lines


async def model_of(fleet: Fleet, *backends: str, **kwargs: str) -> ModelEntry:
    snap = await snapshot_of(model_yaml(*backends, **kwargs), fleet)
    return snap.models[kwargs.get("name", "m")]


def endpoint(model: ModelEntry, name: str) -> Endpoint:
    key = Fleet.key(name)
    return next(e for e in model.cluster.endpoints if e.key == key)


def mark_down(ep: Endpoint) -> None:
    """Active checks found ``ep`` unhealthy."""
    ep.health.checked("health check: down", HealthChecks(unhealthy_threshold=1),
                      OutlierDetection())


def assert_idle(*models: ModelEntry) -> None:
    """Every lease was given back: nothing in flight at the clusters or their endpoints."""
    for model in models:
        assert model.cluster.in_flight == 0
        assert {e.key: e.in_flight for e in model.cluster.endpoints} == {
            e.key: 0 for e in model.cluster.endpoints}
        assert not model.cluster.waiters


def outbound(body: bytes = b'{"model":"m"}', headers: dict[str, str] | None = None,
             target: str = "/v1/chat/completions", method: str = "POST",
             request_id: str = "req-1", client_ip: str = "10.0.0.9",
             strip_keys: bool = False) -> Outbound:
    return Outbound(method, target, headers if headers is not None else {}, body,
                    request_id, client_ip, strip_keys)


async def read_all(response: Response, capture: Capture | None) -> tuple[int, bytes]:
    """The simplest ``Deliver``: status and whole body."""
    return response.status, await response.read()


async def status_only(response: Response, capture: Capture | None) -> int:
    """A ``Deliver`` that never reads the body (the relay must abort it)."""
    return response.status


async def read_captured(response: Response, capture: Capture | None) -> tuple[int, bytes]:
    """A ``Deliver`` that shows each chunk to the capture as ``send_answer`` does."""
    parts = []
    async for chunk in response.iter_chunks():
        parts.append(chunk)
        if capture is not None and capture(chunk):
            capture = None
    return response.status, b"".join(parts)


async def until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    """Yield to the loop until ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


@dataclass
class TraceStub:
    """An ``AttemptTrace`` that writes down each call."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def attempt(self, target: Any, number: int) -> str | None:
        self.calls.append(("attempt", target.key, number))
        return f"traceparent: 00-{'a' * 32}-{number + 1:016x}-01\r\n"

    def attempt_ended(self, status: int, error: str | None) -> None:
        self.calls.append(("ended", status, error))

    def trace_id(self) -> str | None:
        return "a" * 32


class PlacementStub:
    """A ``Placement``: ``prefer``, statuses that pass, and a capture it hands out."""

    def __init__(self, prefer: str | None = None, passing: frozenset[int] = frozenset({404})):
        self._prefer = prefer
        self.passing = passing
        self.passed: list[tuple[int, bool]] = []
        self.answered_by: list[tuple[str, int]] = []
        self.seen: list[bytes] = []

        def capture(data: bytes) -> bool:
            self.seen.append(data)
            return True

        self.capture: Capture = capture

    @property
    def prefer(self) -> str | None:
        return self._prefer

    def passes(self, status: int, more: bool) -> bool:
        self.passed.append((status, more))
        return status in self.passing

    def answered(self, endpoint: Endpoint, status: int) -> Capture | None:
        self.answered_by.append((endpoint.key, status))
        return self.capture
