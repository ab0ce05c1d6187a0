"""OpenTelemetry tracing, and the record of one proxied request that feeds every signal.

**When tracing is on** (``tracing_wanted``): ``ROUTEYARD_TRACING=true|false`` decides if
set; otherwise ``OTEL_SDK_DISABLED=true`` turns it off, an ``OTEL_TRACES_EXPORTER`` other
than ``none`` turns it on, and so does ``OTEL_SDK_DISABLED=false``; with none of them set
it is off. Off means no tracer exists: no span objects, no context work per request.

**When on**, each worker builds a ``TracerProvider`` with one ``BatchSpanProcessor`` per
exporter in ``OTEL_TRACES_EXPORTER`` (``otlp``, the default when tracing is forced on;
``console``; ``none``). OTLP speaks ``http/protobuf`` (default) or ``grpc`` after
``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``; endpoint, headers, timeouts, sampler, resource
and batching come from the standard ``OTEL_*`` variables, read by the SDK itself. Spans
leave in batches from the processor's thread, never on the request path. The spans of one
request::

    SERVER   "POST /v1/chat/completions"  continues the incoming W3C traceparent
    ├── INTERNAL "route"                  model lookup, allowlist, balancer, queue wait
    └── CLIENT   "chat <model>"           one per attempt; sent to the backend as traceparent

Spans get explicit parents and times; nothing is attached to contextvars.

**The exchange**: one ``Exchange`` per proxied request, filled in by the listener and the
relay, read once at the end by metrics, tracing and the access log. It exists only when at
least one of them is on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

import orjson
from sanic.exceptions import SanicException

from router.errors import RouterError

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from sanic import Request

    from router.accesslog import AccessLog
    from router.cluster import Endpoint
    from router.metrics import Metrics, ModelSeries
    from router.snapshot import ModelEntry

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("http/protobuf", "grpc")
#: Endpoint group → ``gen_ai.operation.name`` (GenAI semantic conventions); other groups
#: use their own name, as the conventions ask for operations they do not list.
GEN_AI_OPERATIONS = {
    "chat": "chat", "responses": "chat", "messages": "chat", "cohere": "chat",
    "completions": "text_completion", "generate": "text_completion",
    "embeddings": "embeddings",
}
_USAGE = b'"usage"'
#: A non-streamed JSON body is searched whole for usage up to this size, else its tail.
USAGE_SCAN = 64 * 1024


def _flag(value: str | None) -> bool | None:
    value = (value or "").strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    return None


def tracing_wanted(env: Mapping[str, str], setting: bool | None) -> bool:
    """The rule in the module docstring; ``setting`` is ``ROUTEYARD_TRACING``."""
    if setting is not None:
        return setting
    disabled = _flag(env.get("OTEL_SDK_DISABLED"))
    if disabled:
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return disabled is False


def exporter_names(env: Mapping[str, str]) -> list[str]:
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip() or "otlp"
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER={raw!r}: routeyard knows {', '.join(EXPORTERS)}; "
            f"not {', '.join(unknown)}. Send spans to an OpenTelemetry Collector with otlp "
            "and export from there.")
    return [n for n in names if n != "none"]


def otlp_protocol(env: Mapping[str, str]) -> str:
    key = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" if env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
           else "OTEL_EXPORTER_OTLP_PROTOCOL")
    value = (env.get(key) or "http/protobuf").strip().lower()
    if value not in PROTOCOLS:
        raise ValueError(f"{key}={value!r}: use http/protobuf (port 4318) or grpc (port 4317).")
    return value


def check(env: Mapping[str, str], setting: bool | None) -> None:
    """Raise ``ValueError`` for tracing settings a worker would refuse (run before forking)."""
    if tracing_wanted(env, setting) and "otlp" in exporter_names(env):
        otlp_protocol(env)


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if otlp_protocol(env) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("routeyard")
    except PackageNotFoundError:
        return "0"


class Tracing:
    """The tracer of one worker, and the spans of its requests."""

    def __init__(self, env: Mapping[str, str]) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get(
            "OTEL_RESOURCE_ATTRIBUTES", "")
        resource = Resource.create({} if named else {"service.name": "routeyard"})
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.exporters = exporter_names(env)
        for name in self.exporters:
            self.provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
        self.tracer = self.provider.get_tracer("routeyard", _version())
        self.propagator = TraceContextTextMapPropagator()
        self.set_span_in_context = trace.set_span_in_context
        self.kind = trace.SpanKind
        self.error = trace.Status(trace.StatusCode.ERROR)

    def shutdown(self) -> None:
        """Export what is queued and stop (at worker stop)."""
        self.provider.shutdown()

    # -- the spans of one exchange -------------------------------------------------------
    def start(self, ex: Exchange) -> None:
        request = ex.request
        headers = request.headers
        ex.wall0 = time.time_ns() - int((perf_counter() - ex.t0) * 1e9)
        attrs: dict[str, Any] = {
            "http.request.method": request.method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "http.route": request.path,
            "gen_ai.operation.name": ex.operation,
            "routeyard.endpoint_group": ex.group,
            "routeyard.request_id": ex.request_id,
        }
        if request.conn_info is not None:
            attrs["client.address"] = request.conn_info.client_ip
        agent = headers.get("user-agent")
        if agent:
            attrs["user_agent.original"] = agent
        span = self.tracer.start_span(
            f"{request.method} {request.path}", context=self.propagator.extract(headers),
            kind=self.kind.SERVER, attributes=attrs, start_time=ex.wall0)
        ex.span = span
        if span.is_recording():
            ex.parent = self.set_span_in_context(span)
            ex.route_span = self.tracer.start_span("route", context=ex.parent)
        # else not sampled: no child spans; the backend gets this span's context, unsampled

    def attempt(self, ex: Exchange, endpoint: Endpoint, attempt: int) -> str | None:
        """Start the CLIENT span of one attempt; its traceparent header line for the backend."""
        if ex.parent is None:
            return _traceparent(ex.span)  # type: ignore[arg-type]
        route = ex.route_span
        if route is not None:
            ex.route_span = None
            route.set_attributes(self._route_attributes(ex))
            route.end()
        origin = endpoint.origin
        model = ex.backend_model or ex.model or ""
        attrs: dict[str, Any] = {
            "http.request.method": ex.request.method,
            "server.address": origin.host,
            "server.port": origin.port,
            "url.full": f"{origin.scheme}://{origin.host_header.decode()}{origin.base_path}"
                        f"{ex.request.path}",
            "gen_ai.operation.name": ex.operation,
            "gen_ai.request.model": model,
            "routeyard.backend": endpoint.key,
        }
        if attempt:
            attrs["http.request.resend_count"] = attempt
        span = self.tracer.start_span(f"{ex.operation} {model}", context=ex.parent,
                                      kind=self.kind.CLIENT, attributes=attrs)
        ex.client_span = span
        return _traceparent(span)

    def end_attempt(self, ex: Exchange) -> None:
        span = ex.client_span
        ex.client_span = None
        if span is None:
            return
        if span.is_recording():
            status = ex.attempt_status
            if status:
                span.set_attribute("http.response.status_code", status)
            error = ex.attempt_error or (str(status) if status >= 400 else None)
            if error:
                span.set_attribute("error.type", error)
                span.set_status(self.error)
            self._usage(span, ex)
        span.end()

    def finish(self, ex: Exchange) -> None:
        span = ex.span
        if span is None:
            return
        failed = ex.status >= 500 or ex.error is not None
        route = ex.route_span
        if route is not None:  # the request ended before any backend was chosen
            ex.route_span = None
            if route.is_recording():
                route.set_attributes(self._route_attributes(ex))
                if ex.status >= 400:
                    route.set_attribute("error.type", ex.error or str(ex.status))
                    route.set_status(self.error)
            route.end()
        self.end_attempt(ex)
        if span.is_recording():
            attrs: dict[str, Any] = {
                "http.response.status_code": ex.status,
                "routeyard.retries": ex.retries,
            }
            if ex.model is not None:
                attrs["gen_ai.request.model"] = ex.model
            if ex.backend:
                attrs["routeyard.backend"] = ex.backend
            if ex.t_first:
                attrs["routeyard.time_to_first_byte"] = ex.t_first - ex.t0
            if failed:
                attrs["error.type"] = ex.error or str(ex.status)
            span.set_attributes(attrs)
            self._usage(span, ex)
            if ex.status >= 500:
                span.set_status(self.error)
        span.end()

    @staticmethod
    def _route_attributes(ex: Exchange) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        if ex.model is not None:
            attrs["gen_ai.request.model"] = ex.model
        if ex.backend:
            attrs["routeyard.backend"] = ex.backend
        if ex.queue_wait:
            attrs["routeyard.queue_wait"] = ex.queue_wait
        return attrs

    @staticmethod
    def _usage(span: Span, ex: Exchange) -> None:
        if ex.input_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", ex.input_tokens)
        if ex.output_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", ex.output_tokens)


def _traceparent(span: Span) -> str | None:
    """The W3C header lines naming ``span`` as the parent, or None for a no-op tracer
    (``OTEL_SDK_DISABLED=true``): then the incoming ones pass on."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    header = f"traceparent: 00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}\r\n"
    if ctx.trace_state:
        header += f"tracestate: {ctx.trace_state.to_header()}\r\n"
    return header


