"""Handlers for the generate task: chat, completions, responses, Anthropic messages."""

from __future__ import annotations

import uuid
from typing import Any

from sanic import HTTPResponse

import router.fake_engine.formats as fmt
import router.fake_engine.tokens as tokens
from router.fake_engine.call import Call, Stream
from router.fake_engine.state import EngineError, missing_field, validation_error


def flag(value: Any) -> bool:
    """Truthiness as pydantic's lax ``bool`` reads JSON and form values."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "t", "y")
    return value is True or value == 1


def text_of(content: Any) -> str:
    """The text of an OpenAI/Anthropic content value: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(text_of(p) for p in content if isinstance(p, dict))
    if isinstance(content, dict):
        text = content.get("text", "")
        return text if isinstance(text, str) else ""
    return ""


def render(messages: list[Any], system: Any = None) -> tuple[str, str]:
    """A stand-in chat template: (prompt text, last message text)."""
    parts = [f"<|system|>{text_of(system)}\n"] if system else []
    last = ""
    for message in messages:
        if not isinstance(message, dict):
            continue
        last = text_of(message.get("content"))
        parts.append(f"<|{message.get('role', 'user')}|>{last}\n")
    parts.append("<|assistant|>")
    return "".join(parts), last


def require_list(body: dict[str, Any], name: str) -> list[Any]:
    value = body.get(name)
    if value is None:
        raise missing_field(("body", name))
    if not isinstance(value, list):
        detail = {"type": "list_type", "loc": ("body", name), "msg": "Input should be a valid list"}
        raise validation_error(str(detail), f"body.{name}")
    return value


def max_tokens(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            detail = {"type": "int_type", "loc": ("body", name),
                      "msg": "Input should be a valid integer"}
            raise validation_error(str(detail), f"body.{name}")
        if value < 0:
            raise EngineError(400, "BadRequestError",
                              f"{name} must be at least 0, got {value}.", name)
        return value
    return None


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage); stream_options needs stream=true."""
    stream = flag(body.get("stream"))
    options = body.get("stream_options")
    if options and not stream:
        raise validation_error(
            "{'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, Stream options "
            "can only be defined when `stream=True`.'}", "stream_options")
    options = options if isinstance(options, dict) else {}
    include = flag(options.get("include_usage"))
    return stream, include, include and flag(options.get("continuous_usage_stats"))


async def chat_completions(call: Call) -> HTTPResponse | None:
    body = call.body()
    messages = require_list(body, "messages")
    stream, include_usage, continuous = stream_flags(body)
    model = call.state.resolve_model(body.get("model"))
    limit = max_tokens(body, "max_completion_tokens", "max_tokens")
    prompt, last = render(messages)
    prompt_tokens = tokens.count(prompt)
    n = call.token_count(limit)
    words = tokens.generate(tokens.seed_of(last), n)
    finish = fmt.finish_reason(n, limit)
    rid = call.request_id("chatcmpl")
    if not stream:
        await call.generation_time(n)
        return await call.reply(fmt.chat_completion(
            rid, call.created, model, "".join(words), finish, fmt.usage(prompt_tokens, n)))
    head = fmt.chat_head(rid, call.created, model)
    out = Stream(call)
    await out.open()
    first = fmt.chat_role_chunk(head)
    if continuous:
        first["usage"] = fmt.usage(prompt_tokens, 0)
    await out.data(first)
    if not words:  # max_tokens 0: one empty delta that carries the finish reason
        await out.data(fmt.chat_token_chunk(head, "", finish))
    for i, word in enumerate(words):
        if not await out.pace(i):
            return None
        chunk = fmt.chat_token_chunk(head, word, finish if i == n - 1 else None)
        if continuous:
            chunk["usage"] = fmt.usage(prompt_tokens, i + 1)
        await out.data(chunk)
    if include_usage:
        await out.data({**head, "choices": [], "usage": fmt.usage(prompt_tokens, n)})
    await out.done()
    return None


def prompts_of(body: dict[str, Any]) -> list[str]:
    """Completions ``prompt``: a string, strings, token ids or lists of token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise missing_field(("body", "prompt"))
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) for p in prompt):
            return [tokens.detokenize(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) for p in prompt):
            return [tokens.detokenize(p) for p in prompt]
    detail = {"type": "union_type", "loc": ("body", "prompt"), "msg": "Invalid prompt"}
    raise validation_error(str(detail), "body.prompt")


async def completions(call: Call) -> HTTPResponse | None:
    body = call.body()
    try:
        prompts = prompts_of(body)
    except (ValueError, TypeError):
        raise EngineError(400, "BadRequestError", "Token ids out of range.", "prompt") from None
    stream, include_usage, continuous = stream_flags(body)
    model = call.state.resolve_model(body.get("model"))
    limit = max_tokens(body, "max_tokens")
    if limit is None:
        limit = 16  # OpenAI's and vLLM's default for /v1/completions
    n = call.token_count(limit)
    outputs = [tokens.generate(tokens.seed_of(p), n) for p in prompts]
    prompt_tokens = sum(tokens.count(p) for p in prompts)
    use = fmt.usage(prompt_tokens, n * len(prompts))
    finish = fmt.finish_reason(n, limit)
    rid = call.request_id("cmpl")
    if not stream:
        await call.generation_time(n)
        choices = [fmt.completion_choice(i, "".join(o), finish) for i, o in enumerate(outputs)]
        return await call.reply(fmt.completion(rid, call.created, model, choices, use))
    head = fmt.completion_head(rid, call.created, model)
    out = Stream(call)
    await out.open()
    for step in range(max(n, 1)):
        if n and not await out.pace(step):
            return None
        last = step >= n - 1
        for index, words in enumerate(outputs):
            text = words[step] if n else ""
            choice = fmt.completion_choice(index, text, finish if last else None)
            chunk = {**head, "choices": [choice]}
            if continuous:
                chunk["usage"] = fmt.usage(prompt_tokens, (step + 1 if n else 0) * len(prompts))
            await out.data(chunk)
    if include_usage:
        await out.data({**head, "choices": [], "usage": use})
    await out.done()
    return None


