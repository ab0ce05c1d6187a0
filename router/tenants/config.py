"""The ``auth:`` block of routes.yaml: API keys (as hashes), their models and limits.

Two steps, like the rest of the routes file. ``AuthConfig`` validates the YAML shape (pure,
no I/O); ``resolve_auth`` then reads the secrets it points at (``key_env``, ``key_file``,
``keys_file``), hashes plain keys, checks that every key is unique, and returns a frozen
``ResolvedAuth`` that ``keys.Authenticator`` turns into lookup tables. Both raise
``ValueError`` with a message that names the key entry, the value and the fix.

Key hashes are ``sha256:<64 lowercase hex digits>`` of the UTF-8 key. A fast, unsalted hash
is sound here because API keys are not passwords: ``routeyard hash-key`` makes 256-bit random
tokens, and plain keys read from files or the environment must be at least
``MIN_KEY_LENGTH`` characters, so no amount of guessing speed recovers a key from its hash.
Slow salted hashes (bcrypt, argon2) exist for low-entropy passwords; they would cost tens of
milliseconds per request and rule out finding the key by its hash in one dict lookup.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

HASH_PREFIX = "sha256:"
KEY_PREFIX = "ry-"
MIN_KEY_LENGTH = 32
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_HASH_HINT = "write sha256:<64 hex digits>; `routeyard hash-key` prints one for a new key"

#: Key and tenant ids appear in logs, metrics and Redis keys: keep them plain.
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@:/-]{0,127}$")]


def new_key() -> str:
    """A new API key: ``ry-`` and 32 random bytes, URL-safe base64 (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The ``sha256:<hex>`` form of a key, as routes.yaml stores it."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_digest(key: str) -> bytes:
    """The raw SHA-256 of a key: what a request's key is compared against."""
    return hashlib.sha256(key.encode("utf-8")).digest()


class _Strict(BaseModel):
    # hide_input_in_errors: a plain key pasted into `hash:` must not reach a log.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class Limits(_Strict):
    """Requests and tokens per minute; a missing one is unlimited."""

    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None


class AdminKeySpec(_Strict):
    """An admin key: opens ``/admin/*`` and nothing else. Exactly one secret source."""

    id: Id
    hash: str | list[str] | None = None
    key_env: str | None = Field(default=None, min_length=1)
    key_file: str | None = Field(default=None, min_length=1)

    @field_validator("hash")
    @classmethod
    def _check_hash(cls, value: str | list[str] | None) -> str | list[str] | None:
        for item in [value] if isinstance(value, str) else value or []:
            if not _HASH.match(item.strip().lower()):
                shown = repr(item) if item.startswith(HASH_PREFIX) else (
                    "the value (not shown: it may be a plain key)"
                )
                raise ValueError(f"{shown} is not a key hash; {_HASH_HINT}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> AdminKeySpec:
        given = [n for n in ("hash", "key_env", "key_file") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(
                f"key {self.id!r} needs exactly one of hash, key_env or key_file"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    def hashes(self) -> list[str]:
        if self.hash is None:
            return []
        items = [self.hash] if isinstance(self.hash, str) else self.hash
        return [h.strip().lower() for h in items]


class KeySpec(AdminKeySpec):
    """A client key: who it belongs to, which models it may call, and its limits.

    ``models`` and the keys of ``model_limits`` are exact names or glob patterns
    (``*``, ``?``, ``[...]``, case-sensitive; ``*`` also matches ``/``). ``model_limits``
    applies the first matching entry and counts each model separately. During a rotation
    ``hash`` may list the old and the new hash: both work and share the key's limits.
    """

    tenant: Id | None = None
    models: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    limits: Limits = Limits()
    model_limits: dict[str, Limits] = {}


class KeysFile(_Strict):
    """The YAML file named by ``auth.keys_file``: more keys, kept out of routes.yaml."""

    keys: list[KeySpec] = []
    admin_keys: list[AdminKeySpec] = []


class AuthConfig(_Strict):
    """The ``auth:`` block. Its presence turns authentication on for every route but
    ``/health`` and ``/ready``; ``/metrics`` then needs an admin key too, unless
    ``public_metrics`` is true."""

    keys: list[KeySpec] = []
    admin_keys: list[AdminKeySpec] = []
    keys_file: str | None = Field(default=None, min_length=1)
    public_metrics: StrictBool = False


@dataclass(frozen=True, slots=True)
class ResolvedKey:
    """One key entry with its secrets read and hashed."""

    id: str
    tenant: str
    digests: tuple[bytes, ...]
    models: tuple[str, ...]
    limits: Limits
    model_limits: tuple[tuple[str, Limits], ...]
    admin: bool


@dataclass(frozen=True, slots=True)
class ResolvedAuth:
    """Everything the authenticator needs, with no I/O left to do.

    ``fingerprint`` changes whenever any resolved key does (including a key file's content),
    so a reload can tell "routes.yaml unchanged but a key file changed" from a no-op.
    ``watch_paths`` are the files read, for the reload watcher.
    """

    keys: tuple[ResolvedKey, ...]
    fingerprint: str
    watch_paths: tuple[Path, ...]
    public_metrics: bool = False


def resolve_auth(
    config: AuthConfig,
    base_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ResolvedAuth:
    """Read every secret ``config`` points at; raise ``ValueError`` naming what to fix.

    Relative paths are relative to ``base_dir`` (the routes file's directory).
    """
    env = os.environ if environ is None else environ
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    paths: list[Path] = []
    entries: list[tuple[AdminKeySpec, Path, str]] = [
        *((k, base, "auth.keys") for k in config.keys),
        *((k, base, "auth.admin_keys") for k in config.admin_keys),
    ]
    if config.keys_file:
        path = base / config.keys_file
        paths.append(path)
        extra = _load_keys_file(path)
        entries += [(k, path.parent, f"{path}: keys") for k in extra.keys]
        entries += [(k, path.parent, f"{path}: admin_keys") for k in extra.admin_keys]

    keys: list[ResolvedKey] = []
    owner: dict[bytes, str] = {}
    ids: set[str] = set()
    for spec, where, section in entries:
        label = f"{section}[{spec.id}]"
        if spec.id in ids:
            raise ValueError(f"{label}: the id {spec.id!r} is used twice; key ids must be unique")
        ids.add(spec.id)
        digests = _digests(spec, where, env, label, paths)
        for digest in digests:
            if digest in owner:
                raise ValueError(
                    f"{label}: the same key is also configured as {owner[digest]}; "
                    "a key must belong to one entry (list both hashes on one entry to rotate)"
                )
            owner[digest] = label
        keys.append(_resolved(spec, digests))
    return ResolvedAuth(tuple(keys), _fingerprint(keys), tuple(paths), config.public_metrics)


def _resolved(spec: AdminKeySpec, digests: tuple[bytes, ...]) -> ResolvedKey:
    if isinstance(spec, KeySpec):
        return ResolvedKey(
            id=spec.id, tenant=spec.tenant or spec.id, digests=digests,
            models=tuple(spec.models), limits=spec.limits,
            model_limits=tuple(spec.model_limits.items()), admin=False,
        )
    return ResolvedKey(
        id=spec.id, tenant=spec.id, digests=digests, models=(), limits=Limits(),
        model_limits=(), admin=True,
    )


def _digests(
    spec: AdminKeySpec, base: Path, env: Mapping[str, str], label: str, paths: list[Path]
) -> tuple[bytes, ...]:
    if spec.hash is not None:
        return tuple(bytes.fromhex(h.removeprefix(HASH_PREFIX)) for h in spec.hashes())
    if spec.key_env is not None:
        if spec.key_env not in env:
            raise ValueError(
                f"{label}: environment variable {spec.key_env} is not set; "
                "export it, or store the key's hash in `hash:` instead"
            )
        secret, source = env[spec.key_env].strip(), f"environment variable {spec.key_env}"
    else:
        assert spec.key_file is not None
        path = base / spec.key_file
        paths.append(path)
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{label}: cannot read key_file {path}: {exc}") from None
        source = f"key_file {path}"
    if len(secret) < MIN_KEY_LENGTH:
        raise ValueError(
            f"{label}: the key in {source} is {len(secret)} characters; keys must be at "
            f"least {MIN_KEY_LENGTH} random characters (`routeyard hash-key` makes one)"
        )
    return (key_digest(secret),)


def _load_keys_file(path: Path) -> KeysFile:
    try:
        data: Any = YAML(typ="safe").load(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"auth.keys_file: cannot read {path}: {exc.strerror}") from None
    except YAMLError as exc:
        raise ValueError(f"auth.keys_file: {path} is not valid YAML: {exc}") from None
    try:
        return KeysFile.model_validate(data if data is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ValueError(f"auth.keys_file {path}: {where}: {msg}") from None


def _fingerprint(keys: list[ResolvedKey]) -> str:
    canonical = [
        [k.id, k.tenant, sorted(d.hex() for d in k.digests), k.models, k.limits.model_dump(),
         [[p, lim.model_dump()] for p, lim in k.model_limits], k.admin]
        for k in keys
    ]
    return hashlib.sha256(orjson.dumps(canonical)).hexdigest()
