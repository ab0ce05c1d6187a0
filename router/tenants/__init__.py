"""Tenants: API keys (stored as hashes), per-key model access and rate limits.

Wiring, per request: ``Authenticator.authenticate`` → ``Tenant.can_use`` (else the
router's 404 ``ModelNotFound``) → ``Limiter.admit`` → forward → ``Limiter.record``.
"""

from router.tenants.config import (
    AdminKeySpec,
    AuthConfig,
    KeySpec,
    Limits,
    ResolvedAuth,
    hash_key,
    new_key,
    resolve_auth,
)
from router.tenants.errors import AdminKeyRequired, InvalidApiKey, RateLimited
from router.tenants.keys import Authenticator, Tenant
from router.tenants.limits import (
    Admission,
    Limiter,
    LimiterStatus,
    LocalLimiter,
    build_limiter,
    estimate_tokens,
    reported_tokens,
)

__all__ = [
    "AdminKeyRequired",
    "AdminKeySpec",
    "Admission",
    "AuthConfig",
    "Authenticator",
    "InvalidApiKey",
    "KeySpec",
    "Limiter",
    "LimiterStatus",
    "Limits",
    "LocalLimiter",
    "RateLimited",
    "ResolvedAuth",
    "Tenant",
    "build_limiter",
    "estimate_tokens",
    "hash_key",
    "new_key",
    "reported_tokens",
    "resolve_auth",
]
