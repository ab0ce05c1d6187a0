"""The OpenAI SDK flow: files.create → batches.create → batches.retrieve → files.content."""

from __future__ import annotations

from typing import Any

import pytest

from tests.batch.conftest import Server, chat_line, jsonl, read_lines, wait_batch


def _lines(endpoint: str, n: int, tag: str) -> list[dict[str, Any]]:
    if endpoint == "/v1/chat/completions":
        return [chat_line(f"{tag}-{i}") for i in range(n)]
    if endpoint == "/v1/completions":
        return [{"custom_id": f"{tag}-{i}", "method": "POST", "url": endpoint,
                 "body": {"model": "chat-model", "prompt": f"{tag}-{i}", "max_tokens": 3}}
                for i in range(n)]
    return [{"custom_id": f"{tag}-{i}", "method": "POST", "url": endpoint,
             "body": {"model": "embed-model", "input": [f"{tag}-{i}", "two"]}} for i in range(n)]


OBJECT = {"/v1/chat/completions": "chat.completion", "/v1/completions": "text_completion",
          "/v1/embeddings": "list"}


def run_flow(server: Server, endpoint: str, tag: str, n: int = 6) -> Any:
    client = server.client()
    lines = _lines(endpoint, n, tag)
    upload = client.files.create(file=(f"{tag}.jsonl", jsonl(lines)), purpose="batch")
    assert upload.purpose == "batch" and upload.status == "processed"
    assert upload.bytes == len(jsonl(lines)) and upload.filename == f"{tag}.jsonl"
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint,
                                  completion_window="24h", metadata={"job": tag})
    assert batch.status == "validating" and batch.object == "batch"
    assert batch.expires_at == batch.created_at + 86400
    assert batch.request_counts is not None and batch.request_counts.total == 0
    done = wait_batch(client, batch.id)
    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (n, n, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.error_file_id is None and done.errors is None
    assert done.metadata == {"job": tag} and done.model in ("chat-model", "embed-model")
    assert done.usage is not None and done.usage.input_tokens > 0
    assert done.usage.total_tokens >= done.usage.input_tokens + done.usage.output_tokens
    output = read_lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == [line["custom_id"] for line in lines]
    for line in output:
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["request_id"]
        assert line["response"]["body"]["object"] == OBJECT[endpoint]
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output"
    return done


@pytest.mark.parametrize("endpoint", list(OBJECT))
def test_sdk_flow_sqlite_local(local_server: Server, endpoint: str) -> None:
    done = run_flow(local_server, endpoint, "flow" + endpoint.replace("/", "-"))
    if endpoint != "/v1/embeddings":
        assert done.usage.output_tokens > 0


def test_sdk_flow_postgres_s3(s3pg_server: Server, s3: Any) -> None:
    done = run_flow(s3pg_server, "/v1/chat/completions", "s3pg")
    keys = s3.keys()
    assert f"routeyard/files/{done.input_file_id}" in keys
    assert f"routeyard/files/{done.output_file_id}" in keys
    listed = s3pg_server.client().batches.list()
    assert done.id in [b.id for b in listed.data]


def test_batches_list_pages_newest_first(local_server: Server) -> None:
    client = local_server.client("pager")
    upload = client.files.create(file=("p.jsonl", jsonl([chat_line("page")])), purpose="batch")
    ids = [client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # the SDK pages on
    rest = client.batches.list(limit=2, after=ids[1])
    assert [b.id for b in rest.data] == ids[:1] and not rest.has_more
    for batch_id in ids:
        wait_batch(client, batch_id)
