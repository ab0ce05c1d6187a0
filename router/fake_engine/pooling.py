"""Handlers for the pooling tasks: embeddings, pooling, classify, score and rerank."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from sanic import HTTPResponse

import router.fake_engine.formats as fmt
import router.fake_engine.tokens as tokens
from router.fake_engine.call import Call
from router.fake_engine.generate import render, text_of
from router.fake_engine.state import EngineError, missing_field, validation_error

DEFAULT_DIM = 8
ENCODINGS = ("float", "base64", "bytes", "bytes_only")


def inputs_of(body: dict[str, Any], name: str = "input") -> list[str]:
    """Completion-style ``input`` (text, texts, token ids) or chat-style ``messages``."""
    value = body.get(name)
    if value is None and isinstance(body.get("messages"), list):
        return [render(body["messages"])[0]]
    if value is None:
        raise missing_field(("body", name))
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        try:
            if all(isinstance(v, int) for v in value):
                return [tokens.detokenize(value)]
            if all(isinstance(v, list) for v in value):
                return [tokens.detokenize(v) for v in value]
        except (ValueError, TypeError):
            raise EngineError(400, "BadRequestError", "Token ids out of range.", name) from None
        if all(isinstance(v, str) for v in value):
            return list(value)
    raise validation_error(str({"type": "union_type", "loc": ("body", name)}), f"body.{name}")


def dimensions(body: dict[str, Any]) -> int:
    dim = body.get("dimensions")
    if dim is None:
        return DEFAULT_DIM
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise EngineError(400, "BadRequestError", "dimensions must be a positive integer.",
                          "dimensions")
    return dim


async def embeddings(call: Call) -> HTTPResponse | None:
    body = call.body()
    texts = inputs_of(body)
    model = call.state.resolve_model(body.get("model"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        detail = {"type": "literal_error", "loc": ("body", "encoding_format"),
                  "msg": "Input should be 'float', 'base64', 'bytes' or 'bytes_only'"}
        raise validation_error(str(detail), "body.encoding_format")
    dim = dimensions(body)
    vectors = [tokens.vector(t, dim) for t in texts]
    prompt = sum(tokens.count(t) for t in texts)
    rid = call.request_id("embd")
    if encoding in ("bytes", "bytes_only"):
        return await bytes_reply(call, rid, model, vectors, prompt, encoding)
    data = [{"index": i, "object": "embedding",
             "embedding": v if encoding == "float"
             else base64.b64encode(tokens.pack_f32(v)).decode()}
            for i, v in enumerate(vectors)]
    return await call.reply(fmt.pooling_list(rid, call.created, model, data, prompt))


async def bytes_reply(call: Call, rid: str, model: str, vectors: list[list[float]],
                      prompt: int, encoding: str) -> HTTPResponse:
    """``application/octet-stream``: float32 LE vectors back to back, items in a header."""
    items, chunks, offset = [], [], 0
    for i, vec in enumerate(vectors):
        packed = tokens.pack_f32(vec)
        chunks.append(packed)
        items.append({"index": i, "embed_dtype": "float32", "endianness": "little",
                      "start": offset, "end": offset + len(packed), "shape": [len(vec)]})
        offset += len(packed)
    headers = {}
    if encoding == "bytes":
        meta = {"id": rid, "created": call.created, "model": model, "data": items,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
        headers["metadata"] = orjson.dumps(meta).decode()
    if call.knobs.drop_after is not None:
        await call.drop()
    return HTTPResponse(b"".join(chunks), headers=headers,
                        content_type="application/octet-stream")


async def embed_v2(call: Call) -> HTTPResponse | None:
    """Cohere Embed v2, minimal: ``texts`` in, ``embeddings`` by type out."""
    body = call.body()
    texts = inputs_of(body, "texts")
    call.state.resolve_model(body.get("model"))
    kinds = body.get("embedding_types") or ["float"]
    vectors = [tokens.vector(t, dimensions(body)) for t in texts]
    by_type: dict[str, Any] = {}
    for kind in kinds:
        if kind == "base64":
            by_type[kind] = [base64.b64encode(tokens.pack_f32(v)).decode() for v in vectors]
        else:
            by_type[kind] = vectors
    prompt = sum(tokens.count(t) for t in texts)
    return await call.reply({
        "id": call.request_id("embd"), "embeddings": by_type, "texts": texts,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": prompt}},
        "response_type": "embeddings_by_type",
    })


async def pooling(call: Call) -> HTTPResponse | None:
    body = call.body()
    texts = inputs_of(body)
    model = call.state.resolve_model(body.get("model"))
    data = [{"index": i, "object": "pooling", "data": tokens.vector(t, dimensions(body))}
            for i, t in enumerate(texts)]
    prompt = sum(tokens.count(t) for t in texts)
    rid = call.request_id("pool")
    return await call.reply(fmt.pooling_list(rid, call.created, model, data, prompt))


async def classify(call: Call) -> HTTPResponse | None:
    body = call.body()
    texts = inputs_of(body)
    model = call.state.resolve_model(body.get("model"))
    data = []
    for i, text in enumerate(texts):
        p = tokens.score(text, "")
        label = "LABEL_1" if p >= 0.5 else "LABEL_0"
        data.append({"index": i, "label": label, "probs": [1 - p, p], "num_classes": 2})
    prompt = sum(tokens.count(t) for t in texts)
    rid = call.request_id("classify")
    return await call.reply(fmt.pooling_list(rid, call.created, model, data, prompt))


def _texts(value: Any) -> list[str]:
    if isinstance(value, list):
        return [text_of(v) if isinstance(v, dict | list) else str(v) for v in value]
    return [text_of(value) if isinstance(value, dict) else str(value)]


def score_pairs(body: dict[str, Any]) -> list[tuple[str, str]]:
    """vLLM's score inputs under any of their names; one side may broadcast."""
    for left, right in (("queries", "documents"), ("text_1", "text_2"), ("data_1", "data_2")):
        if body.get(left) is not None and body.get(right) is not None:
            a, b = _texts(body[left]), _texts(body[right])
            if len(a) == 1:
                return [(a[0], d) for d in b]
            if len(a) != len(b):
                raise EngineError(400, "BadRequestError",
                                  f"{left} and {right} must have the same length.", left)
            return list(zip(a, b, strict=True))
    raise missing_field(("body", "queries"))


