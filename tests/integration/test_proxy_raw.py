"""Raw HTTP through the router: pooling APIs, tokenizer, headers and bytes preserved."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.conftest import KINDS, Router
from tests.payloads import request_for

RAW_CASES = [
    ("rerank", "/rerank", "results"),
    ("rerank", "/v1/rerank", "results"),
    ("rerank", "/v2/rerank", "results"),
    ("score", "/score", "data"),
    ("score", "/v1/score", "data"),
    ("score", "/classify", "data"),
    ("embed", "/pooling", "data"),
    ("chat", "/tokenize", "tokens"),
    ("chat", "/detokenize", "prompt"),
    ("embed", "/tokenize", "tokens"),
]


@pytest.mark.parametrize(("kind", "path", "key"), RAW_CASES)
def test_raw_routes(router: Router, engines: dict, kind: str, path: str, key: str) -> None:
    model = KINDS[kind]
    r = router.client.post(path, **request_for(path, model.name))
    assert r.status_code == 200, r.text
    assert key in r.json()
    direct = httpx.post(engines[model.task] + path, **request_for(path, model.engine_model))
    assert sorted(r.json()) == sorted(direct.json())  # same shape as the engine's own answer


def test_request_reaches_engine_byte_for_byte(router: Router, engines: dict, fake_only) -> None:
    body = b'{"model":"chat-model",  "messages":[{"role":"user","content":"h\\u00e9"}],"x":1.50}'
    httpx.post(engines["generate"] + "/_fake/reset")
    r = router.client.post("/v1/chat/completions", content=body,
                           headers={"content-type": "application/json", "x-custom": "kept",
                                    "connection": "keep-alive, x-drop", "x-drop": "gone"})
    assert r.status_code == 200
    seen = httpx.get(engines["generate"] + "/_fake/requests").json()[-1]
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["headers"]["x-custom"] == "kept"
    assert "x-drop" not in seen["headers"]
    assert seen["headers"]["x-request-id"] == r.headers["x-request-id"]
    assert "x-forwarded-for" in seen["headers"]


def test_backend_model_rewrite_changes_only_the_model(router: Router, engines, fake_only) -> None:
    httpx.post(engines["generate"] + "/_fake/reset")
    body = (b'{"messages":[{"role":"user","content":"{\\"model\\": 1}"}],'
            b'"tools":[{"model":"tiny-body-model"}], "model" : "tiny-body-model"}')
    r = router.client.post("/v1/chat/completions", content=body,
                           headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    seen = httpx.get(engines["generate"] + "/_fake/requests").json()[-1]
    expected = body.replace(b'"model" : "tiny-body-model"', b'"model" : "chat-model"')
    assert seen["body_sha256"] == hashlib.sha256(expected).hexdigest()


def test_client_request_id_is_kept(router: Router) -> None:
    r = router.client.post("/tokenize", json={"model": "chat-model", "prompt": "a"},
                           headers={"x-request-id": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1"


def test_response_headers_and_status_preserved(router: Router, engines: dict) -> None:
    r = router.client.post("/v1/embeddings", json={"model": "embed-model", "input": "a"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert "transfer-encoding" not in r.headers or r.headers["transfer-encoding"] == "chunked"


def test_sse_content_type_and_done(router: Router) -> None:
    body = {"model": "chat-model", "prompt": "a", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{router.url}/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = b"".join(r.iter_raw()).decode()
    assert text.rstrip().endswith("data: [DONE]")
