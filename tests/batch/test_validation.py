"""Every validation error: create-time (HTTP 400/404) and line-level (status failed)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.batch.conftest import Server, chat_line, jsonl, wait_batch


def _completion(custom_id: str, model: str = "chat-model", **extra: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": custom_id, "max_tokens": 2, **extra}}


def test_each_bad_line_is_reported_with_its_line_number(local_server: Server) -> None:
    """Tenant B may not use private-model; chat-only-model has no /v1/completions."""
    lines = [
        _completion("ok-1"),                                                  # 1
        _completion("dup"),                                                   # 2
        _completion("dup"),                                                   # 3 duplicate
        {**_completion("url"), "url": "/v1/chat/completions"},                # 4 url mismatch
        {**_completion("get"), "method": "GET"},                              # 5 method
        _completion("unknown", model="no-such-model"),                        # 6 unknown model
        _completion("not-enabled", model="chat-only-model"),                  # 7 endpoint off
        _completion("private", model="private-model"),                        # 8 not for B
        _completion("stream", stream=True),                                   # 9 stream
        {"method": "POST", "url": "/v1/completions", "body": {"model": "x"}},  # 10 custom_id
        {"custom_id": "list", "method": "POST", "url": "/v1/completions",
         "body": [1]},                                                        # 11 body
        "",                                                                   # 12 blank: ok
        {"custom_id": "nomodel", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x"}},                                            # 13 model
    ]
    client = local_server.client("B")
    made = client.files.create(file=("v.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=made.id, endpoint="/v1/completions",
                                  completion_window="24h")
    done = wait_batch(client, batch.id)
    assert done.status == "failed" and done.failed_at and done.in_progress_at is None
    assert done.output_file_id is None and done.error_file_id is None
    assert done.errors is not None
    found = {(e.line, e.code, e.param) for e in done.errors.data}
    assert found == {
        (3, "duplicate_custom_id", "custom_id"),
        (4, "invalid_url", "url"),
        (5, "invalid_method", "method"),
        (6, "model_not_available", "body.model"),
        (7, "model_not_available", "body.model"),
        (8, "model_not_available", "body.model"),
        (9, "invalid_body", "body.stream"),
        (10, "missing_custom_id", "custom_id"),
        (11, "invalid_body", "body"),
        (13, "missing_model", "body.model"),
    }
    messages = {e.line: e.message for e in done.errors.data}
    assert "does not exist" in messages[6]
    assert "not enabled" in messages[7]
    assert "not allowed" in messages[8]
    assert "stream" in messages[9]


def test_corrupted_input_fails_validation_as_invalid_json(local_server: Server) -> None:
    """Upload checks JSON; a file changed in storage afterwards is caught again."""
    client = local_server.client()
    made = client.files.create(file=("c.jsonl", jsonl([chat_line("c1"), chat_line("c2")])),
                               purpose="batch")
    path = local_server.storage / "files" / made.id
    path.write_bytes(jsonl([chat_line("c1")]) + b"{oops\n")
    batch = client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_batch(client, batch.id)
    assert done.status == "failed"
    assert [(e.line, e.code) for e in done.errors.data] == [(2, "invalid_json")]


def test_create_rejects_bad_parameters(local_server: Server) -> None:
    client = local_server.client()
    good = client.files.create(file=("g.jsonl", jsonl([chat_line("g")])), purpose="batch").id
    text = client.files.create(file=("u.txt", b"x"), purpose="user_data").id
    http = local_server.http()

    def create(**params: object) -> httpx.Response:
        body = {"input_file_id": good, "endpoint": "/v1/chat/completions",
                "completion_window": "24h", **params}
        return http.post("/v1/batches", json=body)

    cases = {
        "endpoint": create(endpoint="/v1/moderations"),
        "completion_window": create(completion_window="48h"),
        "metadata": create(metadata={"k": 1}),
        "output_expires_after": create(output_expires_after={"anchor": "created_at",
                                                             "seconds": 5}),
        "input_file_id": create(input_file_id=text),
    }
    for param, response in cases.items():
        assert response.status_code == 400, (param, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
    assert "no vLLM engine" in cases["endpoint"].json()["error"]["message"]
    assert create(input_file_id="file-nope").status_code == 404
    assert http.post("/v1/batches", content=b"{").status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
