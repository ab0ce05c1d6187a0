"""Errors of the tenants layer, in the router's OpenAI-shaped envelope.

    router.errors.ClientError
    ├── InvalidApiKey       401 invalid_api_key: no key, an unknown key, or two different keys
    ├── AdminKeyRequired    403 admin_key_required: a valid key that is not an admin key
    └── RateLimited         429 rate_limit_exceeded, with Retry-After and x-ratelimit-* headers

A model the key may not use is answered with the router's own ``ModelNotFound`` (404), the
same answer as for a model that does not exist, so a key cannot probe for other models.
Messages never echo the presented key, not even masked.
"""

from __future__ import annotations

from router.errors import ClientError


class InvalidApiKey(ClientError):
    """Raised when the request has no API key, an unknown one, or two that disagree."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"www-authenticate": 'Bearer realm="routeyard"'})


class AdminKeyRequired(ClientError):
    """Raised when a valid, non-admin key calls ``/admin/*``."""

    status = 403
    type = "permission_error"
    code = "admin_key_required"

    def __init__(self, key_id: str | None = None) -> None:
        super().__init__("This endpoint needs an admin key (auth.admin_keys in routes.yaml).")
        #: The id of the (valid, non-admin) key presented: logs and metrics name it.
        self.key_id = key_id


class RateLimited(ClientError):
    """Raised when admitting the request would take a key over one of its limits.

    ``type`` is ``requests`` or ``tokens``, as OpenAI's own 429s say which limit was hit.
    """

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, kind: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.type = kind
