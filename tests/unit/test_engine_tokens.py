"""router/engine_tokens.py: a prompt's token ids from the engine's ``/tokenize``, over the
real upstream client against the fake engine, and failure cases with a scripted backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from router.engine_tokens import engine_token_ids, prompt_token_ids, tokenize_body
from router.upstream import Origin, Pool, Transport
from router.upstream_mock import MockReply, MockRequest, MockTransport
from tests.conftest import KINDS

CHAT = {"model": "chat", "messages": [{"role": "system", "content": "You are terse."},
                                      {"role": "user", "content": "Hello there"}],
        "temperature": 0.2, "max_tokens": 5, "stream": True,
        "chat_template_kwargs": {"enable_thinking": False}}


@dataclass
class Backend:
    origin: Origin
    transport: Transport
    api_key_header: str | None = None


def scripted(reply: MockReply | Exception, url: str = "http://engine:8000/v1x",
             key: str | None = None) -> tuple[Backend, list[MockRequest]]:
    seen: list[MockRequest] = []

    def handler(request: MockRequest) -> MockReply:
        seen.append(request)
        if isinstance(reply, Exception):
            raise reply
        return reply

    return Backend(Origin.from_url(url), MockTransport(handler), key), seen


def tokens_reply(tokens: Any) -> MockReply:
    return MockReply(200, [(b"content-type", b"application/json")],
                     [orjson.dumps({"count": 3, "max_model_len": 2048, "tokens": tokens})])


async def test_the_fake_engines_tokens_for_a_chat_over_the_upstream_client(
    engines: dict[str, str],
) -> None:
    model = KINDS["chat"].engine_model
    origin = Origin.from_url(engines["generate"])
    backend = Backend(origin, Pool(origin))
    try:
        ids = await engine_token_ids(backend, model, CHAT, timeout=5)
    finally:
        backend.transport.close()
    async with httpx.AsyncClient() as client:
        direct = await client.post(f"{engines['generate']}/tokenize",
                                   json={"model": model, "messages": CHAT["messages"]})
    assert ids is not None and len(ids) > 3
    assert ids == direct.json()["tokens"]


async def test_only_the_fields_that_change_the_rendering_are_sent_with_the_engine_key() -> None:
    backend, seen = scripted(tokens_reply([1, 2, 3]), key="authorization: Bearer k\r\n")
    assert await engine_token_ids(backend, "served-name", CHAT, timeout=5) == [1, 2, 3]
    (request,) = seen
    assert (request.method, request.target) == ("POST", "/v1x/tokenize")
    assert request.header("authorization") == "Bearer k"
    assert request.header("host") == "engine:8000"
    assert orjson.loads(request.body) == {
        "model": "served-name", "messages": CHAT["messages"],
        "chat_template_kwargs": {"enable_thinking": False}}


def test_completion_prompts() -> None:
    assert orjson.loads(tokenize_body("m", {"prompt": "hi", "add_special_tokens": False,
                                            "max_tokens": 3}) or b"") == {
        "model": "m", "prompt": "hi", "add_special_tokens": False}
    assert tokenize_body("m", {"prompt": ["a", "b"]}) is None  # a batch: no single prompt
    assert tokenize_body("m", {"input": "embed me"}) is None
    assert prompt_token_ids({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert prompt_token_ids({"prompt": [5, "6"]}) is None
    assert prompt_token_ids({"prompt": "text"}) is None


async def test_a_prompt_of_token_ids_needs_no_call() -> None:
    backend, seen = scripted(tokens_reply([9]))
    assert await engine_token_ids(backend, "m", {"prompt": [4, 5, 6]}, timeout=5) == [4, 5, 6]
    assert await engine_token_ids(backend, "m", {"input": ["x"]}, timeout=5) is None
    assert seen == []


@pytest.mark.parametrize("reply", [
    MockReply(400, [], [b'{"error": {"message": "bad"}}']),
    MockReply(200, [], [b"not json"]),
    MockReply(200, [], [b'["a list"]']),
    tokens_reply(["a", "b"]),
    tokens_reply(None),
])
async def test_anything_but_a_token_list_gives_none(reply: MockReply) -> None:
    backend, _ = scripted(reply)
    assert await engine_token_ids(backend, "m", CHAT, timeout=5) is None


async def test_an_engine_that_does_not_answer_gives_none(dead_port: int) -> None:
    origin = Origin.from_url(f"http://127.0.0.1:{dead_port}")
    backend = Backend(origin, Pool(origin))
    try:
        assert await engine_token_ids(backend, "m", CHAT, timeout=2) is None
    finally:
        backend.transport.close()
