"""Errors the router itself makes, and the one OpenAI-shaped envelope they share.

    RouterError(status, type, code, message, param)
    ├── ClientError        the request is wrong or must wait: 400, 403, 404, 405, 413, 429
    ├── UpstreamError      the backend could not answer: 502, 503, 504
    └── InternalError      a bug in the router: 500

Every router-made error leaves as ``{"error": {"message", "type", "param", "code"}}``,
which the OpenAI SDK parses into its exception classes, except on routes whose clients
expect another envelope (the catalog's ``errors``): Anthropic's ``{"type": "error",
"error": {"type", "message"}}`` on ``/v1/messages``, Cohere's ``{"message", "id"}`` on
``/cohere/*``, as vLLM itself answers there. Errors from a backend are not wrapped: they
pass through with the backend's own status and body.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from router.catalog import ErrorStyle, Route, StreamFormat

#: Anthropic's error types by status (docs.anthropic.com, "HTTP errors"); other 4xx are
#: ``invalid_request_error``, other 5xx ``api_error``. 503 keeps its status: Anthropic's
#: own overload status is 529, which no HTTP client here would know.
ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 503: "overloaded_error", 504: "timeout_error",
}


class RouterError(Exception):
    """Base class: carries everything needed to answer the client."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def to_envelope(self) -> dict[str, object]:
        """OpenAI's envelope (``envelope`` in the style of the route)."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def envelope(self, style: ErrorStyle, request_id: str | None = None) -> dict[str, object]:
        """The error as the clients of ``style`` expect it."""
        if style is ErrorStyle.ANTHROPIC:
            kind = ANTHROPIC_TYPES.get(self.status) or (
                "invalid_request_error" if self.status < 500 else "api_error")
            body: dict[str, object] = {"type": "error",
                                       "error": {"type": kind, "message": self.message}}
            if request_id is not None:
                body["request_id"] = _printable(request_id)
            return body
        if style is ErrorStyle.COHERE:
            return {"message": self.message,
                    "id": None if request_id is None else _printable(request_id)}
        return self.to_envelope()

    def body(self, style: ErrorStyle = ErrorStyle.OPENAI, request_id: str | None = None) -> bytes:
        return orjson.dumps(self.envelope(style, request_id))


def _printable(text: str) -> str:
    """``text`` as JSON can carry it: a client's header bytes that were not UTF-8 arrive
    as lone surrogates (Sanic decodes with surrogateescape), which JSON cannot hold."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class ClientError(RouterError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BadRequest(ClientError):
    """Raised when the body is not JSON, not an object, or lacks a usable ``model``."""


#: How much of a client's text (a model name, a custom_id) an error message quotes.
SHOWN_CHARS = 256


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` as an error message quotes it: its first ``limit`` characters and "…"
    when longer, so a client cannot make the router echo (and log) a megabyte."""
    return text if len(text) <= limit else text[:limit] + "…"


class ModelNotFound(ClientError):
    """Raised when no model of that name is configured (the name is quoted ``shown``)."""

    status = 404
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{shown(model)}` does not exist.", param="model")


class EndpointNotEnabled(ClientError):
    """Raised when the model exists but the endpoint's group is not in its allowlist."""

    status = 403
    type = "permission_error"
    code = "endpoint_not_enabled"

    def __init__(self, model: str, group: str, path: str, enabled: list[str]) -> None:
        super().__init__(
            f"The endpoint {path} (group `{group}`) is not enabled for model `{model}`. "
            f"Enabled groups: {', '.join(enabled) or 'none'}.",
            param="model",
        )


class ResponseNotFound(ClientError):
    """Raised for a stored-response id when no model this client may use serves the
    Responses API (vLLM's own wording and fields for an unknown id)."""

    status = 404
    code = "response_not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(f"Response with id '{response_id}' not found.", param="response_id")


class RouteNotFound(ClientError):
    """Raised for a path that is not in the catalog."""

    status = 404
    code = "not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class QueueTimeout(ClientError):
    """Raised when every backend of a model stayed at capacity for the queue's timeout."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, model: str, why: str, retry_after: float) -> None:
        super().__init__(
            f"Model `{model}` is at capacity ({why}); retry after a short wait.",
            headers={"retry-after": str(max(1, round(retry_after)))},
        )


class UpstreamError(RouterError):
    status = 502
    type = "server_error"
    code = "backend_error"
    #: Whether a retry on another backend is safe and useful (nothing reached the client).
    retryable = False


class NoHealthyBackend(UpstreamError):
    """Raised when a model has no backend that is up (healthy and not ejected)."""

    status = 503
    code = "no_healthy_backend"

    def __init__(self, model: str, retry_after: int) -> None:
        super().__init__(
            f"Model `{model}` has no healthy backend right now.",
            headers={"retry-after": str(retry_after)},
        )


class BackendUnavailable(UpstreamError):
    """Raised when the backend refuses or drops the connection before answering."""

    code = "backend_unavailable"
    retryable = True


class BackendTimeout(UpstreamError):
    """Raised when the backend does not answer (or goes silent) within its timeout."""

    status = 504
    code = "backend_timeout"


class ConnectTimeout(BackendTimeout):
    """Raised when the TCP connection is not up within the connect timeout."""

    retryable = True


class BackendProtocolError(UpstreamError):
    """Raised when the backend's answer is not valid HTTP/1.1 (or is HTTP the router does
    not relay: a switch of protocols). Before any byte reached the client, another backend
    may well answer: retried like a dropped connection."""

    code = "backend_protocol_error"
    retryable = True


class BackendHeadTooLarge(BackendProtocolError):
    """Raised when the backend's response head is over the router's bounds
    (``ROUTEYARD_UPSTREAM_MAX_HEADER_BYTES``, ``ROUTEYARD_UPSTREAM_MAX_HEADERS``)."""


class InternalError(RouterError):
    """Raised for a bug in the router; the log has the details, the client does not."""


#: The last event of a stream that broke off after its headers: (error, request id) → bytes.
StreamError = Callable[[RouterError, str], bytes]


def stream_error_event(route: Route) -> StreamError | None:
    """How ``route``'s streams end when the backend breaks off mid-way, in the route's own
    framing: ``data: <error>`` then ``data: [DONE]`` for OpenAI-style streams, Anthropic's
    ``event: error``. None (Responses streams, whose events carry sequence numbers the
    router cannot know): the connection is cut, so the client sees a truncated stream."""
    style = route.errors
    if route.stream is StreamFormat.DATA_DONE:
        return lambda exc, rid: b"data: " + exc.body(style, rid) + b"\n\ndata: [DONE]\n\n"
    if route.stream is StreamFormat.EVENT_DATA and style is ErrorStyle.ANTHROPIC:
        return lambda exc, rid: b"event: error\ndata: " + exc.body(style, rid) + b"\n\n"
    return None
