"""Every router-made error has the right status and OpenAI's envelope."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import routes_yaml
from tests.harness import Router, start_router, wait_until

ENVELOPE_KEYS = {"message", "type", "param", "code"}


def error_of(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == ENVELOPE_KEYS
    if code is not None:
        assert error["code"] == code
    return error


def test_unknown_model_is_404_model_not_found(router: Router) -> None:
    r = router.client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert error_of(r, 404, "model_not_found")["param"] == "model"


def test_unknown_model_through_sdk_raises_not_found(router: Router) -> None:
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    assert info.value.code == "model_not_found"


def test_disabled_endpoint_through_sdk_raises_permission_denied(router: Router) -> None:
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.embeddings.create(model="chat-model", input="a")
    assert info.value.code == "endpoint_not_enabled"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"messages": []}', "missing_model"),
        (b'{"model": "", "messages": []}', "missing_model"),
        (b'{"model": 7}', "invalid_model"),
        (b'{"model": "chat-model", ', "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b'"chat-model"', "invalid_body"),
        (b"", "invalid_request"),
    ],
)
def test_bad_bodies_are_400(router: Router, body: bytes, code: str) -> None:
    r = router.client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    error = error_of(r, 400, code)
    assert error["type"] == "invalid_request_error"


def test_transcription_without_model_is_400(router: Router) -> None:
    r = router.client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")})
    error_of(r, 400, "missing_model")


def test_body_over_model_limit_is_413(router: Router) -> None:
    big = {"model": "tiny-body-model", "messages": [{"role": "user", "content": "x" * 2000}]}
    error = error_of(router.client.post("/v1/chat/completions", json=big), 413)
    assert "1024" in error["message"]
    small = {"model": "tiny-body-model", "messages": [{"role": "user", "content": "x"}]}
    assert router.client.post("/v1/chat/completions", json=small).status_code == 200


def test_body_over_router_limit_is_413(engines: dict, launch_router) -> None:
    r = launch_router(routes_yaml(engines), env={"ROUTEYARD_MAX_REQUEST_SIZE": "4096"})
    big = {"model": "chat-model", "messages": [{"role": "user", "content": "x" * 10000}]}
    error_of(r.client.post("/v1/chat/completions", json=big), 413)


def test_unknown_path_is_404(router: Router) -> None:
    error_of(router.client.post("/v1/nothing-here", json={"model": "chat-model"}), 404)
    error_of(router.client.get("/v1/chat/completion"), 404)


def test_wrong_method_is_405(router: Router) -> None:
    error_of(router.client.get("/v1/chat/completions"), 405)


def test_backend_unreachable_is_502(tmp_path: Path, dead_port: int) -> None:
    """A backend that refuses connections while it is still in rotation: 502. (The shared
    router's health checks take its dead-model out after a few seconds: then it is 503,
    tested with the readiness scopes.)"""
    text = ("defaults:\n  health_checks: {enabled: false}\nmodels:\n  dead-model:\n"
            "    backends:\n"
            f"      - url: http://127.0.0.1:{dead_port}\n    endpoints: [chat]\n")
    router = start_router(tmp_path, text)
    try:
        r = router.client.post("/v1/chat/completions",
                               json={"model": "dead-model", "messages": []})
        error_of(r, 502, "backend_unavailable")
    finally:
        router.stop()


def test_backend_timeout_is_504(router: Router, fake_only: None) -> None:
    r = router.client.post(
        "/v1/chat/completions",
        json={"model": "slow-model", "messages": [{"role": "user", "content": "a"}]},
        headers={"x-fake-hang": "1"},
    )
    error_of(r, 504, "backend_timeout")


@pytest.mark.parametrize("status", [400, 422, 500, 503])
def test_backend_errors_pass_through_untouched(router: Router, fake_only: None,
                                               status: int) -> None:
    body = ('{"object":"error","message":"engine says no","type":"X","param":null,'
            f'"code":{status}}}')
    r = router.client.post(
        "/v1/chat/completions",
        json={"model": "chat-model", "messages": []},
        headers={"x-fake-status": str(status), "x-fake-body": body},
    )
    assert r.status_code == status
    assert r.text == body


def test_engine_validation_error_passes_through(router: Router) -> None:
    r = router.client.post("/v1/chat/completions", json={"model": "chat-model"})
    assert r.status_code == 400
    assert "error" in r.json()


def test_router_errors_carry_the_request_id(router: Router) -> None:
    r = router.client.post("/v1/chat/completions", json={"model": "nope"},
                           headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_ready_scopes(router: Router) -> None:
    """dead-model has no backend up: plain /ready is 503 naming it, the scopes are not."""
    def not_ready() -> httpx.Response | None:
        r = router.client.get("/ready")
        return r if r.status_code == 503 else None

    r = wait_until(not_ready, 15, "/ready turns 503 once dead-model fails its checks")
    assert "dead-model" in r.json()["models_without_backend"]
    assert router.client.get("/ready", params={"models": "any"}).status_code == 200
    assert router.client.get("/ready", params={"models": "none"}).status_code == 200
    error_of(router.client.get("/ready", params={"models": "some"}), 400)