class Observer:
    """The signals of one worker; each is None when switched off."""

    def __init__(self, tracing: Tracing | None, metrics: Metrics | None,
                 access: AccessLog | None) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.access = access

    def close(self) -> None:
        if self.access is not None:
            self.access.close()
        if self.tracing is not None:
            self.tracing.shutdown()
        if self.metrics is not None:
            self.metrics.close()


class Exchange:
    """What one proxied request did, filled in along the way and read once at the end."""

    __slots__ = (
        "attempt_error", "attempt_status", "backend", "backend_model", "bytes_in", "bytes_out",
        "client_span", "error", "group", "input_tokens", "label_model", "model",
        "obs", "operation", "output_tokens", "parent", "queue_wait", "reads_usage", "request",
        "request_id", "retries", "route_span", "span", "status", "t0", "t_first", "t_sent",
        "wall0",
    )

    def __init__(self, obs: Observer, request: Request, group: str, operation: str,
                 request_id: str, reads_usage: bool = True) -> None:
        self.obs = obs
        #: False for an answer whose tokens were counted when it was made (a stored one).
        self.reads_usage = reads_usage
        self.request = request
        self.group = group
        self.operation = operation
        self.request_id = request_id
        # Sanic stamps the end of the request head; the body was read after it.
        self.t0: float = getattr(request.stream, "perft0", 0.0) or perf_counter()
        self.model: str | None = None  # the name the client asked for
        self.label_model = ""  # the configured model, once found (a metric label)
        self.backend_model: str | None = None
        self.backend = ""
        self.status = 0
        self.error: str | None = None
        self.t_sent = 0.0
        self.t_first = 0.0
        self.queue_wait = 0.0
        self.retries = 0
        self.bytes_in = len(request.body)
        self.bytes_out = 0
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.attempt_status = 0
        self.attempt_error: str | None = None
        self.span: Span | None = None
        self.route_span: Span | None = None
        self.client_span: Span | None = None
        self.parent: Any = None
        self.wall0 = 0
        if obs.tracing is not None:
            obs.tracing.start(self)

    # -- the listener --------------------------------------------------------------------
    def matched(self, name: str, entry: ModelEntry | None) -> None:
        """The model the client named, and its entry if one is configured."""
        self.model = name
        if entry is not None:
            self.label_model = entry.name
            self.backend_model = entry.backend_model

    # -- the relay -----------------------------------------------------------------------
    def model_series(self) -> ModelSeries | None:
        metrics = self.obs.metrics
        return metrics.model(self.label_model) if metrics is not None else None

    def chosen(self, endpoint: Endpoint, attempt: int) -> str | None:
        """An endpoint was acquired for attempt ``attempt`` (0 first); returns the trace
        header lines for the backend, or None to pass the incoming ones on."""
        self.backend = endpoint.key
        self.retries = attempt
        self.attempt_status = 0
        self.attempt_error = None
        tracing = self.obs.tracing
        return tracing.attempt(self, endpoint, attempt) if tracing is not None else None

    def attempt_failed(self, error: str) -> None:
        self.attempt_error = error

    def end_attempt(self) -> None:
        """The endpoint of this attempt was released: end its CLIENT span."""
        if self.obs.tracing is not None:
            self.obs.tracing.end_attempt(self)

    def retrying(self) -> None:
        metrics = self.obs.metrics
        if metrics is not None:
            metrics.retries.labels(self.label_model, self.backend).inc()

    def body(self, data: bytes, content_type: str | None) -> None:
        """A response body read whole."""
        self.t_first = perf_counter()
        self.bytes_out = len(data)
        if content_type is not None and ("json" in content_type or "event-stream" in content_type):
            self._usage(data if len(data) <= USAGE_SCAN else data[-4096:])

    def chunk(self, data: bytes) -> None:
        """One relayed chunk of a streamed body."""
        if not self.t_first:
            self.t_first = perf_counter()
        self.bytes_out += len(data)
        if _USAGE in data:
            self._usage(data)

    def _usage(self, data: bytes) -> None:
        if not self.reads_usage:
            return
        found = _compact_usage(data) or usage_of(data)
        if found is not None:
            if found[0] is not None:
                self.input_tokens = found[0]
            if found[1] is not None:
                self.output_tokens = found[1]

    # -- the end -------------------------------------------------------------------------
    def finish(self, exc: BaseException | None) -> None:
        end = perf_counter()
        if exc is not None:
            self._failed(exc)
        obs = self.obs
        if obs.metrics is not None:
            obs.metrics.record(self, end)
        if obs.tracing is not None:
            obs.tracing.finish(self)
        if obs.access is not None:
            obs.access.record(self, end - self.t0)

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, RouterError):
            self.status = exc.status
            self.error = exc.code or exc.type
        elif isinstance(exc, asyncio.CancelledError):
            self.error = "client_disconnected"
            if not self.status:
                self.status = 499  # nginx's "client closed request"
        else:
            status = getattr(exc, "status_code", 500) if isinstance(exc, SanicException) else 500
            self.status = status
            self.error = type(exc).__name__


