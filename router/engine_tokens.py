"""A prompt's token ids from the engine itself (``POST /tokenize``), for the precise mode of
prefix-cache affinity: the engine's tokenizer and chat template give exactly the ids whose
blocks its KV events report, so ``prefix_index.token_blocks`` of them matches.

vLLM's ``/tokenize`` takes a completion's ``prompt`` or a chat's ``messages`` (rendered
with the chat template, as ``/v1/chat/completions`` renders them, given the same fields
that change the rendering: ``CHAT_FIELDS``). A completion whose prompt is already token
ids needs no call (``prompt_token_ids``). A call costs one round trip to the engine before
the pick; anything but a 200 with a token list gives None (no prefix score), never an
error for the client.
"""

from __future__ import annotations

from typing import Any

import orjson

from router.errors import UpstreamError
from router.upstream import Reachable, Timeouts

#: Fields of a chat request that change how the chat template renders its messages.
CHAT_FIELDS = ("messages", "tools", "chat_template", "chat_template_kwargs",
               "add_generation_prompt", "continue_final_message", "documents")
#: Fields of a completion request that change its tokens.
COMPLETION_FIELDS = ("prompt", "add_special_tokens")


def prompt_token_ids(body: dict[str, Any]) -> list[int] | None:
    """A completion's prompt when it is one list of token ids, else None."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    return None


def tokenize_body(model: str, body: dict[str, Any]) -> bytes | None:
    """The ``/tokenize`` request for a chat (``messages``) or completion (one string
    ``prompt``) body, or None when there is no single text prompt to tokenize."""
    fields: tuple[str, ...]
    if isinstance(body.get("messages"), list):
        fields = CHAT_FIELDS
    elif isinstance(body.get("prompt"), str):
        fields = COMPLETION_FIELDS
    else:
        return None
    request = {"model": model}
    request.update((name, body[name]) for name in fields if name in body)
    return orjson.dumps(request)


async def engine_token_ids(endpoint: Reachable, model: str, body: dict[str, Any],
                           timeout: float) -> list[int] | None:
    """The token ids the engine behind ``endpoint`` makes of ``body``'s prompt, asked as
    ``model`` (its served name); None when the body has no prompt to tokenize or the
    engine gives no token list within ``timeout`` seconds per phase."""
    ids = prompt_token_ids(body)
    if ids is not None:
        return ids
    payload = tokenize_body(model, body)
    if payload is None:
        return None
    origin = endpoint.origin
    head = (f"POST {origin.base_path}/tokenize HTTP/1.1\r\n"
            f"host: {origin.host_header.decode()}\r\n{endpoint.api_key_header or ''}"
            f"user-agent: routeyard\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n").encode()
    try:
        response = await endpoint.transport.handle(head, payload,
                                                   Timeouts(timeout, timeout, timeout))
        try:
            answer = await response.read()
        finally:
            response.close()
    except UpstreamError:
        return None
    if response.status != 200:
        return None
    try:
        tokens = orjson.loads(answer).get("tokens")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if isinstance(tokens, list) and all(type(t) is int for t in tokens):
        return tokens
    return None
