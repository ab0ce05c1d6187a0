"""A fake vLLM engine fast enough never to be the bottleneck of a router benchmark.

Raw asyncio Protocol + httptools + uvloop; every response is prebuilt bytes. It serves:

- ``POST /v1/chat/completions``: a fixed ~400-byte ``chat.completion`` JSON, or, when the
  body contains ``"stream": true``, a chunked ``text/event-stream`` of exactly ``--chunks``
  ``data: {chat.completion.chunk}`` events plus ``data: [DONE]`` in vLLM's format. Each
  event is a separate write: all at once, or with ``--chunk-delay-ms`` the first at once
  and the rest one per shared tick of that length (like a decoding engine).
- ``POST /v1/completions``: the same, shaped as ``text_completion``.
- ``GET /health`` (200, empty body, like vLLM) and ``GET /v1/models``.
- ``GET /metrics``: a fixed Prometheus body with vLLM's series names (an idle engine:
  nothing running or waiting, the KV cache empty) and its histogram layout, about the
  size of a real engine's, so the scored policies' scrapes read what they would in
  production.
- ``POST /v1/traces``: an OTLP/HTTP collector that keeps nothing (200, empty
  ``ExportTraceServiceResponse``), so the benchmark's tracing row exports real spans;
  ``GET /_stats`` counts the exports received (``{"trace_exports": N}``).

Keep-alive is honoured; requests that arrive during a paced stream wait their turn.
One core does tens of thousands of requests per second.

    python -m benchmarks.fast_engine --port 8100 [--chunk-delay-ms 5] [--chunks 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
from collections import deque
from dataclasses import dataclass
from typing import cast

import httptools
import uvloop

MODEL = "bench-model"
#: What the engine counts (read by the benchmark through ``GET /_stats``).
STATS = {"trace_exports": 0}
CREATED = 1700000000
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_WORDS = ("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and",
          "keeps", "on", "running", "through", "the", "field", "until", "the", "sun")


def _chat_completion() -> bytes:
    content = " ".join(_WORDS[:16])
    return (
        '{"id":"chatcmpl-bench00000000000000000000000000","object":"chat.completion",'
        f'"created":{CREATED},"model":"{MODEL}","choices":[{{"index":0,"message":'
        f'{{"role":"assistant","content":"{content}","tool_calls":[]}},"logprobs":null,'
        '"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":210,'
        '"total_tokens":230,"completion_tokens":20,"prompt_tokens_details":null},'
        '"prompt_logprobs":null}'
    ).encode()


def _text_completion() -> bytes:
    content = " ".join(_WORDS[:16])
    return (
        '{"id":"cmpl-bench00000000000000000000000000","object":"text_completion",'
        f'"created":{CREATED},"model":"{MODEL}","choices":[{{"index":0,"text":"{content}",'
        '"logprobs":null,"finish_reason":"stop","stop_reason":null,"prompt_logprobs":null}],'
        '"usage":{"prompt_tokens":210,"total_tokens":230,"completion_tokens":20,'
        '"prompt_tokens_details":null}}'
    ).encode()


def _chat_events(n: int) -> list[bytes]:
    head = (
        '{"id":"chatcmpl-bench00000000000000000000000000","object":"chat.completion.chunk",'
        f'"created":{CREATED},"model":"{MODEL}","choices":[{{"index":0,'
    )
    events = [head + '"delta":{"role":"assistant","content":""},"logprobs":null,'
              '"finish_reason":null}]}']
    for i in range(1, n - 1):
        word = _WORDS[i % len(_WORDS)]
        events.append(head + f'"delta":{{"content":" {word}"}},"logprobs":null,'
                      '"finish_reason":null}]}')
    events.append(head + '"delta":{"content":""},"logprobs":null,'
                  '"finish_reason":"stop","stop_reason":null}]}')
    return [f"data: {e}\n\n".encode() for e in events[:n]] + [b"data: [DONE]\n\n"]


def _text_events(n: int) -> list[bytes]:
    head = (
        '{"id":"cmpl-bench00000000000000000000000000","object":"text_completion",'
        f'"created":{CREATED},"model":"{MODEL}","choices":[{{"index":0,'
    )
    events = [head + f'"text":" {_WORDS[i % len(_WORDS)]}","logprobs":null,'
              '"finish_reason":null,"stop_reason":null}]}' for i in range(n - 1)]
    events.append(head + '"text":"","logprobs":null,"finish_reason":"stop",'
                  '"stop_reason":null}]}')
    return [f"data: {e}\n\n".encode() for e in events[:n]] + [b"data: [DONE]\n\n"]


def _fixed(status: str, ctype: str, body: bytes, keep_alive: bool = True) -> bytes:
    conn = b"" if keep_alive else b"connection: close\r\n"
    return (
        f"HTTP/1.1 {status}\r\nserver: fast-engine\r\ncontent-type: {ctype}\r\n"
        f"content-length: {len(body)}\r\n".encode() + conn + b"\r\n" + body
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nserver: fast-engine\r\n"
             b"content-type: text/event-stream; charset=utf-8\r\n"
             b"transfer-encoding: chunked\r\n\r\n")
_LAST_CHUNK = b"0\r\n\r\n"


def _metrics() -> bytes:
    """An idle vLLM engine's ``/metrics``: its three load series, then histograms."""
    labels = f'engine="0",model_name="{MODEL}"'
    lines = [f"# HELP vllm:{name} {name}.\n# TYPE vllm:{name} gauge\nvllm:{name}{{{labels}}} 0.0"
             for name in ("num_requests_running", "num_requests_waiting",
                          "kv_cache_usage_perc")]
    buckets = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0, "+Inf")
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens", "iteration_tokens_total"):
        lines.append(f"# HELP vllm:{name} {name}.\n# TYPE vllm:{name} histogram")
        lines += [f'vllm:{name}_bucket{{{labels},le="{b}"}} 0.0' for b in buckets]
        lines += [f"vllm:{name}_count{{{labels}}} 0.0", f"vllm:{name}_sum{{{labels}}} 0.0"]
    return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Replies:
    """Every byte string the engine ever sends, built once at start."""

    chat: bytes
    completion: bytes
    health: bytes
    metrics: bytes
    models: bytes
    not_found: bytes
    bad_request: bytes
    traces_accepted: bytes
    chat_chunks: tuple[bytes, ...]
    text_chunks: tuple[bytes, ...]

    @classmethod
    def build(cls, chunks: int) -> Replies:
        models = (f'{{"object":"list","data":[{{"id":"{MODEL}","object":"model",'
                  f'"created":{CREATED},"owned_by":"vllm","max_model_len":8192}}]}}').encode()
        err = b'{"object":"error","message":"Not Found","type":"NotFoundError","code":404}'
        return cls(
            chat=_fixed("200 OK", "application/json", _chat_completion()),
            completion=_fixed("200 OK", "application/json", _text_completion()),
            health=_fixed("200 OK", "application/json", b""),
            metrics=_fixed("200 OK", "text/plain; version=0.0.4; charset=utf-8", _metrics()),
            models=_fixed("200 OK", "application/json", models),
            not_found=_fixed("404 Not Found", "application/json", err),
            bad_request=_fixed("400 Bad Request", "text/plain", b"bad request", False),
            traces_accepted=_fixed("200 OK", "application/x-protobuf", b""),
            chat_chunks=tuple(_chunk(e) for e in _chat_events(chunks)),
            text_chunks=tuple(_chunk(e) for e in _text_events(chunks)),
        )


