"""The access log: one JSON line per proxied request, with the id the client received."""

from __future__ import annotations

import secrets

import orjson

from router.accesslog import ATOMIC_WRITE, _pieces
from tests.harness import Router
from tests.observability.conftest import CLEAN_ENV, chat_routes, engine_request, traceparent

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "log me"}]
SECRET = "sk-do-not-log-" + secrets.token_hex(8)


def test_line_carries_the_request_id_the_client_received(logged: Router,
                                                         engines: dict[str, str]) -> None:
    trace_id = secrets.token_hex(16)
    r = logged.client.post(CHAT, json={"model": "obs-chat", "messages": MESSAGES}, headers={
        "authorization": f"Bearer {SECRET}", "traceparent": traceparent(trace_id, "1" * 16)})
    assert r.status_code == 200
    request_id = r.headers["x-request-id"]
    assert engine_request(engines, request_id)  # the id went to the engine too
    line = logged.access_line(request_id)
    usage = r.json()["usage"]
    assert line["logger"] == "routeyard.access"
    assert line["trace_id"] == trace_id  # from the caller's traceparent; routeyard is not tracing
    assert line["method"] == "POST" and line["path"] == CHAT
    assert line["model"] == "obs-chat" and line["group"] == "chat"
    assert line["backend"] == engines["generate"]
    assert line["status"] == 200 and line["error"] is None
    assert 0 < line["ttfb_ms"] <= line["duration_ms"] < 5000
    assert line["bytes_in"] == len(r.request.content)
    assert line["bytes_out"] == len(r.content)
    assert line["input_tokens"] == usage["prompt_tokens"]
    assert line["output_tokens"] == usage["completion_tokens"]
    assert line["retries"] == 0 and line["client"] == "127.0.0.1"
    assert line["time"].endswith("Z")
    assert SECRET not in logged.log_text()


def test_streams_and_errors_are_logged_with_their_ids(logged: Router) -> None:
    body = {"model": "obs-chat", "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}}
    with logged.client.stream("POST", CHAT, json=body, headers={"x-fake-tokens": "6"}) as r:
        raw = b"".join(r.iter_raw())
        stream_id = r.headers["x-request-id"]
    line = logged.access_line(stream_id)
    assert line["status"] == 200 and line["bytes_out"] == len(raw)
    assert line["output_tokens"] == 6

    mine = "client-chosen-" + secrets.token_hex(4)
    r = logged.client.post(CHAT, json={"model": "nope", "messages": MESSAGES},
                           headers={"x-request-id": mine})
    assert r.status_code == 404 and r.headers["x-request-id"] == mine
    line = logged.access_line(mine)
    assert line["status"] == 404 and line["error"] == "model_not_found"
    assert line["backend"] is None and line["model"] == "nope"


def test_a_refused_request_gets_the_same_id_in_the_log_and_the_answer(
        logged: Router) -> None:
    r = logged.client.post("/v1/embeddings", json={"model": "obs-chat", "input": "x"})
    assert r.status_code == 403
    line = logged.access_line(r.headers["x-request-id"])
    assert line["status"] == 403 and line["error"] == "endpoint_not_enabled"
    assert line["group"] == "embeddings"


def test_batches_are_cut_at_line_ends_into_atomic_writes() -> None:
    lines = [orjson.dumps({"n": i, "pad": "x" * (i % 300)}) for i in range(500)]
    data = b"\n".join(lines) + b"\n"
    pieces = _pieces(data)
    assert b"".join(pieces) == data
    assert all(len(p) <= ATOMIC_WRITE and p.endswith(b"\n") for p in pieces)
    assert _pieces(b"short\n") == [b"short\n"]


def test_off_by_default(engines: dict[str, str], launch_router) -> None:
    """A router with the defaults (no ROUTEYARD_* set) writes no access log lines: not
    even once it has stopped, when a worker writes out every line it holds."""
    router = launch_router(chat_routes(engines), drop_env=CLEAN_ENV)
    r = router.client.post(CHAT, json={"model": "obs-chat", "messages": MESSAGES})
    assert r.status_code == 200
    assert router.stop() == 0  # a clean shutdown: the log is complete
    assert router.access_lines() == []
    assert r.headers["x-request-id"] not in router.log_text()