def _compact_usage(data: bytes) -> tuple[int, int] | None:
    """The common case in one step: the last usage object is compact OpenAI JSON without
    nested objects, as vLLM writes it; anything else goes to ``usage_of``."""
    i = data.rfind(b'"usage":{')
    if i < 0:
        return None
    end = data.find(b"}", i)
    try:
        obj = orjson.loads(data[i + 8:end + 1])
    except orjson.JSONDecodeError:
        return None
    prompt = obj.get("prompt_tokens")
    completion = obj.get("completion_tokens")
    if type(prompt) is int and type(completion) is int:
        return prompt, completion
    return None


def usage_of(data: bytes) -> tuple[int | None, int | None] | None:
    """(input, output) tokens from the ``"usage": {...}`` objects in ``data``, if any.

    Reads OpenAI's ``prompt_tokens``/``completion_tokens`` and the Responses and Anthropic
    ``input_tokens``/``output_tokens``. Objects are read from the last one back until both
    counts are known (Anthropic streams send input tokens first, output tokens last). Only
    usage objects are parsed, never the body."""
    prompt: int | None = None
    completion: int | None = None
    i = data.rfind(_USAGE)
    for _ in range(8):
        if i < 0:
            break
        found = _usage_at(data, i + len(_USAGE))
        if found is not None:
            prompt = found[0] if prompt is None else prompt
            completion = found[1] if completion is None else completion
            if prompt is not None and completion is not None:
                break
        i = data.rfind(_USAGE, 0, i)
    if prompt is None and completion is None:
        return None
    return prompt, completion


