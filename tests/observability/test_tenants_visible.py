"""Tenants visible: the key id in the access log, the SERVER span and the request
counters; refused keys (401, 403) counted and logged; ``/metrics`` behind the admin key."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest

from router.tenants.config import hash_key
from tests.harness import Router, Samples, start_router, wait_until
from tests.observability.conftest import CLEAN_ENV, Collector, chat_routes, traceparent

CHAT = "/v1/chat/completions"
KEY_A = "ry-team-a-" + "a" * 40
KEY_ADMIN = "ry-admin-" + "c" * 40
BODY = {"model": "obs-chat", "messages": [{"role": "user", "content": "who am i"}]}


def _auth(public_metrics: bool = False) -> str:
    return ("auth:\n  keys:\n    - id: team-a\n"
            f"      hash: {hash_key(KEY_A)}\n      models: ['obs-*']\n"
            f"  admin_keys:\n    - id: ops\n      hash: {hash_key(KEY_ADMIN)}\n"
            + ("  public_metrics: true\n" if public_metrics else ""))


@pytest.fixture(scope="module")
def keyed(engines: dict[str, str], otlp_http: Collector,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_http.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "ROUTEYARD_ACCESS_LOG": "true",
    }
    with start_router(tmp_path_factory.mktemp("keyed"), chat_routes(engines) + _auth(),
                      env=env, drop_env=CLEAN_ENV, admin_key=KEY_ADMIN) as router:
        yield router


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _id() -> str:
    return f"vis-{secrets.token_hex(6)}"


def test_the_key_id_is_in_the_access_log_the_span_and_the_counters(
        keyed: Router, otlp_http: Collector, engines: dict[str, str]) -> None:
    before = keyed.scrape()
    request_id, trace_id = _id(), secrets.token_hex(16)
    r = keyed.client.post(CHAT, json=BODY, headers={
        "authorization": f"Bearer {KEY_A}", "x-request-id": request_id,
        "traceparent": traceparent(trace_id, secrets.token_hex(8))})
    assert r.status_code == 200
    line = keyed.access_line(request_id)
    assert (line["key"], line["origin"], line["status"]) == ("team-a", "online", 200)
    [server] = wait_until(lambda: [s for s in otlp_http.trace(trace_id) if s.kind == "SERVER"],
                          10, "the SERVER span arrives")
    assert server.attributes["routeyard.key.id"] == "team-a"
    after = keyed.scrape()
    labels = {"model": "obs-chat", "group": "chat", "backend": engines["generate"],
              "key": "team-a", "origin": "online", "code": "200"}
    assert (_value(after, "routeyard_requests_total", **labels)
            - _value(before, "routeyard_requests_total", **labels)) == 1
    usage = r.json()["usage"]
    tokens = {"model": "obs-chat", "key": "team-a", "origin": "online", "type": "input"}
    assert (_value(after, "routeyard_tokens_total", **tokens)
            - _value(before, "routeyard_tokens_total", **tokens)) == usage["prompt_tokens"]


def test_refused_keys_are_counted_and_access_logged(keyed: Router) -> None:
    before = keyed.scrape()
    refusals = {
        # refused by the listener's gate, before the body is read
        "gate": keyed.client.post(CHAT, json=BODY, headers={
            "authorization": "Bearer ry-wrong-" + "x" * 40, "x-request-id": _id()}),
        # no body: refused by the handler
        "handler": keyed.client.post(CHAT, headers={"x-request-id": _id()}),
        # a router route: a client key on /admin/*
        "admin": keyed.client.get("/admin/config", headers={
            "authorization": f"Bearer {KEY_A}", "x-request-id": _id()}),
        "models": keyed.client.get("/v1/models", headers={"x-request-id": _id()}),
        # a stored Responses answer: a catalog route without a model
        "stored": keyed.client.get("/v1/responses/resp_abc", headers={"x-request-id": _id()}),
    }
    statuses = {name: r.status_code for name, r in refusals.items()}
    assert statuses == {"gate": 401, "handler": 401, "admin": 403, "models": 401,
                        "stored": 401}
    for name, r in refusals.items():
        line = keyed.access_line(r.headers["x-request-id"])
        assert line["status"] == r.status_code, name
        assert line["error"] == r.json()["error"]["code"], name
        assert line["key"] == ("team-a" if name == "admin" else None), name
    after = keyed.scrape()

    def delta(**labels: str) -> float:
        full = {"backend": "", "origin": "online", "model": "", **labels}
        return (_value(after, "routeyard_requests_total", **full)
                - _value(before, "routeyard_requests_total", **full))

    assert delta(group="chat", key="", code="401") == 2
    assert delta(group="", key="team-a", code="403") == 1
    assert delta(group="", key="", code="401") == 1
    assert delta(group="responses", key="", code="401") == 1


def test_metrics_need_the_admin_key_unless_public(keyed: Router,
                                                  engines: dict[str, str]) -> None:
    def metrics(key: str | None) -> int:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{keyed.url}/metrics", headers=headers, timeout=10).status_code

    assert (metrics(None), metrics(KEY_A), metrics(KEY_ADMIN)) == (401, 403, 200)
    keyed.rewrite(chat_routes(engines) + _auth(public_metrics=True))
    try:
        assert (metrics(None), metrics(KEY_A)) == (200, 200)
    finally:
        keyed.rewrite(chat_routes(engines) + _auth())
    assert metrics(None) == 401
