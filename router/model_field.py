"""Read the model name from a request body, and rewrite it without re-serializing.

JSON bodies are parsed once with orjson. The rewrite (for a model whose backends serve it
under another name) splices the new value into the original bytes at the top-level
``"model"`` value, so every other byte reaches the engine exactly as the client sent it.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from router.errors import BadRequest

# A JSON string token, or a bracket/colon: enough to walk top-level keys of an object.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]', re.DOTALL)
_FORM_MODEL = re.compile(
    rb'(\r\nContent-Disposition:\s*form-data;\s*name="model"[^\r\n]*\r\n'
    rb"(?:[^\r\n]+\r\n)*\r\n)(.*?)(\r\n--)",
    re.IGNORECASE | re.DOTALL,
)


def model_from_json(body: bytes) -> tuple[str, dict[str, Any]]:
    """The ``model`` of a JSON object body, and the parsed body; ``BadRequest`` if unusable."""
    if not body:
        raise BadRequest("The request body is empty; send a JSON object with a `model`.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        message = f"The request body is not valid JSON: {exc}"
        raise BadRequest(message, code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_body")
    return _check(data.get("model")), data


def model_from_form(form_model: object) -> str:
    return _check(form_model)


def _check(model: object) -> str:
    if model is None or model == "":
        raise BadRequest(
            "The request has no `model`; name one of the models in GET /v1/models.",
            param="model",
            code="missing_model",
        )
    if not isinstance(model, str):
        raise BadRequest("`model` must be a string.", param="model", code="invalid_model")
    return model


def rewrite_json_model(body: bytes, new_model: str) -> bytes:
    """Replace the value of the top-level ``"model"`` key in a JSON object body."""
    depth = 0
    expect_value = False
    previous = b""
    for token in _TOKENS.finditer(body):
        text = token.group()
        if expect_value:
            return body[: token.start()] + orjson.dumps(new_model) + body[token.end() :]
        if text in (b"{", b"["):
            depth += 1
        elif text in (b"}", b"]"):
            depth -= 1
        elif text == b":" and depth == 1 and previous == b'"model"':
            expect_value = True
        previous = text
    return body  # model_from_json already proved the key exists; unreachable in practice


def rewrite_form_model(body: bytes, new_model: str) -> bytes:
    """Replace the value of the multipart form field ``model``."""
    return _FORM_MODEL.sub(
        lambda m: m.group(1) + new_model.encode() + m.group(3), body, count=1
    )
