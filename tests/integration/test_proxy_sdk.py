"""The official OpenAI SDK through the router: chat, completions, embeddings, audio."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import KINDS, Router
from tests.payloads import WAV

CHAT = KINDS["chat"].name
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)


def test_chat(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=5)
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content
    assert result.usage is not None and result.usage.completion_tokens > 0


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_chat_stream_is_not_buffered(router: Router) -> None:
    """Chunks reach the client while the engine is still generating."""
    import time

    import httpx

    if "ROUTEYARD_TEST_ENGINE_GENERATE" in __import__("os").environ:
        pytest.skip("needs the fake engine's token delay")
    body = {"model": CHAT, "messages": MESSAGES, "max_tokens": 10, "stream": True}
    arrivals = []
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body,
                      headers={"x-fake-token-delay-ms": "100", "x-fake-tokens": "10"},
                      timeout=30) as r:
        start = time.monotonic()
        for _ in r.iter_raw():
            arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 5
    assert arrivals[0] < 0.5  # the role chunk did not wait for the end of generation
    assert arrivals[-1] > 0.8


def test_completions_and_stream(client: openai.OpenAI) -> None:
    result = client.completions.create(model=CHAT, prompt="Hello", max_tokens=5)
    assert result.object == "text_completion" and result.choices[0].text
    chunks = list(client.completions.create(model=CHAT, prompt="Hello", max_tokens=5,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    model = KINDS["embed"].name
    result = client.embeddings.create(model=model, input=["a", "b"])
    assert len(result.data) == 2 and len(result.data[0].embedding) > 0
    encoded = client.embeddings.create(model=model, input=["a", "b"], encoding_format="base64")
    assert isinstance(encoded.data[0].embedding, str)


def test_transcription_json_text_and_stream(client: openai.OpenAI) -> None:
    model = KINDS["transcription"].name
    result = client.audio.transcriptions.create(model=model, file=("a.wav", WAV, "audio/wav"))
    assert isinstance(result.text, str)
    translation = client.audio.translations.create(model=model, file=("a.wav", WAV, "audio/wav"))
    assert isinstance(translation.text, str)
    events = list(client.audio.transcriptions.create(
        model=model, file=("a.wav", WAV, "audio/wav"), stream=True))
    assert events


def test_models_list_comes_from_the_config(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {k.name for k in KINDS.values()} <= ids
