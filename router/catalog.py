"""The route catalog: the one table of vLLM's OpenAI-compatible routes.

Matching, per-model allowlists, ``routeyard check``, docs/supported-apis.md and the
compatibility suite all read this table; nothing else in the code base lists paths.
Facts come from vLLM's OpenAI-compatible server: its route registrations in
``vllm/entrypoints/openai/api_server.py`` and the other ``vllm/entrypoints`` routers, and
https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html.

A route with a ``group`` is proxied: the model name is read from the request (JSON body
or multipart form field ``model``) and the group must be in the model's allowlist. The
two routes about a stored Responses API answer name no model; the answer's id places them
(``BY_RESPONSE_ID``).
Routes with ``group=None`` are listed so the docs can say why routeyard does not proxy
them (ops, dev-mode and model-less routes that need an engine picked by other means).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ModelSource(StrEnum):
    """Where a request carries the served model name."""

    JSON = "json"  # the JSON body's top-level "model"
    FORM = "form"  # the multipart form field "model"
    NONE = "none"  # the request names no model


class StreamFormat(StrEnum):
    """How the engine frames a streamed response (Server-Sent Events)."""

    NONE = "none"
    DATA_DONE = "data+DONE"  # data: <json> events, ending with data: [DONE]
    EVENT_DATA = "event+data"  # event: <type> + data: <json>, no [DONE]


class ErrorStyle(StrEnum):
    """The error envelope clients of a route expect (vLLM answers each family in its own)."""

    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}
    ANTHROPIC = "anthropic"  # {"type": "error", "error": {"type", "message"}}
    COHERE = "cohere"  # {"message", "id"}


@dataclass(frozen=True, slots=True)
class Route:
    """One engine route: its method, canonical path and aliases, and how to proxy it."""

    method: str
    path: str
    group: str | None
    model: ModelSource = ModelSource.JSON
    stream: StreamFormat = StreamFormat.NONE
    aliases: tuple[str, ...] = ()
    task: str = "generate"
    note: str = ""
    errors: ErrorStyle = ErrorStyle.OPENAI

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path, *self.aliases)

    @property
    def sanic_paths(self) -> tuple[str, ...]:
        """``paths`` in Sanic's syntax: ``{response_id}`` becomes ``<response_id>``."""
        return tuple(p.replace("{", "<").replace("}", ">") for p in self.paths)

    @property
    def proxied(self) -> bool:
        return self.group is not None


J, F, N = ModelSource.JSON, ModelSource.FORM, ModelSource.NONE
DD, ED = StreamFormat.DATA_DONE, StreamFormat.EVENT_DATA
ANTHROPIC, COHERE = ErrorStyle.ANTHROPIC, ErrorStyle.COHERE

