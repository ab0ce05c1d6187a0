"""The access log: one JSON line per proxied request, written off the event loop.

A line carries what an operator needs to find a request again and see where its time
went: request id, trace id, API key id, origin (a client's request or a batch line),
model, endpoint group, backend, status, duration, time to first byte, bytes in and out,
tokens, retries. Never a body, never a header value other
than the request id and the trace id (so no API key can leak into it).

Why not ``logging``: a ``LogRecord`` plus a ``QueueHandler`` (record, copy, format) costs
several times a dict and one ``orjson.dumps``. The event loop only serializes the line and
appends it to a list; every 100 ms (or every 256 lines) the batch goes to a writer thread
that writes it to stderr in pieces of at most 4096 bytes cut at line ends, so lines from
several workers sharing one pipe never interleave (POSIX keeps writes up to ``PIPE_BUF``
whole). The lines name their source in ``"logger": "routeyard.access"``, for log shippers
that read the same stream as the router's other logs.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from router.record import Record

LOGGER = "routeyard.access"
#: Largest write that a pipe keeps whole (POSIX PIPE_BUF on Linux).
ATOMIC_WRITE = 4096
FLUSH_INTERVAL = 0.1
FLUSH_LINES = 256


def _trace_id_of(headers: Mapping[str, str]) -> str | None:
    """The trace id of an incoming W3C ``traceparent``, when routeyard itself does not trace."""
    value = headers.get("traceparent")
    if value and len(value) >= 55 and value[2] == "-":
        return value[3:35]
    return None


class AccessLog:
    """Collects lines on the event loop; a writer thread writes them to ``fd``."""

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd
        self.lines: list[bytes] = []
        self.queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.timer: asyncio.TimerHandle | None = None
        self._ms = -1
        self._stamp = ""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.thread = threading.Thread(target=self._write_forever, name=LOGGER, daemon=True)
        self.thread.start()
        self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self.flush()
        self.timer = loop.call_later(FLUSH_INTERVAL, self._schedule, loop)

    def finish(self, record: Record) -> None:
        """Append the line for one finished request (the ``Sink`` protocol)."""
        duration = perf_counter() - record.t0
        outcome = record.outcome
        trace = record.trace
        trace_id = (trace.trace_id() if trace is not None else None) or _trace_id_of(
            record.headers)
        line = orjson.dumps({
            "time": self._time(),
            "logger": LOGGER,
            "request_id": record.request_id,
            "trace_id": trace_id,
            "key": record.key_id,
            "origin": record.origin,
            "method": record.method,
            "path": record.path,
            "model": record.model,
            "group": record.group,
            "backend": outcome.backend or None,
            "status": record.status,
            "duration_ms": int(duration * 1e6) / 1000,
            "ttfb_ms": (int((outcome.t_first - record.t0) * 1e6) / 1000 if outcome.t_first
                        else None),
            "bytes_in": record.bytes_in,
            "bytes_out": outcome.bytes_out,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "retries": outcome.retries,
            "error": record.error,
            "client": record.client_ip,
        })
        lines = self.lines
        lines.append(line)
        if len(lines) >= FLUSH_LINES:
            self.flush()

    def _time(self) -> str:
        """UTC ISO 8601 with milliseconds, formatted once per millisecond."""
        ms = int(time.time() * 1000)
        if ms != self._ms:
            self._ms = ms
            second, rest = divmod(ms, 1000)
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{rest:03d}Z"
        return self._stamp

    def flush(self) -> None:
        if self.lines:
            lines = self.lines
            self.lines = []
            self.queue.put(b"\n".join(lines) + b"\n")

    def close(self) -> None:
        """Write what is pending and stop the writer thread (at worker stop)."""
        if self.timer is not None:
            self.timer.cancel()
        self.flush()
        self.queue.put(None)
        if self.thread is not None:
            self.thread.join(5)

    # -- the writer thread ---------------------------------------------------------------
    def _write_forever(self) -> None:
        while True:
            data = self.queue.get()
            if data is None:
                return
            try:
                for piece in _pieces(data):
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(self.fd, view):]
            except OSError:
                pass  # stderr gone (a closed pipe): drop the batch, keep serving


def _pieces(data: bytes) -> list[bytes]:
    """``data`` cut after a newline into pieces of at most ``ATOMIC_WRITE`` bytes (a longer
    single line stays whole)."""
    if len(data) <= ATOMIC_WRITE:
        return [data]
    pieces = []
    start = 0
    end = len(data)
    while start < end:
        if end - start <= ATOMIC_WRITE:
            pieces.append(data[start:])
            break
        cut = data.rfind(b"\n", start, start + ATOMIC_WRITE)
        if cut < 0:
            cut = data.find(b"\n", start + ATOMIC_WRITE)
            if cut < 0:
                cut = end - 1
        pieces.append(data[start:cut + 1])
        start = cut + 1
    return pieces
