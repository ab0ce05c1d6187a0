"""A small vLLM-compatible engine for tests and the demo.

Routes come from ``router.catalog`` and are registered per task, like vLLM's task-gated
registration: an unregistered path answers 404 ``{"detail":"Not Found"}`` and a wrong
method 405 ``{"detail":"Method Not Allowed"}``. Bodies, SSE framing and error envelopes
follow vLLM's OpenAI-compatible server (its source, ``vllm/entrypoints/openai/``, and
https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html); generated text,
vectors and scores are deterministic functions of the input (see ``tokens``).

Knobs, per request as headers (an injection or ``create_app`` sets the defaults):

==========================  ===============================================================
``x-fake-latency-ms``       delay before the response headers (``create_app`` default
                            applies to inference routes only, not /health, /v1/models...)
``x-fake-token-delay-ms``   delay before each streamed token; a non-streamed answer
                            waits ``tokens * delay``
``x-fake-tokens``           tokens to generate (``max_tokens`` still caps it)
``x-fake-status``           answer this status with ``x-fake-body`` (default: a vLLM
``x-fake-body``             error envelope); JSON bodies go out as application/json
``x-fake-hang: 1``          never answer (until the client leaves: logged as aborted)
``x-fake-error-after: N``   after N streamed tokens send a mid-stream error (then
                            ``data: [DONE]`` on data streams) and end the stream
``x-fake-drop-after: N``    after N streamed tokens abort the TCP connection; on a
                            non-streamed route, abort instead of answering
==========================  ===============================================================

Introspection, under ``/_fake/`` so it can never clash with vLLM:

* ``GET /_fake/requests[?path=P]``: requests received, oldest first (the last 10,000):
  method, path, query, headers (lower-case names), request_id (``x-request-id``), json
  (parsed body) or form (fields except the file) plus file_size, body_len, body_sha256.
* ``GET /_fake/aborted``: ``x-request-id`` of requests whose client left before the
  response finished (Sanic cancels the handler task when the connection is lost).
* ``POST /_fake/inject``: ``{"status": 503, "count": 2, "paths": ["/health"], ...}``
  sets sticky knobs (same names as the headers, ``_`` for ``-``) for the next ``count``
  requests (all, if omitted) to ``paths`` (any, if omitted); headers still win.
* ``POST /_fake/reset``: clears both logs and any injection.
* ``POST /_fake/load_lora`` ``{"lora_name": "sql", "lora_path": "/p"}`` and
  ``POST /_fake/unload_lora`` ``{"lora_name": "sql"}``: load or unload a LoRA adapter of
  the first model at runtime (vLLM's ``/v1/load_lora_adapter`` bodies); a loaded adapter
  is listed in ``/v1/models`` with ``parent`` and ``root`` and answers as a model.
  ``create_app(loras=...)`` (``--lora``) loads some at start.

With ``serving`` (``--simulate``), chat completions go through a serving model of a vLLM
engine (slots, queue, prefix-cached KV blocks, step costs) and the engine also serves
``GET /metrics`` with vLLM's metric names and ``POST /reset_prefix_cache``; see
``simulated``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import Any

import orjson
from sanic import DefaultSanic, HTTPResponse, Request, Sanic
from sanic.exceptions import MethodNotAllowed, NotFound

import router.fake_engine.audio as audio
import router.fake_engine.generate as generate
import router.fake_engine.ops as ops
import router.fake_engine.pooling as pooling
from router.catalog import ROUTES
from router.fake_engine.call import Call, json_response
from router.fake_engine.formats import anthropic_error
from router.fake_engine.serving import ServingParams
from router.fake_engine.state import (
    KNOB_FIELDS,
    TASKS,
    EngineError,
    EngineState,
    Injection,
    Knobs,
    apply_knobs,
)

Handler = Callable[[Call], Awaitable[HTTPResponse | None]]
Endpoint = Callable[[Request], Coroutine[Any, Any, HTTPResponse | None]]

log = logging.getLogger("routeyard.fake_engine")

#: What each fake task serves, by the catalog's ``task`` labels.
TASK_LABELS: dict[str, frozenset[str]] = {
    "generate": frozenset({"generate", "any"}),
    "embed": frozenset({"embed", "pooling", "score", "any"}),
    "score": frozenset({"classify", "pooling", "score", "any"}),
    "transcription": frozenset({"transcription", "any"}),
}

HANDLERS: dict[str, Handler] = {
    "/v1/chat/completions": generate.chat_completions,
    "/v1/completions": generate.completions,
    "/v1/responses": generate.responses,
    "/v1/responses/{response_id}": generate.retrieve_response,
    "/v1/responses/{response_id}/cancel": generate.cancel_response,
    "/v1/messages": generate.messages,
    "/v1/messages/count_tokens": generate.count_tokens,
    "/v1/audio/transcriptions": audio.transcriptions,
    "/v1/audio/translations": audio.translations,
    "/v1/embeddings": pooling.embeddings,
    "/v2/embed": pooling.embed_v2,
    "/pooling": pooling.pooling,
    "/classify": pooling.classify,
    "/score": pooling.score,
    "/rerank": pooling.rerank,
    "/tokenize": ops.tokenize,
    "/detokenize": ops.detokenize,
    "/v1/models": ops.models,
    "/health": ops.health,
    "/ping": ops.health,
    "/version": ops.version,
    "/load": ops.load,
}

#: vLLM runs uvicorn with ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE`` = 5 s; idle connections close.
KEEP_ALIVE_TIMEOUT_S = 5

#: uvicorn's default; Sanic's own (100) drops SYNs when ~200 clients connect at once.
LISTEN_BACKLOG = 2048

_app_ids = itertools.count()


def create_app(models: list[str], task: str, *, latency_ms: float = 0,
               token_delay_ms: float = 0, tokens: int = 8,
               serving: ServingParams | None = None,
               loras: list[str] | None = None) -> DefaultSanic:
    """A Sanic app serving ``models`` for ``task`` (generate, embed, score, transcription),
    with the LoRA adapters ``loras`` of the first model loaded; with ``serving``, a
    simulated vLLM engine (generate only)."""
    if serving is not None and task != "generate":
        raise ValueError(f"a simulated engine serves task generate, not {task!r}")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}; pick one of those")
    if not models or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"models={models!r}: give at least one non-empty model name")
    app = Sanic(f"fake_engine_{task}_{next(_app_ids)}", strict_slashes=True)
    app.config.KEEP_ALIVE_TIMEOUT = KEEP_ALIVE_TIMEOUT_S
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # x-fake-hang must outlive any test
    app.config.NOISY_EXCEPTIONS = False
    defaults = Knobs(latency_ms=latency_ms, token_delay_ms=token_delay_ms, tokens=tokens)
    state = EngineState(models=tuple(models), task=task, defaults=defaults)
    for lora in loras or ():
        state.load_lora(lora)
    app.ctx.engine = state
    handlers = HANDLERS
    if serving is not None:
        handlers = {**HANDLERS, **_add_simulation(app, state, serving)}

    labels = TASK_LABELS[task]
    for route in ROUTES:
        handler = handlers.get(route.path)
        if handler is None or route.task not in labels:
            continue
        for path in route.sanic_paths:
            name = f"{route.method}{path}".replace("/", "_").replace("<", "").replace(
                ">", "").lower()
            app.add_route(_endpoint(handler, inference=route.proxied), path,
                          methods=[route.method], name=name)
    _add_introspection(app, state)
    app.exception(NotFound)(_not_found)
    app.exception(MethodNotAllowed)(_not_allowed)
    return app


def run(models: list[str], task: str, host: str = "127.0.0.1", port: int = 8000, *,
        latency_ms: float = 0, token_delay_ms: float = 0, tokens: int = 8,
        serving: ServingParams | None = None, loras: list[str] | None = None) -> None:
    """Serve a fake engine in this process until interrupted."""
    app = create_app(models, task, latency_ms=latency_ms, token_delay_ms=token_delay_ms,
                     tokens=tokens, serving=serving, loras=loras)
    app.run(host=host, port=port, single_process=True, access_log=False, motd=False,
            backlog=LISTEN_BACKLOG)


def _add_simulation(app: DefaultSanic, state: EngineState,
                    params: ServingParams) -> dict[str, Handler]:
    """The serving model, its driver (started with the server) and its extra routes; the
    catalog handlers it replaces. Imported here: only a simulated engine loads
    prometheus-client."""
    import router.fake_engine.simulated as simulated

    engine = simulated.SimulatedEngine(params, state.models[0])
    app.ctx.simulated = engine
    state.tokenizer = simulated.WORD_TOKENIZER

    async def start(_app: DefaultSanic) -> None:
        engine.start()

    async def stop(_app: DefaultSanic) -> None:
        await engine.stop()

    app.before_server_start(start)
    app.after_server_stop(stop)
    app.add_route(_endpoint(simulated.reset_prefix_cache, inference=False),
                  "/reset_prefix_cache", methods=["POST"], name="reset_prefix_cache")
    return {"/v1/chat/completions": simulated.chat_completions, "/metrics": simulated.metrics}


def _endpoint(handler: Handler, *, inference: bool) -> Endpoint:
    """Wrap a handler: log the request, apply knobs, map errors, note client aborts."""

    async def endpoint(request: Request, **_path_params: str) -> HTTPResponse | None:
        state: EngineState = request.app.ctx.engine
        entry = state.record(request)
        try:
            knobs = state.knobs_for(request, inference=inference)
        except ValueError as exc:
            err = EngineError(400, "Bad Request", f"Bad x-fake-* header: {exc}")
            return json_response(err.envelope(), 400)
        call = Call(request, state, knobs, entry)
        state.in_flight += 1
        try:
            return await _serve(call, handler)
        except asyncio.CancelledError:
            if not call.dropped:
                state.aborted.append(entry["request_id"])
            raise
        finally:
            state.in_flight -= 1

    return endpoint


async def _serve(call: Call, handler: Handler) -> HTTPResponse | None:
    knobs = call.knobs
    if knobs.hang:
        await asyncio.get_running_loop().create_future()
    if knobs.latency_ms:
        await asyncio.sleep(knobs.latency_ms / 1000)
    if knobs.status is not None:
        return _fake_status(knobs.status, knobs.body)
    try:
        return await handler(call)
    except EngineError as exc:
        body = anthropic_error(exc.type, exc.message) if exc.anthropic else exc.envelope()
        return json_response(body, exc.status)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("fake engine handler failed")
        err = EngineError(500, "InternalServerError", f"{type(exc).__name__}: {exc}")
        return json_response(err.envelope(), 500)


def _fake_status(status: int, body: str | None) -> HTTPResponse:
    if body is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        err = EngineError(status, phrase, f"x-fake-status {status}")
        return json_response(err.envelope(), status)
    try:
        orjson.loads(body)
        content_type = "application/json"
    except orjson.JSONDecodeError:
        content_type = "text/plain; charset=utf-8"
    return HTTPResponse(body.encode(), status=status, content_type=content_type)


async def _not_found(request: Request, exc: Exception) -> HTTPResponse:
    request.app.ctx.engine.record(request)
    return json_response({"detail": "Not Found"}, 404)


async def _not_allowed(request: Request, exc: Exception) -> HTTPResponse:
    request.app.ctx.engine.record(request)
    allowed = getattr(exc, "allowed_methods", None) or []
    headers = {"allow": ", ".join(sorted(allowed))} if allowed else None
    return json_response({"detail": "Method Not Allowed"}, 405, headers)


def _add_introspection(app: DefaultSanic, state: EngineState) -> None:
    async def requests(request: Request) -> HTTPResponse:
        path = request.args.get("path")
        entries = [e for e in state.requests if path is None or e["path"] == path]
        return json_response(entries)

    async def aborted(request: Request) -> HTTPResponse:
        return json_response(list(state.aborted))

    async def reset(request: Request) -> HTTPResponse:
        state.reset()
        return json_response({"status": "reset"})

    async def inject(request: Request) -> HTTPResponse:
        try:
            spec: dict[str, Any] = orjson.loads(request.body or b"{}")
            knobs = {k: v for k, v in spec.items() if k in KNOB_FIELDS}
            unknown = set(spec) - set(KNOB_FIELDS) - {"count", "paths"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}; use {list(KNOB_FIELDS)}")
            apply_knobs(Knobs(), knobs)
            paths = spec.get("paths")
            count = spec.get("count")
            state.injection = Injection(knobs, None if count is None else int(count),
                                        None if paths is None else frozenset(paths))
        except (ValueError, TypeError, AttributeError) as exc:
            return json_response({"detail": str(exc)}, 400)
        return json_response({"status": "injected"})

    def lora_name(request: Request) -> tuple[str, dict[str, Any]]:
        spec = orjson.loads(request.body or b"{}")
        name = spec.get("lora_name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise ValueError("give the adapter as {\"lora_name\": NAME}")
        return name, spec

    async def load_lora(request: Request) -> HTTPResponse:
        try:
            name, spec = lora_name(request)
            path = spec.get("lora_path")
            state.load_lora(name, path if isinstance(path, str) else None)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return json_response({"detail": str(exc)}, 400)
        return json_response({"status": "loaded", "lora_name": name})

    async def unload_lora(request: Request) -> HTTPResponse:
        try:
            name, _ = lora_name(request)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return json_response({"detail": str(exc)}, 400)
        if state.adapters.pop(name, None) is None:
            return json_response({"detail": f"no adapter {name} is loaded"}, 404)
        return json_response({"status": "unloaded", "lora_name": name})

    app.add_route(load_lora, "/_fake/load_lora", methods=["POST"], name="fake_load_lora")
    app.add_route(unload_lora, "/_fake/unload_lora", methods=["POST"], name="fake_unload_lora")
    app.add_route(requests, "/_fake/requests", methods=["GET"], name="fake_requests")
    app.add_route(aborted, "/_fake/aborted", methods=["GET"], name="fake_aborted")
    app.add_route(reset, "/_fake/reset", methods=["POST"], name="fake_reset")
    app.add_route(inject, "/_fake/inject", methods=["POST"], name="fake_inject")
