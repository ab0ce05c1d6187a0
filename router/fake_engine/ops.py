"""Handlers every task serves: models, health, version, load, tokenize, detokenize."""

from __future__ import annotations

from collections.abc import Iterator

from sanic import HTTPResponse

import router.fake_engine.formats as fmt
import router.fake_engine.tokens as tokens
from router.fake_engine.call import Call
from router.fake_engine.generate import flag, render, text_of
from router.fake_engine.state import MAX_MODEL_LEN, VERSION, EngineError, missing_field


async def models(call: Call) -> HTTPResponse | None:
    state = call.state
    return await call.reply(fmt.model_list(state.models, state.created, MAX_MODEL_LEN,
                                           state.adapters))


class _Untyped(HTTPResponse):
    """A response with no content-type header (Sanic would send ``content-type: None``)."""

    @property
    def processed_headers(self) -> Iterator[tuple[bytes, bytes]]:
        return ((k, v) for k, v in super().processed_headers if k != b"content-type")


async def health(call: Call) -> HTTPResponse | None:
    """An empty 200 with no content type, as vLLM's ``/health`` answers."""
    return _Untyped(b"", status=200)


async def version(call: Call) -> HTTPResponse | None:
    return await call.reply({"version": VERSION})


async def load(call: Call) -> HTTPResponse | None:
    """``{"server_load": n}``: requests in flight, this one included."""
    return await call.reply({"server_load": call.state.in_flight})


async def tokenize(call: Call) -> HTTPResponse | None:
    body = call.body()
    if isinstance(body.get("messages"), list):
        text = render(body["messages"])[0]
    elif body.get("prompt") is not None:
        text = text_of(body["prompt"]) if not isinstance(body["prompt"], str) else body["prompt"]
    else:
        raise missing_field(("body", "prompt"))
    call.state.resolve_model(body.get("model"))
    ids = call.state.tokenizer.ids(text)
    strs = call.state.tokenizer.strs(text) if flag(body.get("return_token_strs")) else None
    return await call.reply({"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids,
                             "token_strs": strs})


async def detokenize(call: Call) -> HTTPResponse | None:
    body = call.body()
    ids = body.get("tokens")
    if ids is None:
        raise missing_field(("body", "tokens"))
    call.state.resolve_model(body.get("model"))
    try:
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise TypeError("tokens must be a list of integers")
        text = tokens.detokenize(ids)
    except (ValueError, TypeError) as exc:
        raise EngineError(400, "BadRequestError", f"Invalid token ids: {exc}", "tokens") from None
    return await call.reply({"prompt": text})
