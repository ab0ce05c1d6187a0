"""A valid request for every route group, usable against fake and real engines alike."""

from __future__ import annotations

from router.catalog import ROUTES, ModelSource
from router.compat.requests import wav_tone

WAV = wav_tone(seconds=0.5)

JSON_BODIES: dict[str, dict] = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello"}],
                             "max_tokens": 5, "temperature": 0},
    "/v1/chat/completions/batch": {"messages": [[{"role": "user", "content": "Hi"}]],
                                   "max_tokens": 3},
    "/v1/completions": {"prompt": "Hello", "max_tokens": 5, "temperature": 0},
    "/v1/responses": {"input": "Hello", "max_output_tokens": 5},
    "/v1/messages": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5},
    "/v1/messages/count_tokens": {"messages": [{"role": "user", "content": "Hello"}]},
    "/tokenize": {"prompt": "Hello world"},
    "/detokenize": {"tokens": [1, 2, 3]},
    "/v1/embeddings": {"input": ["Hello", "world"]},
    "/v2/embed": {"texts": ["Hello"], "input_type": "search_document"},
    "/pooling": {"input": "Hello"},
    "/classify": {"input": ["Hello"]},
    "/score": {"text_1": "What is a cat?", "text_2": ["A cat is an animal.", "Paris"]},
    "/rerank": {"query": "What is a cat?", "documents": ["A cat is an animal.", "Paris"]},
}
for alias_route in ROUTES:
    for alias in alias_route.aliases:
        JSON_BODIES[alias] = JSON_BODIES[alias_route.path]


def request_for(path: str, model: str) -> dict:
    """httpx keyword arguments for a valid POST to ``path`` for ``model``."""
    route = next(r for r in ROUTES if path in r.paths)
    if route.model is ModelSource.FORM:
        return {"files": {"file": ("a.wav", WAV, "audio/wav")},
                "data": {"model": model, "response_format": "json"}}
    return {"json": {"model": model, **JSON_BODIES[path]}}
