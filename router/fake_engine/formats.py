"""Response bodies in vLLM's exact shapes (field names, object types, key order).

Streamed chunks follow vLLM's OpenAI-compatible server (``vllm/entrypoints/openai/``, the
chat and completion serving modules): chat chunks are
``chat.completion.chunk`` with a role chunk first, completions chunks are
``text_completion``, usage chunks have ``choices: []``.
"""

from __future__ import annotations

from typing import Any

import orjson

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
DONE = b"data: [DONE]\n\n"


def sse_data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_event(type_: str, obj: Any) -> bytes:
    return b"event: " + type_.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion}


def finish_reason(generated: int, limit: int | None) -> str:
    return "length" if limit is not None and generated >= limit else "stop"


# chat -------------------------------------------------------------------------------


def chat_head(rid: str, created: int, model: str) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}


def chat_role_chunk(head: dict[str, Any]) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"role": "assistant", "content": ""},
              "logprobs": None, "finish_reason": None}
    return {**head, "choices": [choice], "prompt_token_ids": None, "prompt_text": None}


def chat_token_chunk(head: dict[str, Any], text: str, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None,
                              "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = None
    choice["token_ids"] = None
    return {**head, "choices": [choice]}


def chat_completion(rid: str, created: int, model: str, text: str, finish: str,
                    use: dict[str, int]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant", "content": text, "refusal": None, "annotations": None,
        "audio": None, "function_call": None, "tool_calls": [], "reasoning": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish,
              "stop_reason": None, "token_ids": None}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "service_tier": None, "system_fingerprint": None,
            "usage": {**use, "prompt_tokens_details": None}, "prompt_logprobs": None,
            "prompt_token_ids": None, "kv_transfer_params": None}


# completions ------------------------------------------------------------------------


def completion_head(rid: str, created: int, model: str) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model}


def completion_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish,
            "stop_reason": None, "prompt_token_ids": None, "token_ids": None}


def completion(rid: str, created: int, model: str, choices: list[dict[str, Any]],
               use: dict[str, int]) -> dict[str, Any]:
    for choice in choices:
        choice["prompt_logprobs"] = None
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "service_tier": None, "system_fingerprint": None,
            "usage": {**use, "prompt_tokens_details": None},
            "kv_transfer_params": None}


# responses --------------------------------------------------------------------------


def response_message(item_id: str, text: str, status: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = [] if status == "in_progress" else [
        {"annotations": [], "text": text, "type": "output_text", "logprobs": None}
    ]
    return {"id": item_id, "content": content, "role": "assistant", "status": status,
            "type": "message"}


def response_object(rid: str, created: int, model: str, body: dict[str, Any], *,
                    status: str, output: list[dict[str, Any]],
                    use: dict[str, int] | None) -> dict[str, Any]:
    usage_obj = None
    if use is not None:
        usage_obj = {"input_tokens": use["prompt_tokens"],
                     "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": use["completion_tokens"],
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": use["total_tokens"]}
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": rid, "created_at": created, "incomplete_details": incomplete,
        "instructions": body.get("instructions"), "metadata": body.get("metadata"),
        "model": model, "object": "response", "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature", 1.0), "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [], "top_p": body.get("top_p", 1.0),
        "background": bool(body.get("background", False)),
        "max_output_tokens": body.get("max_output_tokens"), "max_tool_calls": None,
        "previous_response_id": body.get("previous_response_id"), "prompt": None,
        "reasoning": None, "service_tier": "auto", "status": status, "text": None,
        "top_logprobs": None, "truncation": "disabled", "usage": usage_obj,
        "user": body.get("user"),
    }


# Anthropic messages -----------------------------------------------------------------


def anthropic_stop(finish: str) -> str:
    return "max_tokens" if finish == "length" else "end_turn"


def anthropic_message(mid: str, model: str, text: str | None, stop: str | None,
                      input_tokens: int, output_tokens: int) -> dict[str, Any]:
    content = [] if text is None else [{"type": "text", "text": text}]
    return {"id": mid, "type": "message", "role": "assistant", "content": content,
            "model": model, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def anthropic_error(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


# pooling ----------------------------------------------------------------------------


def pooling_usage(prompt: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0,
            "prompt_tokens_details": None}


def pooling_list(rid: str, created: int, model: str, data: list[dict[str, Any]],
                 prompt: int) -> dict[str, Any]:
    return {"id": rid, "object": "list", "created": created, "model": model, "data": data,
            "usage": pooling_usage(prompt)}


# models -----------------------------------------------------------------------------


def model_list(models: tuple[str, ...], created: int, max_len: int,
               adapters: dict[str, str] | None = None) -> dict[str, Any]:
    """vLLM's ``/v1/models``: a card per served name, then one per loaded LoRA adapter with
    ``root`` its path and ``parent`` the first served name."""
    permission = {"id": "modelperm-fake", "object": "model_permission", "created": created,
                  "allow_create_engine": False, "allow_sampling": True,
                  "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                  "allow_fine_tuning": False, "organization": "*", "group": None,
                  "is_blocking": False}
    cards = [{"id": m, "object": "model", "created": created, "owned_by": "vllm", "root": m,
              "parent": None, "max_model_len": max_len, "permission": [permission]}
             for m in models]
    cards += [{"id": name, "object": "model", "created": created, "owned_by": "vllm",
               "root": path, "parent": models[0], "max_model_len": max_len,
               "permission": [permission]}
              for name, path in (adapters or {}).items()]
    return {"object": "list", "data": cards}
