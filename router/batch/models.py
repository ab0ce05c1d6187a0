"""The API's objects (FileObject, Batch, lists) and the output/error JSONL lines.

Shapes follow OpenAI's Batch and File objects (https://platform.openai.com/docs/api-reference/batch
and .../files), as vLLM's ``vllm/entrypoints/openai/run_batch.py`` reads and writes them:
every Batch field is present, unset timestamps and ids are ``null``, as in OpenAI's examples.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import orjson

from router.batch.schema import AnyRow

#: Endpoints a batch may target: the ones vLLM implements (§4.4).
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
#: Endpoints OpenAI accepts but no vLLM engine serves; named in the error message.
UNSERVED_ENDPOINTS = ("/v1/moderations", "/v1/images/generations", "/v1/images/edits",
                      "/v1/videos")
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
TERMINAL = ("completed", "failed", "expired", "cancelled")
#: Every status a batch can have (the ``status`` label of ``routeyard_batches``).
STATUSES = ("validating", "in_progress", "finalizing", "cancelling", *TERMINAL)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output or error file: fixed per batch, so finalizing twice
    (after a crash) overwrites rather than leaks a second file."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def file_object(row: AnyRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "status_details": None,
    }


def batch_object(row: AnyRow) -> dict[str, Any]:
    errors = orjson.loads(row.errors) if row.errors else None
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": None if errors is None else {"object": "list", "data": errors},
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": row.created_at,
        "in_progress_at": row.in_progress_at,
        "expires_at": row.expires_at,
        "finalizing_at": row.finalizing_at,
        "completed_at": row.completed_at,
        "failed_at": row.failed_at,
        "expired_at": row.expired_at,
        "cancelling_at": row.cancelling_at,
        "cancelled_at": row.cancelled_at,
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "usage": {
            "input_tokens": row.input_tokens,
            "input_tokens_details": {"cached_tokens": row.cached_tokens},
            "output_tokens": row.output_tokens,
            "output_tokens_details": {"reasoning_tokens": row.reasoning_tokens},
            "total_tokens": row.total_tokens,
        },
        "metadata": orjson.loads(row.metadata) if row.metadata else None,
        "model": row.model,
    }


def page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def response_line(custom_id: str, status: int, body: Any) -> bytes:
    """A line for a request the engine answered (any status)."""
    return orjson.dumps({
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": new_id("req_"), "body": body},
        "error": None,
    })


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """A line for a request that got no HTTP answer (expired, cancelled, bad response)."""
    return orjson.dumps({
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    })


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_of(body: Any) -> tuple[int, int, int, int, int]:
    """(input, cached, output, reasoning, total) tokens from any endpoint's ``usage``."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return (0, 0, 0, 0, 0)
    inp = _int(usage.get("input_tokens", usage.get("prompt_tokens")))
    out = _int(usage.get("output_tokens", usage.get("completion_tokens")))
    details_in = usage.get("input_tokens_details") or usage.get("prompt_tokens_details")
    details_out = usage.get("output_tokens_details") or usage.get("completion_tokens_details")
    cached = _int(details_in.get("cached_tokens")) if isinstance(details_in, dict) else 0
    reasoning = _int(details_out.get("reasoning_tokens")) if isinstance(details_out, dict) else 0
    return (inp, cached, out, reasoning, _int(usage.get("total_tokens")) or inp + out)