def _usage_at(data: bytes, j: int) -> tuple[int | None, int | None] | None:
    """The tokens of the object after ``"usage"`` ending at ``j``: the ``}`` after it are
    tried in turn until orjson accepts the slice (usage objects nest one level at most)."""
    if data[j:j + 2] == b":{":  # compact JSON, as vLLM writes it
        start = j + 1
    else:
        j = _skip_space(data, j)
        if data[j:j + 1] != b":":
            return None
        start = _skip_space(data, j + 1)
        if data[start:start + 1] != b"{":
            return None
    end = start
    for _ in range(5):
        end = data.find(b"}", end + 1)
        if end < 0:
            return None
        try:
            return _tokens(orjson.loads(data[start:end + 1]))
        except orjson.JSONDecodeError:
            continue
    return None


def _skip_space(data: bytes, i: int) -> int:
    while data[i:i + 1] in (b" ", b"\t", b"\r", b"\n"):
        i += 1
    return i


def _tokens(obj: Any) -> tuple[int | None, int | None] | None:
    if not isinstance(obj, dict):
        return None
    prompt = obj.get("prompt_tokens", obj.get("input_tokens"))
    completion = obj.get("completion_tokens", obj.get("output_tokens"))
    prompt = prompt if isinstance(prompt, int) else None
    completion = completion if isinstance(completion, int) else None
    if prompt is None and completion is None:
        return None
    return prompt, completion
