"""The compatibility suite: deterministic requests per engine task.

Every probe names a catalog route (``router.catalog``): its group, aliases and stream
format come from there, and an alias appears in the suite because the catalog lists it,
not because this file does. Bodies leave out ``model``; ``Probe.build`` adds it, so the same
probe can go to an engine (its served name) and to a router (the public name).

Generation is deterministic (``temperature: 0``, fixed ``seed``), so an engine answers the
same probe twice with the same tokens, vectors and scores; only per-request fields differ
(see ``compare.IGNORED_FIELDS``).
"""

from __future__ import annotations

import io
import math
import struct
import wave
from dataclasses import dataclass
from typing import Any, Literal

from router.catalog import ROUTES, Route, StreamFormat

TASKS = ("generate", "embed", "score", "transcription")
#: A model name no deployment serves; probes with ``expect="router-error"`` use it.
UNKNOWN_MODEL = "routeyard-compat-no-such-model"
SEED = 1234

#: How a probe's two answers are compared (``compare.compare``):
#: ``same``: the engine's answer relayed unchanged (status, content type, body or events).
#: ``router-error``: routeyard answers by itself (e.g. an unknown model); status, content
#: type, the error envelope's keys and the message's first sentence must match the
#: engine's, while ``type``, ``code`` and ``param`` are routeyard's own (docs/operations.md).
Expect = Literal["same", "router-error"]


@dataclass(frozen=True, slots=True)
class Probe:
    """One request of the suite, sent once to the engine and once to the router."""

    name: str
    route: Route
    path: str
    json: dict[str, Any] | None = None
    form: dict[str, str] | None = None
    audio: bytes | None = None
    expect: Expect = "same"
    model: str | None = None  # overrides the model under test (the unknown-model probes)

    @property
    def group(self) -> str:
        assert self.route.group is not None
        return self.route.group

    @property
    def streams(self) -> bool:
        """True when the probe asks for an event stream (JSON ``stream`` or form field)."""
        if self.json is not None:
            return bool(self.json.get("stream"))
        return (self.form or {}).get("stream") == "true"

    def build(self, model: str) -> dict[str, Any]:
        """httpx keyword arguments for ``client.request("POST", path, **kwargs)``."""
        name = self.model or model
        if self.form is not None:
            audio = self.audio if self.audio is not None else TONE_WAV
            return {"data": {"model": name, **self.form},
                    "files": {"file": ("tone.wav", audio, "audio/wav")}}
        return {"json": {"model": name, **(self.json or {})}}


def wav_tone(seconds: float = 1.0, rate: int = 16_000, hz: float = 440.0) -> bytes:
    """A mono 16-bit WAV sine tone, made here so the suite needs no data files."""
    frames = int(seconds * rate)
    samples = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * i / rate)))
        for i in range(frames)
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples)
    return out.getvalue()


TONE_WAV = wav_tone()


def route_of(path: str) -> Route:
    """The proxied catalog route serving ``path`` (canonical or alias)."""
    for route in ROUTES:
        if path in route.paths and route.proxied:
            return route
    raise LookupError(f"{path} is not a proxied route in router/catalog.py; add it there first")


def _probes(name: str, path: str, *, every_alias: bool = False, **kwargs: Any) -> list[Probe]:
    """A probe for ``path``; with ``every_alias``, one per path of its catalog route."""
    route = route_of(path)
    if not every_alias:
        return [Probe(name, route, path, **kwargs)]
    return [Probe(name if p == path else name + p.replace("/", "-"), route, p, **kwargs)
            for p in route.paths]


def _stream(body: dict[str, Any], usage: bool = True) -> dict[str, Any]:
    """``body`` as a streamed request; ``usage`` also asks for the final usage chunk."""
    options = {"stream_options": {"include_usage": True}} if usage else {}
    return {**body, "stream": True, **options}


_HELLO = [{"role": "user", "content": "Name a colour and a number."}]
_SAMPLING = {"temperature": 0, "seed": SEED}
_CHAT = {"messages": _HELLO, "max_tokens": 12, **_SAMPLING}
_MESSAGES = {"messages": _HELLO, "max_tokens": 12, "temperature": 0}
_COMPLETION = {"prompt": "The router relays every", "max_tokens": 12, **_SAMPLING}
_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                           "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
_TOOLS = {"tools": [_WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False,
          "max_tokens": 64}
_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                           "bright": {"type": "boolean"}},
            "required": ["colour", "bright"],
            "additionalProperties": False,
        },
    },
}


