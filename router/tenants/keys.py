"""Who is calling: an API key from the request headers → the ``Tenant`` it belongs to.

Everything is precomputed when a config is loaded: a dict from each key's SHA-256 digest
to its tenant, and one compiled pattern per key for its models. A request costs one
SHA-256 of the presented key and one dict lookup.

Timing: the presented key is never compared with a stored secret; only its SHA-256 is
looked up. The dict first compares CPython's keyed (per-process random SipHash) hash of
the digest and touches the digest bytes only on a hash match, and whatever timing could
still leak is about SHA-256 outputs, from which no key can be recovered. The match is then
confirmed with ``hmac.compare_digest``. A linear scan of every key with ``compare_digest``
would add no safety and cost ~60 µs per request at 1,000 keys.
"""

from __future__ import annotations

import fnmatch
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from router.tenants.config import (
    AuthConfig,
    Limits,
    ResolvedAuth,
    ResolvedKey,
    key_digest,
    resolve_auth,
)
from router.tenants.errors import AdminKeyRequired, InvalidApiKey


@dataclass(frozen=True, slots=True, eq=False)
class Tenant:
    """An authenticated key: its ids, its models and its limits. Holds no secret."""

    key_id: str
    tenant_id: str
    admin: bool
    limits: Limits
    exact_models: frozenset[str]
    model_pattern: re.Pattern[str] | None
    model_limits: tuple[tuple[re.Pattern[str], Limits], ...]

    @classmethod
    def from_resolved(cls, key: ResolvedKey) -> Tenant:
        exact = frozenset(m for m in key.models if not _is_glob(m))
        globs = [m for m in key.models if _is_glob(m)]
        return cls(
            key_id=key.id,
            tenant_id=key.tenant,
            admin=key.admin,
            limits=key.limits,
            exact_models=exact,
            model_pattern=_compile(globs) if globs else None,
            model_limits=tuple((_compile([p]), lim) for p, lim in key.model_limits),
        )

    def can_use(self, model: str) -> bool:
        if model in self.exact_models:
            return True
        return self.model_pattern is not None and self.model_pattern.match(model) is not None

    def limits_for(self, model: str) -> Limits | None:
        """The per-key-and-model limits of the first ``model_limits`` entry matching."""
        for pattern, limits in self.model_limits:
            if pattern.match(model):
                return limits
        return None


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def _compile(patterns: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class Authenticator:
    """Maps request headers to a ``Tenant``; built once per config load, then read-only."""

    def __init__(self, auth: ResolvedAuth) -> None:
        self.fingerprint = auth.fingerprint
        self.watch_paths = auth.watch_paths
        #: ``auth.public_metrics``: ``/metrics`` open to anyone, not only admin keys.
        self.public_metrics = auth.public_metrics
        self._by_digest: dict[bytes, tuple[bytes, Tenant]] = {}
        self.tenants: dict[str, Tenant] = {}
        for key in auth.keys:
            tenant = Tenant.from_resolved(key)
            self.tenants[key.id] = tenant
            for digest in key.digests:
                self._by_digest[digest] = (digest, tenant)

    @classmethod
    def from_config(
        cls,
        config: AuthConfig,
        base_dir: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Authenticator:
        return cls(resolve_auth(config, base_dir, environ))

    def authenticate(self, authorization: str | None, x_api_key: str | None) -> Tenant:
        """The key's tenant; ``InvalidApiKey`` (401) if the key is missing or unknown."""
        key = _presented_key(authorization, x_api_key)
        digest = key_digest(key)
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry[0], digest):
            raise InvalidApiKey("Invalid API key. Check the key you sent, or ask for a new one.")
        return entry[1]

    def authenticate_admin(self, authorization: str | None, x_api_key: str | None) -> Tenant:
        """Like ``authenticate``, and ``AdminKeyRequired`` (403) for a non-admin key."""
        tenant = self.authenticate(authorization, x_api_key)
        if not tenant.admin:
            raise AdminKeyRequired(tenant.key_id)
        return tenant


def _presented_key(authorization: str | None, x_api_key: str | None) -> str:
    bearer = None
    if authorization:
        parts = authorization.split(None, 1)
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise InvalidApiKey("The Authorization header must be `Authorization: Bearer <key>`.")
        bearer = parts[1].strip()
    api_key = x_api_key.strip() if x_api_key else None
    if bearer and api_key and bearer != api_key:
        raise InvalidApiKey(
            "The Authorization and x-api-key headers carry different keys; send only one."
        )
    key = bearer or api_key
    if not key:
        raise InvalidApiKey(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>` "
            "(or in an `x-api-key` header)."
        )
    return key
