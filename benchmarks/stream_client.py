"""A small raw-socket streaming client: time to first body byte and to the end of the stream.

Each connection sends one streaming chat request at a time over keep-alive, timestamps the
first byte of the (chunked) body and the end of the chunked body, and counts SSE
``data: {...}`` events (``data: [DONE]`` is not counted). httptools does the parsing in C,
so one core can keep hundreds of streams busy.

    python -m benchmarks.stream_client --port 8100 --connections 16 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import cast

import httptools
import uvloop

_EVENT = b"data: {"
_CARRY = len(_EVENT) - 1


def stream_body(model: str, size: int = 1024) -> bytes:
    """A streaming chat request of about ``size`` bytes of JSON."""
    base: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": ""}],
        "max_tokens": 20,
        "stream": True,
    }
    pad = size - len(json.dumps(base))
    base["messages"] = [{"role": "user", "content": "x" * max(pad, 0)}]
    return json.dumps(base).encode()


def build_request(host: str, port: int, body: bytes,
                  path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@dataclass
class StreamStats:
    """Everything one run saw. Times are milliseconds."""

    ttfb_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    events: int = 0
    streams: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    record: bool = True  # False: count only (long soaks), keep no per-stream times

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s else 0.0

    def p(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class StreamConnection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] | None = None
        self.t_first = 0.0
        self.t_end = 0.0
        self.events = 0
        self._tail = b""

    def start(self, request: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.t_first = self.t_end = 0.0
        self.events = 0
        self._tail = b""
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(exc or ConnectionResetError("server closed the connection"))

    def on_body(self, body: bytes) -> None:
        if not self.t_first:
            self.t_first = time.perf_counter()
        data = self._tail + body
        self.events += data.count(_EVENT)
        self._tail = data[-_CARRY:]

    def on_message_complete(self) -> None:
        self.t_end = time.perf_counter()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)


async def _worker(host: str, port: int, request: bytes, deadline: float,
                  max_streams: int | None, expect_events: int | None,
                  stats: StreamStats) -> None:
    loop = asyncio.get_running_loop()
    conn: StreamConnection | None = None
    done = 0
    while time.perf_counter() < deadline and (max_streams is None or done < max_streams):
        try:
            if conn is None or conn.transport is None:
                _, conn = await loop.create_connection(StreamConnection, host, port)
            t0 = time.perf_counter()
            await asyncio.wait_for(conn.start(request), timeout=30)
        except (TimeoutError, OSError, httptools.HttpParserError):
            stats.errors += 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            conn = None
            await asyncio.sleep(0.01)
            continue
        done += 1
        stats.events += conn.events
        status = conn.parser.get_status_code()
        if status != 200 or (expect_events is not None and conn.events != expect_events):
            stats.errors += 1
            continue
        stats.streams += 1
        if stats.record:
            stats.ttfb_ms.append((conn.t_first - t0) * 1000.0)
            stats.total_ms.append((conn.t_end - t0) * 1000.0)
    if conn is not None and conn.transport is not None:
        conn.transport.close()


async def run_streams(host: str, port: int, request: bytes, connections: int,
                      seconds: float, max_streams: int | None = None,
                      expect_events: int | None = 20,
                      stats: StreamStats | None = None) -> StreamStats:
    """Keep ``connections`` streams going for ``seconds`` (or ``max_streams`` each).

    Pass ``stats`` to watch the counters while the run goes on.
    """
    stats = stats if stats is not None else StreamStats()
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(
        _worker(host, port, request, deadline, max_streams, expect_events, stats)
        for _ in range(connections)))
    stats.elapsed_s = time.perf_counter() - start
    return stats


def measure(host: str, port: int, request: bytes, connections: int, seconds: float,
            max_streams: int | None = None, expect_events: int | None = 20) -> StreamStats:
    """Synchronous wrapper: one uvloop event loop per run."""
    return uvloop.run(run_streams(host, port, request, connections, seconds,
                                  max_streams, expect_events))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--model", default="bench-model")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    request = build_request(args.host, args.port, stream_body(args.model))
    s = measure(args.host, args.port, request, args.connections, args.seconds)
    print(f"streams={s.streams} errors={s.errors} events/s={s.events_per_s:,.0f} "
          f"ttfb p50={statistics.median(s.ttfb_ms or [float('nan')]):.3f}ms "
          f"p99={s.p(s.ttfb_ms, 0.99):.3f}ms "
          f"total p50={statistics.median(s.total_ms or [float('nan')]):.3f}ms")


if __name__ == "__main__":
    main()
