"""Observability fixtures: an in-memory OTLP collector (HTTP and gRPC) and routers whose
environment a test chooses (tracing, metrics and access log switches, workers).

The router runs as its own process and is observed only from outside: spans arrive at the
collector over OTLP exactly as they would at an OpenTelemetry Collector, metrics come from
``GET /metrics``, the access log from the router's stderr.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.harness import Router, free_port, start_router, wait_until

#: Inherited variables a router under observation does not see: it gets only what the
#: test sets.
CLEAN_ENV = ("OTEL_", "ROUTEYARD_", "PROMETHEUS_")
KIND_NAMES = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass
class Span:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    status: int  # 0 unset, 1 ok, 2 error
    service: str


def _value(any_value: Any) -> Any:
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which else None


def _spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(Span(
                    name=s.name, kind=KIND_NAMES.get(s.kind, str(s.kind)),
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(),
                    attributes={a.key: _value(a.value) for a in s.attributes},
                    status=s.status.code, service=resource.get("service.name", ""),
                ))
    return out


class Collector:
    """Keeps every span it receives, in memory; ``wait_trace`` waits for a whole trace."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        self.port = free_port()

    def add(self, body: bytes) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        with self.lock:
            self.spans.extend(_spans(request))

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_trace(self, trace_id: str, count: int, router: Router,
                   timeout: float = 10) -> list[Span]:
        """The spans of ``trace_id`` once ``count`` arrived and a marker trace sent through
        ``router`` after them arrived too (see ``settle``), so that a span more would show."""
        wait_until(lambda: len(self.trace(trace_id)) >= count, timeout,
                   f"{count} spans of trace {trace_id} arrive")
        self.settle(router, timeout)
        return self.trace(trace_id)

    def settle(self, router: Router, timeout: float = 10) -> None:
        """Send a sampled marker request through ``router`` (one worker, ``obs-chat``) and
        wait for its three spans: the worker's batch span processor exports spans in the
        order they ended, one batch at a time, so every span of a request answered before
        the marker was sent has arrived by then, or never will."""
        trace_id = secrets.token_hex(16)
        r = router.client.post("/v1/chat/completions", json={
            "model": "obs-chat", "messages": [{"role": "user", "content": "marker"}]},
            headers={"traceparent": traceparent(trace_id, secrets.token_hex(8))})
        assert r.status_code == 200, r.text
        wait_until(lambda: len(self.trace(trace_id)) >= 3, timeout, "the marker trace arrives")


class _OtlpHttpHandler(BaseHTTPRequestHandler):
    collector: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/v1/traces":
            self.collector.add(body)
            payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
        else:
            payload = b""
            self.send_response(404)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def otlp_http() -> Iterator[Collector]:
    """An OTLP/HTTP (protobuf) collector on 127.0.0.1."""
    collector = Collector()
    handler = type("Handler", (_OtlpHttpHandler,), {"collector": collector})
    server = ThreadingHTTPServer(("127.0.0.1", collector.port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield collector
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def otlp_grpc() -> Iterator[Collector]:
    """An OTLP/gRPC collector on 127.0.0.1."""
    import grpc

    collector = Collector()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            collector.add(request.SerializeToString())
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    server.add_insecure_port(f"127.0.0.1:{collector.port}")
    server.start()
    yield collector
    server.stop(None)


def chat_routes(engines: dict[str, str], extra: str = "",
                health: str = "{enabled: false}") -> str:
    """A chat model on the shared fake engine (by default no health checks: no probe noise)."""
    return (
        f"defaults:\n  health_checks: {health}\n"
        "models:\n"
        "  obs-chat:\n"
        f"    backends: [{{url: {engines['generate']}}}]\n"
        "    backend_model: chat-model\n"
        "    endpoints: [chat, completions, responses, messages]\n" + extra
    )


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


def engine_request(engines: dict[str, str], request_id: str) -> dict[str, Any]:
    """What the fake engine received for ``request_id`` (its headers included)."""
    for entry in httpx.get(f"{engines['generate']}/_fake/requests").json():
        if entry["request_id"] == request_id:
            return entry
    raise AssertionError(f"the engine never saw {request_id}")


@pytest.fixture(scope="session")
def logged(engines: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """The access log on (it is off by default), tracing off."""
    with start_router(tmp_path_factory.mktemp("logged"), chat_routes(engines),
                      env={"ROUTEYARD_ACCESS_LOG": "true"}, drop_env=CLEAN_ENV) as router:
        yield router
