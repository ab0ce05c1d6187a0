"""Token usage read from engine answers: the ``"usage"`` objects, never the whole body."""

from __future__ import annotations

from typing import Any

import orjson

_USAGE = b'"usage"'
#: A non-streamed JSON body is searched whole for usage up to this size, else its tail.
USAGE_SCAN = 64 * 1024


def tokens_in(data: bytes) -> tuple[int | None, int | None] | None:
    """(input, output) tokens of the last usage object in ``data``, if any."""
    return _compact_usage(data) or usage_of(data)


def _compact_usage(data: bytes) -> tuple[int, int] | None:
    """The common case in one step: the last usage object is compact OpenAI JSON without
    nested objects, as vLLM writes it; anything else goes to ``usage_of``."""
    i = data.rfind(b'"usage":{')
    if i < 0:
        return None
    end = data.find(b"}", i)
    try:
        obj = orjson.loads(data[i + 8:end + 1])
    except orjson.JSONDecodeError:
        return None
    prompt = obj.get("prompt_tokens")
    completion = obj.get("completion_tokens")
    if type(prompt) is int and type(completion) is int:
        return prompt, completion
    return None


def usage_of(data: bytes) -> tuple[int | None, int | None] | None:
    """(input, output) tokens from the ``"usage": {...}`` objects in ``data``, if any.

    Reads OpenAI's ``prompt_tokens``/``completion_tokens`` and the Responses and Anthropic
    ``input_tokens``/``output_tokens``. Objects are read from the last one back until both
    counts are known (Anthropic streams send input tokens first, output tokens last). Only
    usage objects are parsed, never the body."""
    prompt: int | None = None
    completion: int | None = None
    i = data.rfind(_USAGE)
    for _ in range(8):
        if i < 0:
            break
        found = _usage_at(data, i + len(_USAGE))
        if found is not None:
            prompt = found[0] if prompt is None else prompt
            completion = found[1] if completion is None else completion
            if prompt is not None and completion is not None:
                break
        i = data.rfind(_USAGE, 0, i)
    if prompt is None and completion is None:
        return None
    return prompt, completion


def _usage_at(data: bytes, j: int) -> tuple[int | None, int | None] | None:
    """The tokens of the object after ``"usage"`` ending at ``j``: the ``}`` after it are
    tried in turn until orjson accepts the slice (usage objects nest one level at most)."""
    if data[j:j + 2] == b":{":  # compact JSON, as vLLM writes it
        start = j + 1
    else:
        j = _skip_space(data, j)
        if data[j:j + 1] != b":":
            return None
        start = _skip_space(data, j + 1)
        if data[start:start + 1] != b"{":
            return None
    end = start
    for _ in range(5):
        end = data.find(b"}", end + 1)
        if end < 0:
            return None
        try:
            return _tokens(orjson.loads(data[start:end + 1]))
        except orjson.JSONDecodeError:
            continue
    return None


def _skip_space(data: bytes, i: int) -> int:
    while data[i:i + 1] in (b" ", b"\t", b"\r", b"\n"):
        i += 1
    return i


def _tokens(obj: Any) -> tuple[int | None, int | None] | None:
    if not isinstance(obj, dict):
        return None
    prompt = obj.get("prompt_tokens", obj.get("input_tokens"))
    completion = obj.get("completion_tokens", obj.get("output_tokens"))
    prompt = prompt if isinstance(prompt, int) else None
    completion = completion if isinstance(completion, int) else None
    if prompt is None and completion is None:
        return None
    return prompt, completion
