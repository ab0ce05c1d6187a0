"""A loopback engine whose ``/metrics`` the test sets: vLLM's body (``tests.vllm_metrics``)
with the running, waiting and KV-cache values of ``state``, or no answer at all while
``hang`` is set (a stopped engine, as ``kill -STOP`` leaves it). It also answers
``/health``, ``/v1/models`` and a minimal ``/v1/chat/completions``, counting the chats.

It runs in a thread of the test process (``http.server``), so a router process on
loopback reaches it while the test's own code blocks.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from tests.vllm_metrics import metrics_text


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a scrape the router gave up on: its connection is gone when the answer comes


class MetricsEngine:
    def __init__(self, model: str = "chat-model") -> None:
        self.model = model
        self.running = 0
        self.waiting = 0
        self.kv_cache = 0.0
        self.chats = 0
        self.scrapes = 0
        #: While set, ``/metrics`` never answers (until the engine stops).
        self.hang = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    with engine.lock:
                        engine.scrapes += 1
                    while engine.hang.is_set() and not engine.stopping.is_set():
                        engine.stopping.wait(0.05)
                    if engine.stopping.is_set():
                        self.close_connection = True
                        return
                    body = metrics_text(engine.running, engine.waiting, engine.kv_cache,
                                        model=engine.model)
                    self._send(200, body.encode(), "text/plain; version=0.0.4")
                elif self.path == "/health":
                    self._send(200, b"", "application/json")
                elif self.path == "/v1/models":
                    cards = {"object": "list", "data": [{"id": engine.model, "object": "model"}]}
                    self._send(200, json.dumps(cards).encode(), "application/json")
                else:
                    self._send(404, b'{"detail":"Not Found"}', "application/json")

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                self.rfile.read(length)
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"detail":"Not Found"}', "application/json")
                    return
                with engine.lock:
                    engine.chats += 1
                answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                          "model": engine.model,
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": "hi"}}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                    "total_tokens": 2}}
                self._send(200, json.dumps(answer).encode(), "application/json")

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def set(self, running: int = 0, waiting: int = 0, kv_cache: float = 0.0) -> None:
        self.running, self.waiting, self.kv_cache = running, waiting, kv_cache

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
