"""OpenTelemetry tracing: a sink that opens each request's spans and ends them.

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
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from router.record import Record, Target

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("http/protobuf", "grpc")


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
        from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc

        return grpc.OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http

    return http.OTLPSpanExporter()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("routeyard")
    except PackageNotFoundError:
        return "0"


class Tracing:
    """The tracer of one worker: a sink that opens each request's spans and ends them."""

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

    def close(self) -> None:
        """Export what is queued and stop (at worker stop)."""
        self.provider.shutdown()

    def start(self, record: Record) -> None:
        headers = record.headers
        wall0 = time.time_ns() - int((perf_counter() - record.t0) * 1e9)
        attrs: dict[str, Any] = {
            "http.request.method": record.method,
            "url.path": record.path,
            "url.scheme": record.scheme,
            "http.route": record.path,
            "gen_ai.operation.name": record.operation,
            "routeyard.endpoint_group": record.group,
            "routeyard.request_id": record.request_id,
        }
        if record.client_ip is not None:
            attrs["client.address"] = record.client_ip
        agent = headers.get("user-agent")
        if agent:
            attrs["user_agent.original"] = agent
        span = self.tracer.start_span(
            f"{record.method} {record.path}", context=self.propagator.extract(headers),
            kind=self.kind.SERVER, attributes=attrs, start_time=wall0)
        record.trace = RequestTrace(self, record, span)

    def finish(self, record: Record) -> None:
        trace = record.trace
        if isinstance(trace, RequestTrace):
            trace.finish()


class RequestTrace:
    """The spans of one request: SERVER, its "route" child, and the current attempt's
    CLIENT span. Without sampling only the SERVER span exists (its context still goes to
    the backend, unsampled)."""

    __slots__ = ("client_span", "parent", "record", "route_span", "span", "tracing")

    def __init__(self, tracing: Tracing, record: Record, span: Span) -> None:
        self.tracing = tracing
        self.record = record
        self.span = span
        self.parent: Any = None
        self.route_span: Span | None = None
        self.client_span: Span | None = None
        if span.is_recording():
            self.parent = tracing.set_span_in_context(span)
            self.route_span = tracing.tracer.start_span("route", context=self.parent)

    def attempt(self, target: Target, number: int) -> str | None:
        """Start the CLIENT span of one attempt; its traceparent header line for the backend."""
        if self.parent is None:
            return _traceparent(self.span)
        record = self.record
        route = self.route_span
        if route is not None:
            self.route_span = None
            route.set_attributes(_route_attributes(record))
            route.end()
        origin = target.origin
        model = record.backend_model or record.model or ""
        attrs: dict[str, Any] = {
            "http.request.method": record.method,
            "server.address": origin.host,
            "server.port": origin.port,
            "url.full": f"{origin.scheme}://{origin.host_header.decode()}{origin.base_path}"
                        f"{record.path}",
            "gen_ai.operation.name": record.operation,
            "gen_ai.request.model": model,
            "routeyard.backend": target.key,
        }
        if number:
            attrs["http.request.resend_count"] = number
        span = self.tracing.tracer.start_span(
            f"{record.operation} {model}", context=self.parent,
            kind=self.tracing.kind.CLIENT, attributes=attrs)
        self.client_span = span
        return _traceparent(span)

    def trace_id(self) -> str | None:
        trace_id = self.span.get_span_context().trace_id
        return f"{trace_id:032x}" if trace_id else None

    def attempt_ended(self, status: int, error: str | None) -> None:
        span = self.client_span
        self.client_span = None
        if span is None:
            return
        if span.is_recording():
            if status:
                span.set_attribute("http.response.status_code", status)
            error = error or (str(status) if status >= 400 else None)
            if error:
                span.set_attribute("error.type", error)
                span.set_status(self.tracing.error)
            _usage(span, self.record)
        span.end()

    def finish(self) -> None:
        record = self.record
        outcome = record.outcome
        error = self.tracing.error
        route = self.route_span
        if route is not None:  # the request ended before any backend was chosen
            self.route_span = None
            if route.is_recording():
                route.set_attributes(_route_attributes(record))
                if record.status >= 400:
                    route.set_attribute("error.type", record.error or str(record.status))
                    route.set_status(error)
            route.end()
        self.attempt_ended(outcome.attempt_status, outcome.attempt_error)
        span = self.span
        if span.is_recording():
            attrs: dict[str, Any] = {
                "http.response.status_code": record.status,
                "routeyard.retries": outcome.retries,
            }
            if record.model is not None:
                attrs["gen_ai.request.model"] = record.model
            if record.key_id is not None:
                attrs["routeyard.key.id"] = record.key_id
            if outcome.backend:
                attrs["routeyard.backend"] = outcome.backend
            if outcome.t_first:
                attrs["routeyard.time_to_first_byte"] = outcome.t_first - record.t0
            if record.status >= 500 or record.error is not None:
                attrs["error.type"] = record.error or str(record.status)
            span.set_attributes(attrs)
            _usage(span, record)
            if record.status >= 500:
                span.set_status(error)
        span.end()


def _route_attributes(record: Record) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    outcome = record.outcome
    if record.model is not None:
        attrs["gen_ai.request.model"] = record.model
    if outcome.backend:
        attrs["routeyard.backend"] = outcome.backend
    if outcome.queue_wait:
        attrs["routeyard.queue_wait"] = outcome.queue_wait
    return attrs


def _usage(span: Span, record: Record) -> None:
    outcome = record.outcome
    if outcome.input_tokens is not None:
        span.set_attribute("gen_ai.usage.input_tokens", outcome.input_tokens)
    if outcome.output_tokens is not None:
        span.set_attribute("gen_ai.usage.output_tokens", outcome.output_tokens)


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