@dataclass(slots=True)
class _Paced:
    chunks: tuple[bytes, ...]
    next: int
    keep_alive: bool


class Pacer:
    """Sends the next event of every paced stream on one shared tick.

    One timer for all streams keeps pacing cheap: hundreds of concurrent streams cost one
    wakeup per tick, not one per stream.
    """

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._active: dict[EngineProtocol, _Paced] = {}
        self._handle: asyncio.TimerHandle | None = None

    def add(self, proto: EngineProtocol, chunks: tuple[bytes, ...], keep_alive: bool) -> None:
        """``chunks[0]`` has been written; the rest follow one per tick."""
        self._active[proto] = _Paced(chunks, 1, keep_alive)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.delay_s, self._tick)

    def drop(self, proto: EngineProtocol) -> None:
        self._active.pop(proto, None)

    def is_streaming(self, proto: EngineProtocol) -> bool:
        return proto in self._active

    def _tick(self) -> None:
        self._handle = None
        finished: list[tuple[EngineProtocol, bool]] = []
        for proto, st in self._active.items():
            if st.next == len(st.chunks) - 1:  # data: [DONE] goes with the terminating chunk
                proto.write(st.chunks[st.next] + _LAST_CHUNK)
                finished.append((proto, st.keep_alive))
            else:
                proto.write(st.chunks[st.next])
                st.next += 1
        for proto, _ in finished:
            del self._active[proto]
        for proto, keep_alive in finished:
            proto.stream_finished(keep_alive)
        if self._active and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.delay_s, self._tick)


class EngineProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer from :class:`Replies`."""

    __slots__ = ("_body", "_pacer", "_pending", "_replies", "_transport", "_url", "parser")

    def __init__(self, replies: Replies, pacer: Pacer | None) -> None:
        self._replies = replies
        self._pacer = pacer
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._pending: deque[tuple[bytes, bytes, bytes, bool]] = deque()
        self.parser = httptools.HttpRequestParser(self)

    # -- asyncio ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(self._replies.bad_request)
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._pacer is not None:
            self._pacer.drop(self)

    # -- httptools callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        request = (method, self._url, b"".join(self._body), self.parser.should_keep_alive())
        if self._pacer is not None and self._pacer.is_streaming(self):
            self._pending.append(request)
        else:
            self._answer(*request)

    # -- responses -------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def stream_finished(self, keep_alive: bool) -> None:
        """Called by the pacer after the last chunk; serve requests that queued meanwhile."""
        if not keep_alive and self._transport is not None:
            self._transport.close()
            return
        while self._pending and not (self._pacer and self._pacer.is_streaming(self)):
            self._answer(*self._pending.popleft())

    def _answer(self, method: bytes, url: bytes, body: bytes, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None:
            return
        path = url.split(b"?", 1)[0]
        r = self._replies
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            chat = path == b"/v1/chat/completions"
            if _STREAM_RE.search(body):
                self._stream(r.chat_chunks if chat else r.text_chunks, keep_alive)
                return
            transport.write(r.chat if chat else r.completion)
        elif method == b"GET" and path == b"/health":
            transport.write(r.health)
        elif method == b"GET" and path == b"/metrics":
            transport.write(r.metrics)
        elif method == b"POST" and path == b"/v1/traces":
            STATS["trace_exports"] += 1
            transport.write(r.traces_accepted)
        elif method == b"GET" and path == b"/_stats":
            transport.write(_fixed("200 OK", "application/json",
                                   json.dumps(STATS).encode()))
        elif method == b"GET" and path == b"/v1/models":
            transport.write(r.models)
        else:
            transport.write(r.not_found)
        if not keep_alive:
            transport.close()

    def _stream(self, chunks: tuple[bytes, ...], keep_alive: bool) -> None:
        """Headers and the first event now; the rest at once, or paced by the pacer."""
        transport = self._transport
        assert transport is not None
        transport.write(_SSE_HEAD)
        if self._pacer is not None:
            transport.write(chunks[0])
            self._pacer.add(self, chunks, keep_alive)
            return
        for chunk in chunks:
            transport.write(chunk)
        transport.write(_LAST_CHUNK)
        if not keep_alive:
            transport.close()


async def serve(host: str, port: int, chunks: int, delay_ms: float) -> None:
    """Listen until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    replies = Replies.build(chunks)
    pacer = Pacer(delay_ms / 1000.0) if delay_ms > 0 else None
    server = await loop.create_server(
        lambda: EngineProtocol(replies, pacer), host, port, backlog=4096, reuse_address=True)
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    print(f"fast_engine listening on http://{host}:{port}", flush=True)
    try:
        await stop
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--chunks", type=int, default=20, help="chunk events per stream")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0,
                   help="pause between stream events, on a shared tick (0: all at once)")
    args = p.parse_args(argv)
    if args.chunks < 1:
        p.error(f"--chunks must be at least 1, got {args.chunks}")
    uvloop.run(serve(args.host, args.port, args.chunks, args.chunk_delay_ms))


if __name__ == "__main__":
    main()
