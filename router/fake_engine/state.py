"""Per-engine state: settings, the request and abort logs, knobs and injected faults."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any

import orjson
from sanic import Request

import router.fake_engine.tokens as tokens

LOG_LIMIT = 10_000
TASKS = ("generate", "embed", "score", "transcription")
MAX_MODEL_LEN = 32_768
VERSION = "0.11.0+fake"


class EngineError(Exception):
    """An error answered as vLLM's ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, type_: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.param = param
        self.anthropic = False  # answered in Anthropic's error shape (/v1/messages)

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }


def validation_error(detail: str, param: str | None = None) -> EngineError:
    """vLLM's ``RequestValidationError`` handler: 400 with type "Bad Request"."""
    message = f"1 validation error:\n  {detail}"
    return EngineError(400, HTTPStatus.BAD_REQUEST.phrase, message, param)


def missing_field(loc: tuple[str, ...]) -> EngineError:
    detail = {"type": "missing", "loc": loc, "msg": "Field required"}
    return validation_error(str(detail), ".".join(loc))


def model_not_found(model: str) -> EngineError:
    return EngineError(404, "NotFoundError", f"The model `{model}` does not exist.", "model")


def response_not_found(response_id: str) -> EngineError:
    """vLLM's ``_make_not_found_error`` (serving_responses.py)."""
    return EngineError(404, "invalid_request_error",
                       f"Response with id '{response_id}' not found.", "response_id")


#: Stored Responses API answers kept per engine (vLLM keeps them in memory, unbounded).
STORE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Knobs:
    """Test controls for one request; header ``x-fake-<name>`` (``_`` becomes ``-``)."""

    latency_ms: float = 0
    token_delay_ms: float = 0
    tokens: int = 8
    status: int | None = None
    body: str | None = None
    hang: bool = False
    error_after: int | None = None
    drop_after: int | None = None


KNOB_FIELDS = tuple(Knobs.__dataclass_fields__)


def _coerce(name: str, raw: Any) -> Any:
    if name in ("latency_ms", "token_delay_ms"):
        return max(0.0, float(raw))
    if name in ("tokens", "status", "error_after", "drop_after"):
        return max(0, int(raw))
    if name == "hang":
        return str(raw).strip().lower() in ("1", "true", "yes", "on")
    return str(raw)


def apply_knobs(base: Knobs, values: dict[str, Any]) -> Knobs:
    """Override ``base`` with the named values; raise ValueError on a bad value."""
    changes = {k: _coerce(k, v) for k, v in values.items() if k in KNOB_FIELDS and v is not None}
    return replace(base, **changes) if changes else base


@dataclass(slots=True)
class Injection:
    """A sticky fault set by ``POST /_fake/inject``: knobs for the next ``count`` requests."""

    knobs: dict[str, Any]
    count: int | None = None
    paths: frozenset[str] | None = None

    def take(self, path: str) -> dict[str, Any] | None:
        if self.paths is not None and path not in self.paths:
            return None
        if self.count is not None:
            if self.count <= 0:
                return None
            self.count -= 1
        return self.knobs


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """What ``/tokenize`` answers: token ids and token strings of a text."""

    ids: Callable[[str], list[int]]
    strs: Callable[[str], list[str]]


#: The default fake engine's tokenizer: UTF-8 bytes (see ``tokens``).
BYTE_TOKENIZER = Tokenizer(tokens.tokenize,
                           lambda text: [tokens.detokenize([i]) for i in tokens.tokenize(text)])


@dataclass(slots=True)
class EngineState:
    models: tuple[str, ...]
    task: str
    defaults: Knobs
    created: int = field(default_factory=lambda: int(time.time()))
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=LOG_LIMIT))
    aborted: deque[str | None] = field(default_factory=lambda: deque(maxlen=LOG_LIMIT))
    injection: Injection | None = None
    in_flight: int = 0
    #: Responses API answers made with ``store`` (vLLM with VLLM_ENABLE_RESPONSES_API_STORE=1)
    stored: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    tokenizer: Tokenizer = BYTE_TOKENIZER
    #: LoRA adapters loaded now (name → the path they were loaded from), all of the first
    #: model, as vLLM lists them (``--lora``, ``/_fake/load_lora``).
    adapters: dict[str, str] = field(default_factory=dict)

    def store(self, response: dict[str, Any]) -> None:
        self.stored[response["id"]] = response
        while len(self.stored) > STORE_LIMIT:
            self.stored.popitem(last=False)

    def stored_response(self, response_id: str) -> dict[str, Any]:
        response = self.stored.get(response_id)
        if response is None:
            raise response_not_found(response_id)
        return response

    def reset(self) -> None:
        self.requests.clear()
        self.aborted.clear()
        self.injection = None

    def resolve_model(self, name: Any) -> str:
        """vLLM's rule: a missing or empty name means the first served model."""
        if not name:
            return self.models[0]
        if not isinstance(name, str) or (name not in self.models
                                          and name not in self.adapters):
            raise model_not_found(str(name))
        return name

    def load_lora(self, name: str, path: str | None = None) -> None:
        """Load an adapter (vLLM's ``/v1/load_lora_adapter``): listed and served from now."""
        if not name or name in self.models:
            raise ValueError(f"lora_name {name!r}: give a name that is not a base model's")
        self.adapters[name] = path or f"/fake/loras/{name}"

    def knobs_for(self, request: Request, *, inference: bool) -> Knobs:
        """Defaults (latency only on inference routes), then injection, then headers."""
        base = self.defaults if inference else replace(self.defaults, latency_ms=0)
        if self.injection is not None:
            injected = self.injection.take(request.path)
            if injected:
                base = apply_knobs(base, injected)
        headers = request.headers
        values = {
            name: headers.get("x-fake-" + name.replace("_", "-")) for name in KNOB_FIELDS
        }
        return apply_knobs(base, values)

    def record(self, request: Request) -> dict[str, Any]:
        entry = describe(request)
        self.requests.append(entry)
        return entry


def describe(request: Request) -> dict[str, Any]:
    """The request-log entry: method, path, headers, request id, parsed body, body digest."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    body = request.body or b""
    entry: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "query": request.query_string,
        "headers": headers,
        "request_id": headers.get("x-request-id"),
        "json": None,
        "form": None,
        "file_size": None,
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "time": time.time(),
    }
    content_type = headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            form = request.form
            fields = form.items() if form else ()
            entry["form"] = {k: v[0] if len(v) == 1 else v for k, v in fields}
            upload = request.files.get("file") if request.files else None
            entry["file_size"] = len(upload.body) if upload is not None else None
        except Exception:  # a malformed form is logged as raw bytes only
            pass
    elif body:
        with contextlib.suppress(orjson.JSONDecodeError):
            entry["json"] = orjson.loads(body)
    return entry
