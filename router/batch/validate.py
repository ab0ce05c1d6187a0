"""The ``validating`` step: every input line checked before any is sent.

A batch with any bad line fails as a whole (OpenAI's behaviour): its ``errors.data``
lists the problems with their line numbers, and nothing runs. The checks need no
engine: routing questions go to ``Dispatcher.check``, for the key that created the
batch. Messages quote a client's values (custom_id, url, method) cut to 256 characters:
up to ``max_reported_errors`` of them are stored with the batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.batch.dispatch import Dispatcher
from router.errors import shown

log = logging.getLogger("routeyard.batch")


@dataclass
class Validation:
    requests: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    models: set[str] = field(default_factory=set)
    embedding_inputs: int = 0

    @property
    def model(self) -> str | None:
        return next(iter(self.models)) if len(self.models) == 1 else None


def _repr(value: Any) -> str:
    """A client's value as a message quotes it (``repr``, at most ``shown``'s length)."""
    return shown(repr(value))


def _error(code: str, message: str, line: int | None, param: str | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def check_line(number: int, raw: bytes, endpoint: str, key: str | None,
               dispatcher: Dispatcher, seen: set[str],
               result: Validation) -> dict[str, Any] | None:
    """The first problem of one line, or None (and the line is counted)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _error("invalid_json", f"Line {number} is not valid JSON: {exc}.", number, None)
    if not isinstance(obj, dict):
        return _error("invalid_json", f"Line {number} is not a JSON object.", number, None)
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error("missing_custom_id", "Each request needs a non-empty string custom_id.",
                      number, "custom_id")
    if custom_id in seen:
        return _error("duplicate_custom_id",
                      f"The custom_id `{shown(custom_id)}` for this request is a duplicate of "
                      "another request; custom_id must be unique within a batch.", number,
                      "custom_id")
    seen.add(custom_id)
    if obj.get("method") != "POST":
        return _error("invalid_method", f"method is {_repr(obj.get('method'))}; only POST is "
                      "supported.", number, "method")
    url = obj.get("url")
    if url != endpoint:
        return _error("invalid_url", f"url is {_repr(url)} but the batch's endpoint is {endpoint}; "
                      "every line must use the batch's endpoint.", number, "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return _error("invalid_body", "body must be a JSON object with the request.",
                      number, "body")
    if body.get("stream") is True:
        return _error("invalid_body", "Request must not be sent in stream mode: remove "
                      '"stream": true (batch results are never streamed).', number, "body.stream")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _error("missing_model", "body.model must name the model to use.",
                      number, "body.model")
    try:
        problem = dispatcher.check(key, url, body)
    except Exception as exc:  # a broken check fails the line, not the worker
        log.exception("Dispatcher.check raised")
        problem = f"The router could not check this request ({type(exc).__name__})."
    if problem is not None:
        return _error("model_not_available", problem, number, "body.model")
    result.models.add(model)
    if endpoint == "/v1/embeddings":
        value = body.get("input")
        result.embedding_inputs += len(value) if isinstance(value, list) and value and \
            not isinstance(value[0], int) else 1
    result.requests += 1
    return None


async def validate(lines: AsyncIterator[tuple[int, bytes]], endpoint: str, key: str | None,
                   dispatcher: Dispatcher, max_requests: int, max_embedding_inputs: int,
                   max_reported: int) -> Validation:
    result = Validation()
    seen: set[str] = set()

    def report(error: dict[str, Any]) -> None:
        result.error_count += 1
        if len(result.errors) < max_reported:
            result.errors.append(error)

    async for number, raw in lines:
        if not raw.strip():
            continue
        error = check_line(number, raw, endpoint, key, dispatcher, seen, result)
        if error is not None:
            report(error)
        if number % 512 == 0:
            await asyncio.sleep(0)  # let heartbeats and API requests run
    if result.requests + result.error_count == 0:
        report(_error("empty_file", "The input file has no requests.", None, "input_file_id"))
    if result.requests > max_requests:
        report(_error("too_many_requests", f"The batch has {result.requests} requests; at most "
                      f"{max_requests} are allowed. Split it into several batches.",
                      None, "input_file_id"))
    if result.embedding_inputs > max_embedding_inputs:
        report(_error("too_many_inputs", f"The batch has {result.embedding_inputs} embedding "
                      f"inputs; at most {max_embedding_inputs} are allowed across a batch.",
                      None, "input_file_id"))
    if result.error_count > len(result.errors):
        hidden = result.error_count - len(result.errors)
        result.errors.append(_error("more_errors", f"{hidden} more errors not shown.",
                                    None, None))
    return result
