"""Tenants: API keys (stored as hashes), per-key model access and rate limits.

Wiring, per request: ``Authenticator.authenticate`` → ``Tenant.can_use`` (else the
router's 404 ``ModelNotFound``) → ``Limiter.admit`` → forward → ``Limiter.record``.

The names below are loaded on first use (PEP 562): ``router.tenants.config``, which the
routes file's ``auth:`` block needs, comes without the limiters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from router import lazy

if TYPE_CHECKING:
    from router.tenants.buckets import Admission, LimiterStatus, LocalLimiter
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
    from router.tenants.limits import Limiter, build_limiter, estimate_tokens, reported_tokens

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

#: Exported name → the module that defines it.
_EXPORTS = {
    "AdminKeyRequired": "router.tenants.errors",
    "AdminKeySpec": "router.tenants.config",
    "Admission": "router.tenants.buckets",
    "AuthConfig": "router.tenants.config",
    "Authenticator": "router.tenants.keys",
    "InvalidApiKey": "router.tenants.errors",
    "KeySpec": "router.tenants.config",
    "Limiter": "router.tenants.limits",
    "LimiterStatus": "router.tenants.buckets",
    "Limits": "router.tenants.config",
    "LocalLimiter": "router.tenants.buckets",
    "RateLimited": "router.tenants.errors",
    "ResolvedAuth": "router.tenants.config",
    "Tenant": "router.tenants.keys",
    "build_limiter": "router.tenants.limits",
    "estimate_tokens": "router.tenants.limits",
    "hash_key": "router.tenants.config",
    "new_key": "router.tenants.config",
    "reported_tokens": "router.tenants.limits",
    "resolve_auth": "router.tenants.config",
}


__getattr__, __dir__ = lazy.exports(__name__, _EXPORTS, __all__)
