"""Traces: one SERVER span per request continuing the caller's trace, a routing child, a
CLIENT child per attempt whose context reaches the engine as ``traceparent``."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from router.tracing import exporter_names, otlp_protocol, tracing_wanted
from router.usage import usage_of
from tests.harness import Router, free_port, run_cli, start_router, wait_until
from tests.observability.conftest import (
    CLEAN_ENV,
    Collector,
    Span,
    chat_routes,
    engine_request,
    traceparent,
)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def traced(engines: dict[str, str], otlp_http: Collector,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """Tracing on through the standard variables only, OTLP over HTTP/protobuf."""
    extra = (
        # the first backend refuses connections: a request there is retried on the second
        "  obs-retry:\n"
        f"    backends: [{{url: 'http://127.0.0.1:{free_port()}'}}, "
        f"{{url: {engines['generate']}}}]\n"
        "    backend_model: chat-model\n    endpoints: [chat]\n"
        "    retries: {attempts: 1, backoff: 1ms}\n"
        "  obs-queue:\n"
        f"    backends: [{{url: {engines['generate']}}}]\n"
        "    backend_model: chat-model\n    endpoints: [chat]\n"
        "    max_in_flight: 1\n    queue: {size: 1, timeout: 5s}\n"
    )
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_http.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "routeyard-under-test",
        "ROUTEYARD_ACCESS_LOG": "true",
    }
    with start_router(tmp_path_factory.mktemp("traced"), chat_routes(engines, extra), env=env,
                      drop_env=CLEAN_ENV) as router:
        yield router


def _ids() -> tuple[str, str]:
    return secrets.token_hex(16), secrets.token_hex(8)


def _by_kind(spans: list[Span], kind: str) -> list[Span]:
    return [s for s in spans if s.kind == kind]


def test_spans_continue_the_callers_trace_and_reach_the_engine(
        traced: Router, otlp_http: Collector, engines: dict[str, str]) -> None:
    trace_id, caller_span = _ids()
    r = traced.client.post(CHAT, json={"model": "obs-chat", "messages": MESSAGES},
                           headers={"traceparent": traceparent(trace_id, caller_span)})
    assert r.status_code == 200
    usage = r.json()["usage"]
    spans = otlp_http.wait_trace(trace_id, 3, traced)
    assert len(spans) == 3, spans
    [server] = _by_kind(spans, "SERVER")
    [route] = _by_kind(spans, "INTERNAL")
    [client] = _by_kind(spans, "CLIENT")
    assert server.parent_id == caller_span
    assert route.parent_id == server.span_id and client.parent_id == server.span_id
    assert server.service == "routeyard-under-test"

    # The engine got the CLIENT span as its parent, in the same trace.
    received = engine_request(engines, r.headers["x-request-id"])["headers"]["traceparent"]
    version, got_trace, got_parent, flags = received.split("-")
    assert (version, got_trace, got_parent) == ("00", trace_id, client.span_id)
    assert int(flags, 16) & 1  # sampled

    a = server.attributes
    assert server.name == f"POST {CHAT}"
    assert a["http.request.method"] == "POST" and a["http.route"] == CHAT
    assert a["http.response.status_code"] == 200
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "obs-chat"
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["routeyard.endpoint_group"] == "chat"
    assert a["routeyard.backend"] == engines["generate"]
    assert a["routeyard.retries"] == 0
    assert a["routeyard.request_id"] == r.headers["x-request-id"]
    assert 0 < a["routeyard.time_to_first_byte"] < 5
    assert server.status != 2

    assert route.name == "route"
    assert route.attributes["routeyard.backend"] == engines["generate"]
    c = client.attributes
    assert client.name == "chat chat-model"  # the model name the engine serves
    assert c["gen_ai.request.model"] == "chat-model"
    assert c["http.response.status_code"] == 200
    assert c["server.port"] == int(engines["generate"].rsplit(":", 1)[1])
    assert c["url.full"] == engines["generate"] + CHAT

    line = traced.access_line(r.headers["x-request-id"])  # the log names the same trace
    assert line["trace_id"] == trace_id and line["status"] == 200


def test_stream_usage_chunk_lands_on_the_span(traced: Router,
                                              otlp_http: Collector) -> None:
    trace_id, caller_span = _ids()
    body = {"model": "obs-chat", "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}}
    with traced.client.stream("POST", CHAT, json=body,
                              headers={"traceparent": traceparent(trace_id, caller_span),
                                       "x-fake-tokens": "5", "x-fake-token-delay-ms": "5"}) as r:
        raw = b"".join(r.iter_raw())
    found = usage_of(raw)
    assert found is not None and found[1] == 5
    [server] = _by_kind(otlp_http.wait_trace(trace_id, 3, traced), "SERVER")
    assert server.attributes["gen_ai.usage.input_tokens"] == found[0]
    assert server.attributes["gen_ai.usage.output_tokens"] == 5


def test_retry_shows_as_a_second_client_span(traced: Router, otlp_http: Collector,
                                             engines: dict[str, str]) -> None:
    # Round robin starts anywhere: within a few requests one meets the dead backend first.
    for _ in range(6):
        trace_id, caller_span = _ids()
        r = traced.client.post(CHAT, json={"model": "obs-retry", "messages": MESSAGES},
                               headers={"traceparent": traceparent(trace_id, caller_span)})
        assert r.status_code == 200
        spans = otlp_http.wait_trace(trace_id, 3, traced)
        if len(_by_kind(spans, "CLIENT")) == 2:
            break
    else:
        raise AssertionError("no request was retried")
    [server] = _by_kind(spans, "SERVER")
    first, second = sorted(_by_kind(spans, "CLIENT"),
                           key=lambda s: s.attributes.get("http.request.resend_count", 0))
    assert first.parent_id == second.parent_id == server.span_id
    assert first.attributes["error.type"] == "backend_unavailable" and first.status == 2
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["http.response.status_code"] == 200
    assert server.attributes["routeyard.retries"] == 1
    received = engine_request(engines, r.headers["x-request-id"])["headers"]["traceparent"]
    assert received.split("-")[2] == second.span_id


def test_unsampled_caller_gets_no_spans_but_its_trace_reaches_the_engine(
        traced: Router, otlp_http: Collector, engines: dict[str, str]) -> None:
    trace_id, caller_span = _ids()
    r = traced.client.post(CHAT, json={"model": "obs-chat", "messages": MESSAGES},
                           headers={"traceparent": f"00-{trace_id}-{caller_span}-00"})
    assert r.status_code == 200
    received = engine_request(engines, r.headers["x-request-id"])["headers"]["traceparent"]
    _version, got_trace, got_parent, flags = received.split("-")
    assert got_trace == trace_id and got_parent != caller_span and int(flags, 16) & 1 == 0
    otlp_http.settle(traced)  # a sampled trace after it arrived: this one would have too
    assert otlp_http.trace(trace_id) == []


def test_router_error_ends_the_routing_span_in_error(traced: Router,
                                                     otlp_http: Collector) -> None:
    trace_id, caller_span = _ids()
    r = traced.client.post(CHAT, json={"model": "no-such-model", "messages": MESSAGES},
                           headers={"traceparent": traceparent(trace_id, caller_span)})
    assert r.status_code == 404
    spans = otlp_http.wait_trace(trace_id, 2, traced)
    assert not _by_kind(spans, "CLIENT")
    [server] = _by_kind(spans, "SERVER")
    [route] = _by_kind(spans, "INTERNAL")
    assert server.attributes["http.response.status_code"] == 404
    assert server.status != 2  # a 4xx is the client's error, not the server span's
    assert route.status == 2 and route.attributes["error.type"] == "model_not_found"


def test_queue_wait_is_on_the_routing_span_and_429_is_counted(
        traced: Router, otlp_http: Collector) -> None:
    import concurrent.futures as cf

    before = traced.scrape()
    body = {"model": "obs-queue", "messages": MESSAGES}

    def send(latency_ms: int, trace_id: str) -> httpx.Response:
        return httpx.post(f"{traced.url}{CHAT}", json=body, timeout=30, headers={
            "x-fake-latency-ms": str(latency_ms),
            "traceparent": traceparent(trace_id, secrets.token_hex(8))})

    holder, waiter, rejected = (secrets.token_hex(16) for _ in range(3))
    with cf.ThreadPoolExecutor(3) as pool:
        first = pool.submit(send, 2000, holder)  # outlasts the next two sends on a loaded machine
        wait_until(lambda: _in_flight(traced) == 1, 5, "the first request holds the slot")
        second = pool.submit(send, 0, waiter)  # waits in the queue (size 1)
        wait_until(lambda: _gauge(traced, "routeyard_queued_requests", model="obs-queue") == 1,
                   5, "the second request waits in the queue")
        third = pool.submit(send, 0, rejected)  # the queue is full: 429 at once
        assert third.result().status_code == 429
        assert first.result().status_code == 200 and second.result().status_code == 200
    [route] = _by_kind(otlp_http.wait_trace(waiter, 3, traced), "INTERNAL")
    assert 0.2 < route.attributes["routeyard.queue_wait"] < 5
    after = traced.scrape()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("routeyard_queue_rejections_total", model="obs-queue") == 1
    assert delta("routeyard_queue_wait_seconds_count", model="obs-queue") == 1
    assert delta("routeyard_requests_total", model="obs-queue", group="chat", backend="",
                 key="", origin="online", code="429") == 1


def _in_flight(router: Router) -> float:
    return sum(v for (name, _), v in router.scrape().items()
               if name == "routeyard_backend_in_flight_requests")


def _gauge(router: Router, name: str, **labels: str) -> float:
    return router.scrape().get((name, tuple(sorted(labels.items()))), 0)


def test_otlp_grpc_exports_too(engines: dict[str, str], otlp_grpc: Collector,
                               launch_router) -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{otlp_grpc.port}",
           "OTEL_BSP_SCHEDULE_DELAY": "100", "ROUTEYARD_METRICS": "false",
           "ROUTEYARD_ACCESS_LOG": "false"}
    router = launch_router(chat_routes(engines), env=env, drop_env=CLEAN_ENV)
    trace_id, caller_span = _ids()
    r = router.client.post(CHAT, json={"model": "obs-chat", "messages": MESSAGES},
                           headers={"traceparent": traceparent(trace_id, caller_span)})
    assert r.status_code == 200
    spans = otlp_grpc.wait_trace(trace_id, 3, router)
    assert sorted(s.kind for s in spans) == ["CLIENT", "INTERNAL", "SERVER"]


def test_tracing_off_passes_the_incoming_traceparent_through(
        router: Router, engines: dict[str, str]) -> None:
    """The shared router has no OTEL_* settings: it traces nothing and changes nothing."""
    trace_id, caller_span = _ids()
    sent = traceparent(trace_id, caller_span)
    r = router.client.post(CHAT, json={"model": "chat-model", "messages": MESSAGES},
                           headers={"traceparent": sent, "tracestate": "gw=1"})
    assert r.status_code == 200
    headers = engine_request(engines, r.headers["x-request-id"])["headers"]
    assert headers["traceparent"] == sent and headers["tracestate"] == "gw=1"


@pytest.mark.parametrize(("env", "setting", "on"), [
    ({}, None, False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, None, True),
    ({"OTEL_TRACES_EXPORTER": "console,otlp"}, None, True),
    ({"OTEL_TRACES_EXPORTER": "none"}, None, False),
    ({"OTEL_SDK_DISABLED": "false"}, None, True),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None, False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, False, False),
    ({"OTEL_TRACES_EXPORTER": "none"}, True, True),
    ({}, True, True),
])
def test_tracing_switch_rule(env: dict[str, str], setting: bool | None, on: bool) -> None:
    assert tracing_wanted(env, setting) is on


def test_exporter_and_protocol_validation() -> None:
    assert exporter_names({}) == ["otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console, otlp"}) == ["console", "otlp"]
    assert otlp_protocol({}) == "http/protobuf"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                          "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}) == "http/protobuf"
    with pytest.raises(ValueError, match="zipkin"):
        exporter_names({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="http/json"):
        otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_serve_refuses_an_unknown_exporter_before_starting(tmp_path: Path) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text("models:\n  m:\n    backends: [{url: 'http://127.0.0.1:9'}]\n"
                      "    endpoints: [chat]\n")
    done = run_cli("serve", "--config", str(config), "--port", str(free_port()),
                   env={"OTEL_TRACES_EXPORTER": "jaeger"})
    assert done.returncode == 1
    assert "OTEL_TRACES_EXPORTER='jaeger'" in done.stderr and "otlp" in done.stderr


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}', (3, 2)),
    (b'{"usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 1},'
     b' "completion_tokens": 4}}', (3, 4)),
    (b'data: {"type":"response.completed","response":{"usage":{"input_tokens":7,'
     b'"input_tokens_details":{"cached_tokens":0},"output_tokens":9,'
     b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":16}}}\n\n', (7, 9)),
    (b'event: message_start\ndata: {"message":{"usage":{"input_tokens":10,"output_tokens":1}}}'
     b'\n\nevent: message_delta\ndata: {"usage":{"output_tokens":12}}\n\n', (10, 12)),
    (b'{"usage":{"type":"duration","seconds":3}}', None),
    (b'{"content":"the usage was high","usage":null}', None),
    (b'{"content":"\\"usage\\": {\\"prompt_tokens\\": 9}"}', None),
    (b'data: {"usage":{"prompt_tokens":3,"compl', None),
])
def test_usage_is_read_from_the_usage_object_only(data: bytes, expected: object) -> None:
    assert usage_of(data) == expected
