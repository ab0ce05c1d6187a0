"""Router-made errors in the envelope each API family's clients parse.

``/v1/messages`` clients are Anthropic SDKs: vLLM answers them ``{"type": "error",
"error": {"type", "message"}}`` and so must the router, or the SDK raises a generic error
with no type. ``/cohere/*`` gets Cohere's ``{"message", "id"}``. Everything else keeps
OpenAI's envelope (tests/integration/test_errors.py)."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.harness import Router, start_router

HELLO = [{"role": "user", "content": "Hello"}]


def anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    return body["error"]["message"]


@pytest.fixture
def claude(router: Router) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.url, api_key="unused", max_retries=0)


def test_messages_through_the_anthropic_sdk(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="chat-model", max_tokens=5, messages=HELLO)
    assert message.type == "message" and message.content
    count = claude.messages.count_tokens(model="chat-model", messages=HELLO)
    assert count.input_tokens > 0


def test_unknown_model_is_anthropics_not_found(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="nope", max_tokens=5, messages=HELLO)
    assert info.value.body["error"]["type"] == "not_found_error"
    assert "nope" in info.value.body["error"]["message"]


def test_disabled_endpoint_is_anthropics_permission_error(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        claude.messages.create(model="embed-model", max_tokens=5, messages=HELLO)
    assert info.value.body["error"]["type"] == "permission_error"


def test_count_tokens_errors_too(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="nope", messages=HELLO)


@pytest.mark.parametrize(("body", "status", "kind"), [
    (b'{"max_tokens": 5}', 400, "invalid_request_error"),
    (b'{"model": "chat-model", ', 400, "invalid_request_error"),
    (b'{"model": "nope", "max_tokens": 5, "messages": []}', 404, "not_found_error"),
])
def test_raw_messages_errors(router: Router, body: bytes, status: int, kind: str) -> None:
    r = router.client.post("/v1/messages", content=body,
                           headers={"content-type": "application/json"})
    anthropic_error(r, status, kind)


@pytest.fixture(scope="module")
def family_router(engines: dict[str, str], dead_port: int,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """A router with a messages model that has no backend, and one that takes small bodies."""
    text = ("models:\n"
            "  m-dead:\n    backends:\n"
            f"      - url: http://127.0.0.1:{dead_port}\n    endpoints: [messages]\n"
            "    retries: {attempts: 0}\n"
            "  m-tiny:\n    backends:\n"
            f"      - url: {engines['generate']}\n    endpoints: [messages]\n"
            "    backend_model: chat-model\n    max_body_size: 1KiB\n")
    with start_router(tmp_path_factory.mktemp("families"), text) as router:
        yield router


def test_anthropic_errors_carry_the_request_id(router: Router) -> None:
    r = router.client.post("/v1/messages", json={"model": "nope", "max_tokens": 5,
                                                 "messages": HELLO},
                           headers={"x-request-id": "rid-anthropic"})
    anthropic_error(r, 404, "not_found_error")
    assert r.json()["request_id"] == "rid-anthropic" == r.headers["x-request-id"]


def test_unknown_cohere_path_keeps_the_family(router: Router) -> None:
    r = router.client.post("/cohere/v9/nothing", json={"model": "chat-model"})
    assert r.status_code == 404 and set(r.json()) == {"message", "id"}


def test_wrong_method_keeps_the_family(router: Router) -> None:
    anthropic_error(router.client.get("/v1/messages"), 405, "invalid_request_error")


def test_payload_too_large_is_request_too_large(family_router: Router) -> None:
    big = {"model": "m-tiny", "max_tokens": 5,
           "messages": [{"role": "user", "content": "x" * 2000}]}
    r = family_router.client.post("/v1/messages", json=big)
    assert "max_body_size" in anthropic_error(r, 413, "request_too_large")


def test_backend_down_is_anthropic_api_error(family_router: Router) -> None:
    r = family_router.client.post("/v1/messages", json={"model": "m-dead", "max_tokens": 5,
                                                        "messages": HELLO})
    assert "cannot connect" in anthropic_error(r, 502, "api_error")


def test_stream_broken_off_ends_with_anthropic_error_event(
        claude: anthropic.Anthropic, fake_only: None) -> None:
    stream = claude.messages.stream(model="chat-model", max_tokens=8, messages=HELLO,
                                    extra_headers={"x-fake-drop-after": "2"})
    with pytest.raises(anthropic.APIStatusError) as info, stream as events:
        for _ in events:
            pass
    assert info.value.body["error"]["type"] == "api_error"
    assert "closed the connection" in info.value.body["error"]["message"]


def test_cohere_routes_get_cohere_errors(router: Router) -> None:
    r = router.client.post("/cohere/v2/chat", json={"model": "nope", "messages": HELLO},
                           headers={"x-request-id": "rid-7"})
    assert r.status_code == 404
    assert r.json() == {"message": "The model `nope` does not exist.", "id": "rid-7"}


def test_openai_routes_keep_openai_errors(router: Router) -> None:
    r = router.client.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