def generate_suite() -> list[Probe]:
    named_tool = {"type": "function", "function": {"name": "get_weather"}}
    return [
        *_probes("completions", "/v1/completions", json=_COMPLETION),
        *_probes("completions-stream", "/v1/completions", json=_stream(_COMPLETION)),
        *_probes("chat", "/v1/chat/completions", json=_CHAT),
        *_probes("chat-stream-usage", "/v1/chat/completions", json=_stream(_CHAT)),
        *_probes("chat-tools-required", "/v1/chat/completions", json={**_CHAT, **_TOOLS}),
        *_probes("chat-tools-named-stream", "/v1/chat/completions",
                 json=_stream({**_CHAT, **_TOOLS, "tool_choice": named_tool})),
        *_probes("chat-json-schema", "/v1/chat/completions",
                 json={**_CHAT, "max_tokens": 64, "response_format": _SCHEMA}),
        *_probes("responses", "/v1/responses",
                 json={"input": "Name a colour.", "max_output_tokens": 12, "temperature": 0}),
        *_probes("responses-stream", "/v1/responses",
                 json={"input": "Name a colour.", "max_output_tokens": 12, "temperature": 0,
                       "stream": True}),
        *_probes("messages", "/v1/messages", json=_MESSAGES),
        *_probes("messages-stream", "/v1/messages", json={**_MESSAGES, "stream": True}),
        *_probes("messages-count-tokens", "/v1/messages/count_tokens",
                 json={"messages": _HELLO}),
        *_probes("tokenize", "/tokenize", json={"prompt": "Hello routeyard"}),
        *_probes("tokenize-chat", "/tokenize", json={"messages": _HELLO}),
        *_probes("detokenize", "/detokenize", json={"tokens": [40, 41, 42, 43]}),
        *_probes("error-unknown-model", "/v1/chat/completions", json=_CHAT,
                 expect="router-error", model=UNKNOWN_MODEL),
        *_probes("error-invalid", "/v1/chat/completions",
                 json={"max_tokens": 5, "temperature": 0}),
        *_probes("error-stream-options", "/v1/completions",
                 json={**_COMPLETION, "stream_options": {"include_usage": True}}),
    ]


def embed_suite() -> list[Probe]:
    texts = ["Hello routeyard", "A router relays requests."]
    return [
        *_probes("embeddings-float", "/v1/embeddings",
                 json={"input": texts, "encoding_format": "float"}),
        *_probes("embeddings-base64", "/v1/embeddings",
                 json={"input": texts, "encoding_format": "base64"}),
        *_probes("pooling", "/pooling", json={"input": "Hello routeyard"}),
        *_probes("tokenize", "/tokenize", json={"prompt": "Hello routeyard"}),
        *_probes("error-unknown-model", "/v1/embeddings", json={"input": texts},
                 expect="router-error", model=UNKNOWN_MODEL),
        *_probes("error-invalid", "/v1/embeddings", json={"encoding_format": "float"}),
    ]


def score_suite() -> list[Probe]:
    query = "What does a router do?"
    docs = ["A router forwards requests.", "Cats sleep a lot.", "Paris is in France."]
    rerank = {"query": query, "documents": docs}
    score = {"text_1": query, "text_2": docs}
    return [
        *_probes("rerank", "/rerank", every_alias=True, json=rerank),
        *_probes("rerank-top-n", "/rerank", json={**rerank, "top_n": 2}),
        *_probes("score", "/score", every_alias=True, json=score),
        *_probes("classify", "/classify", json={"input": docs}),
        *_probes("error-unknown-model-rerank", "/rerank", json=rerank,
                 expect="router-error", model=UNKNOWN_MODEL),
        *_probes("error-invalid-rerank", "/rerank", json={"documents": docs}),
        *_probes("error-unknown-model-score", "/score", json=score,
                 expect="router-error", model=UNKNOWN_MODEL),
        *_probes("error-invalid-score", "/score", json={"text_1": query}),
    ]


def transcription_suite() -> list[Probe]:
    base = {"language": "en", "temperature": "0", "seed": str(SEED),
            "max_completion_tokens": "24"}
    return [
        *_probes("transcription-json", "/v1/audio/transcriptions",
                 form={**base, "response_format": "json"}),
        *_probes("transcription-verbose-json", "/v1/audio/transcriptions",
                 form={**base, "response_format": "verbose_json"}),
        *_probes("transcription-stream", "/v1/audio/transcriptions",
                 form={**base, "response_format": "json", "stream": "true",
                       "stream_include_usage": "true"}),
        *_probes("translation-json", "/v1/audio/translations",
                 form={**base, "response_format": "json"}),
        *_probes("translation-stream", "/v1/audio/translations",
                 form={**base, "response_format": "json", "stream": "true"}),
        *_probes("error-unknown-model", "/v1/audio/transcriptions",
                 form={**base, "response_format": "json"}, expect="router-error",
                 model=UNKNOWN_MODEL),
        *_probes("error-invalid", "/v1/audio/transcriptions",
                 form={**base, "response_format": "bogus-format"}),
    ]


_SUITES = {
    "generate": generate_suite,
    "embed": embed_suite,
    "score": score_suite,
    "transcription": transcription_suite,
}


def suite(task: str, groups: set[str] | frozenset[str] | None = None) -> list[Probe]:
    """The probes for ``task``, limited to routes whose group is in ``groups`` if given."""
    if task not in _SUITES:
        raise ValueError(f"task {task!r} has no compat suite; use one of {', '.join(TASKS)}")
    probes = _SUITES[task]()
    if groups is not None:
        unknown = set(groups) - groups_of(task)
        if unknown:
            raise ValueError(
                f"groups {sorted(unknown)} have no probes for task {task}; "
                f"choose from {sorted(groups_of(task))}"
            )
        probes = [p for p in probes if p.group in groups]
    return probes


def groups_of(task: str) -> set[str]:
    """The endpoint groups a model must enable for the whole suite of ``task``."""
    return {p.group for p in _SUITES[task]()}


def stream_format(probe: Probe) -> StreamFormat:
    """The framing the catalog promises for this probe's answer (NONE if not streamed)."""
    return probe.route.stream if probe.streams else StreamFormat.NONE