def responses_prompt(body: dict[str, Any]) -> tuple[str, str]:
    value = body.get("input")
    if value is None:
        raise missing_field(("body", "input"))
    if isinstance(value, str):
        messages: list[Any] = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = [m for m in value if isinstance(m, dict) and "content" in m]
    else:
        raise validation_error(str({"type": "union_type", "loc": ("body", "input")}), "body.input")
    return render(messages, body.get("instructions"))


async def responses(call: Call) -> HTTPResponse | None:
    body = call.body()
    prompt, last = responses_prompt(body)
    stream = flag(body.get("stream"))
    model = call.state.resolve_model(body.get("model"))
    previous = body.get("previous_response_id")
    if previous is not None:
        call.state.stored_response(str(previous))  # 404 before any generation, as vLLM
    store = body.get("store", True) is not False
    limit = max_tokens(body, "max_output_tokens")
    n = call.token_count(limit)
    words = tokens.generate(tokens.seed_of(last), n)
    text = "".join(words)
    use = fmt.usage(tokens.count(prompt), n)
    status = "incomplete" if fmt.finish_reason(n, limit) == "length" else "completed"
    rid = f"resp_{uuid.uuid4().hex}"
    item_id = f"msg_{uuid.uuid4().hex}"
    done_item = fmt.response_message(item_id, text, "completed")
    final = fmt.response_object(rid, call.created, model, body, status=status,
                                output=[done_item], use=use)
    if not stream:
        await call.generation_time(n)
        if store:
            call.state.store(final)
        return await call.reply(final)
    start = fmt.response_object(rid, call.created, model, body, status="in_progress",
                                output=[], use=None)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    part: dict[str, Any] = {"annotations": [], "text": "", "type": "output_text", "logprobs": None}
    out = Stream(call, "responses")
    await out.open()
    await out.event("response.created", {"response": start})
    await out.event("response.in_progress", {"response": start})
    await out.event("response.output_item.added",
                    {"output_index": 0, "item": fmt.response_message(item_id, "", "in_progress")})
    await out.event("response.content_part.added", {**where, "part": part})
    for i, word in enumerate(words):
        if not await out.pace(i):
            return None
        await out.event("response.output_text.delta", {**where, "delta": word, "logprobs": []})
    await out.event("response.output_text.done", {**where, "text": text, "logprobs": []})
    await out.event("response.content_part.done", {**where, "part": {**part, "text": text}})
    await out.event("response.output_item.done", {"output_index": 0, "item": done_item})
    if store:
        call.state.store(final)
    await out.event("response.completed", {"response": final})
    await out.close()
    return None


async def retrieve_response(call: Call) -> HTTPResponse | None:
    """``GET /v1/responses/{response_id}``: a stored answer, or vLLM's 404."""
    response_id = call.request.match_info["response_id"]
    return await call.reply(call.state.stored_response(response_id))


async def cancel_response(call: Call) -> HTTPResponse | None:
    """``POST /v1/responses/{response_id}/cancel``: answers here finished synchronously,
    which vLLM refuses to cancel (400); unknown ids are 404."""
    response_id = call.request.match_info["response_id"]
    call.state.stored_response(response_id)
    raise EngineError(400, "invalid_request_error", "Cannot cancel a synchronous response.",
                      "response_id")


def anthropic_request(call: Call, body: dict[str, Any]) -> tuple[str, str, str]:
    """(model, prompt, last text); ``model`` is required, a wrong one is Anthropic-shaped."""
    if not body.get("model"):
        raise missing_field(("body", "model"))
    messages = require_list(body, "messages")
    try:
        model = call.state.resolve_model(body["model"])
    except EngineError as exc:
        exc.anthropic = True
        raise
    prompt, last = render(messages, body.get("system"))
    return model, prompt, last


async def messages(call: Call) -> HTTPResponse | None:
    body = call.body()
    if body.get("max_tokens") is None:
        raise missing_field(("body", "max_tokens"))
    model, prompt, last = anthropic_request(call, body)
    limit = max_tokens(body, "max_tokens")
    n = call.token_count(limit)
    words = tokens.generate(tokens.seed_of(last), n)
    stop = fmt.anthropic_stop(fmt.finish_reason(n, limit))
    input_tokens = tokens.count(prompt)
    mid = f"msg_{uuid.uuid4().hex}"
    if not flag(body.get("stream")):
        await call.generation_time(n)
        return await call.reply(
            fmt.anthropic_message(mid, model, "".join(words), stop, input_tokens, n))
    out = Stream(call, "anthropic")
    await out.open()
    start = fmt.anthropic_message(mid, model, None, None, input_tokens, 0)
    await out.event("message_start", {"message": start})
    await out.event("content_block_start",
                    {"index": 0, "content_block": {"type": "text", "text": ""}})
    for i, word in enumerate(words):
        if not await out.pace(i):
            return None
        await out.event("content_block_delta",
                        {"index": 0, "delta": {"type": "text_delta", "text": word}})
    await out.event("content_block_stop", {"index": 0})
    await out.event("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                                      "usage": {"output_tokens": n}})
    await out.event("message_stop", {})
    await out.close()
    return None


async def count_tokens(call: Call) -> HTTPResponse | None:
    body = call.body()
    _, prompt, _ = anthropic_request(call, body)
    return await call.reply({"input_tokens": tokens.count(prompt)})