ROUTES: tuple[Route, ...] = (
    # generate task
    Route("POST", "/v1/chat/completions", "chat", J, DD),
    Route("POST", "/v1/chat/completions/batch", "chat", J, note="several conversations in one"),
    Route("POST", "/v1/completions", "completions", J, DD),
    Route("POST", "/v1/responses", "responses", J, ED),
    Route("GET", "/v1/responses/{response_id}", "responses", N, ED,
          note="stored answers (engine needs VLLM_ENABLE_RESPONSES_API_STORE=1); no model "
               "in the request: sent to the backend that made the answer"),
    Route("POST", "/v1/responses/{response_id}/cancel", "responses", N,
          note="sent to the backend that made the answer"),
    Route("POST", "/v1/messages", "messages", J, ED, note="Anthropic Messages API",
          errors=ANTHROPIC),
    Route("POST", "/v1/messages/count_tokens", "messages", J, errors=ANTHROPIC),
    Route("POST", "/cohere/v2/chat", "cohere", J, DD,
          note="needs VLLM_ENABLE_COHERE_API=1 on the engine", errors=COHERE),
    Route("POST", "/generative_scoring", "generative_scoring", J),
    Route("POST", "/inference/v1/generate", "generate", J, DD, note="token-in/token-out"),
    Route("POST", "/v1/chat/completions/render", "render", J),
    Route("POST", "/v1/completions/render", "render", J),
    Route("POST", "/v1/chat/completions/derender", "render", J),
    Route("POST", "/v1/completions/derender", "render", J),
    # speech
    Route("POST", "/v1/audio/transcriptions", "transcription", F, DD, task="transcription"),
    Route("POST", "/v1/audio/translations", "translation", F, DD, task="transcription"),
    # pooling
    Route("POST", "/v1/embeddings", "embeddings", J, task="embed",
          note="encoding_format bytes answers application/octet-stream"),
    Route("POST", "/v2/embed", "embeddings", J, task="embed", note="Cohere Embed v2"),
    Route("POST", "/pooling", "pooling", J, task="pooling"),
    Route("POST", "/classify", "classify", J, task="classify"),
    Route("POST", "/score", "score", J, aliases=("/v1/score",), task="score"),
    Route("POST", "/rerank", "rerank", J, aliases=("/v1/rerank", "/v2/rerank"), task="score"),
    # tokenizer (every task)
    Route("POST", "/tokenize", "tokenize", J, task="any"),
    Route("POST", "/detokenize", "tokenize", J, task="any"),
    # not proxied: no model in the request, or not an inference API
    Route("GET", "/v1/models", None, N, task="any",
          note="answered by routeyard from routes.yaml and discovered adapters"),
    Route("GET", "/health", None, N, task="any", note="answered by routeyard for itself"),
    Route("GET", "/v1/realtime", None, N, task="realtime",
          note="WebSocket; model only in the session.update event (not yet)"),
    Route("POST", "/invocations", None, J, task="any",
          note="SageMaker: dispatches on body shape, so no allowlist could hold"),
    Route("GET", "/ping", None, N, task="any", note="SageMaker health; engine-local"),
    Route("GET", "/tokenizer_info", None, N, task="any", note="no model in the request"),
    Route("GET", "/version", None, N, task="any", note="engine-local"),
    Route("GET", "/load", None, N, task="any", note="engine-local"),
    Route("GET", "/metrics", None, N, task="any", note="engine-local; routeyard has its own"),
    Route("POST", "/v1/load_lora_adapter", None, N, task="any",
          note="engine administration; call the engine directly"),
    Route("POST", "/v1/unload_lora_adapter", None, N, task="any",
          note="engine administration; call the engine directly"),
    Route("POST", "/abort_requests", None, N, note="engine-local request ids"),
    Route("POST", "/scale_elastic_ep", None, N, note="engine administration"),
    Route("POST", "/is_scaling_elastic_ep", None, N, note="engine administration"),
    Route("POST", "/start_profile", None, N, task="any", note="engine administration"),
    Route("POST", "/stop_profile", None, N, task="any", note="engine administration"),
)

#: Routes sent to a backend of the model the request names.
PROXIED: tuple[Route, ...] = tuple(
    r for r in ROUTES if r.proxied and r.model is not ModelSource.NONE)
#: Routes about a stored Responses API answer: the request names no model, the answer's id
#: says which backend holds it (``router.stored_responses``).
BY_RESPONSE_ID: tuple[Route, ...] = tuple(
    r for r in ROUTES if r.proxied and r.model is ModelSource.NONE)

#: Every allowlist group name, in catalog order.
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(r.group for r in PROXIED if r.group))


#: Path → error style, for the routes whose clients expect another envelope than OpenAI's.
ERROR_STYLES: dict[str, ErrorStyle] = {
    path: r.errors for r in ROUTES for path in r.paths if r.errors is not ErrorStyle.OPENAI
}
#: Path prefixes of those API families, for paths not in the catalog (an unknown
#: ``/cohere/…`` path still gets Cohere's envelope).
_FAMILY_PREFIXES = (("/cohere/", ErrorStyle.COHERE), ("/v1/messages/", ErrorStyle.ANTHROPIC))


def error_style(path: str) -> ErrorStyle:
    """The error envelope for a request to ``path``."""
    style = ERROR_STYLES.get(path)
    if style is not None:
        return style
    for prefix, family in _FAMILY_PREFIXES:
        if path.startswith(prefix):
            return family
    return ErrorStyle.OPENAI


def routes_of_group(group: str) -> tuple[Route, ...]:
    return tuple(r for r in PROXIED if r.group == group)
