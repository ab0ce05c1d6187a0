"""Errors the router itself makes, and the one OpenAI-shaped envelope they share.

    RouterError(status, type, code, message, param)
    ├── ClientError        the request is wrong or must wait: 400, 403, 404, 405, 413, 429
    ├── UpstreamError      the backend could not answer: 502, 503, 504
    └── InternalError      a bug in the router: 500

Every router-made error leaves as ``{"error": {"message", "type", "param", "code"}}``,
which the OpenAI SDK parses into its exception classes. Errors from a backend are not
wrapped: they pass through with the backend's own status and body.
"""

from __future__ import annotations

import orjson


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

    def to_envelope(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.to_envelope())


class ClientError(RouterError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BadRequest(ClientError):
    """Raised when the body is not JSON, not an object, or lacks a usable ``model``."""


class ModelNotFound(ClientError):
    """Raised when no model of that name is configured."""

    status = 404
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model")


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
    """Raised when the backend's answer is not valid HTTP/1.1."""

    code = "backend_protocol_error"


class InternalError(RouterError):
    """Raised for a bug in the router; the log has the details, the client does not."""