async def score(call: Call) -> HTTPResponse | None:
    body = call.body()
    pairs = score_pairs(body)
    model = call.state.resolve_model(body.get("model"))
    data = [{"index": i, "object": "score", "score": tokens.score(a, b)}
            for i, (a, b) in enumerate(pairs)]
    prompt = sum(tokens.count(a) + tokens.count(b) for a, b in pairs)
    rid = call.request_id("score")
    return await call.reply(fmt.pooling_list(rid, call.created, model, data, prompt))


async def rerank(call: Call) -> HTTPResponse | None:
    body = call.body()
    if body.get("query") is None:
        raise missing_field(("body", "query"))
    if body.get("documents") is None:
        raise missing_field(("body", "documents"))
    model = call.state.resolve_model(body.get("model"))
    query = text_of(body["query"]) if not isinstance(body["query"], str) else body["query"]
    docs = _texts(body["documents"])
    results: list[dict[str, Any]] = [
        {"index": i, "document": {"text": d}, "relevance_score": tokens.score(query, d)}
        for i, d in enumerate(docs)]
    results.sort(key=lambda r: r["relevance_score"], reverse=True)
    top_n = body.get("top_n")
    if isinstance(top_n, int) and top_n > 0:
        results = results[:top_n]
    total = sum(tokens.count(query) + tokens.count(d) for d in docs)
    return await call.reply({"id": call.request_id("rerank"),
                             "model": model, "usage": {"total_tokens": total},
                             "results": results})
