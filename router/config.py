"""routes.yaml → a validated, frozen ``RoutesConfig``.

Parsing uses ruamel.yaml (it keeps line and column of every key and item); validation uses
pydantic. Any problem becomes a ``ConfigError`` that names the file, line and column, so
``routeyard check`` and a refused hot reload both point at the exact spot to fix.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from router.batch.config import BatchConfig
from router.catalog import GROUPS
from router.tenants.config import AuthConfig, ResolvedAuth, resolve_auth

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
    "gb": 1000**3, "gib": 1024**3,
}


def _parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``500ms``, ``30s``, ``5m``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 500ms")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 500ms or 5m")
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero")
    return seconds


def _parse_size(value: Any) -> int:
    """Bytes from a number or a string such as ``10MiB``, ``512KB``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10MiB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. 10MiB, 512KB or 1048576")
        size = int(float(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()])
    if size <= 0:
        raise ValueError("a size must be greater than zero")
    return size


Duration = Annotated[float, BeforeValidator(_parse_duration)]
Size = Annotated[int, BeforeValidator(_parse_size)]


_M = TypeVar("_M", bound=BaseModel)


class _Strict(BaseModel):
    # hide_input_in_errors: a plain API key pasted in the wrong place must not be logged.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class Timeouts(_Strict):
    """Per-request upstream timeouts. None of them bounds a whole (long) generation."""

    connect: Duration = 5.0
    first_byte: Duration = 600.0
    idle: Duration = 300.0


class Retries(_Strict):
    """Retries of a request that failed before any byte reached the client."""

    attempts: int = Field(default=2, ge=0, le=10)
    backoff: Duration = 0.025
    max_backoff: Duration = 1.0


class Queue(_Strict):
    """Where requests wait when every backend of a model is at ``max_in_flight``."""

    size: int = Field(default=256, ge=0)
    timeout: Duration = 10.0


class SessionPolicy(_Strict):
    header: str = "x-session-id"


class PrefixPolicy(_Strict):
    chars: int = Field(default=256, ge=1)
    load_factor: float = Field(default=1.25, ge=1.0)
    #: ``cache_aware``: characters per block of the prefix index, and blocks it holds.
    block_chars: int = Field(default=128, ge=1)
    index_blocks: int = Field(default=100_000, ge=1)


class HealthChecks(_Strict):
    """Active checks: ``GET path`` on every backend, with hysteresis."""

    enabled: bool = True
    path: str = "/health"
    interval: Duration = 5.0
    timeout: Duration = 2.0
    unhealthy_threshold: int = Field(default=2, ge=1)
    healthy_threshold: int = Field(default=1, ge=1)


class OutlierDetection(_Strict):
    """Passive checks: eject a backend after failures of real requests in a row, as Envoy's
    outlier detection does, within a per-model cap, with a panic mode (``router.health``
    and ``router.cluster`` have the state machine and the formulas).

    A connection failure says much more about a backend than a 500 answer, which any client
    can provoke (a body the engine fails on): like Envoy's ``consecutive_gateway_failure``
    and ``consecutive_5xx``, two streaks are counted, with thresholds of their own."""

    #: Gateway failures in a row that eject: connect error or timeout, reset, invalid HTTP,
    #: no headers within ``first_byte``, a 502/503/504 answer (Envoy's
    #: ``consecutive_gateway_failure``).
    consecutive_failures: int = Field(default=5, ge=1)
    #: Failures of any kind in a row that eject, 500 answers included: a 500 resets the
    #: gateway streak but not this one (Envoy's ``consecutive_5xx``).
    consecutive_5xx: int = Field(default=20, ge=1)
    ejection: Duration = 30.0
    #: The most of a model's backends that may be out of rotation (ejected or failing
    #: active checks) for an ejection to go ahead: ``floor(n * p / 100)``. Below 100 at
    #: least one backend stays in, so a model with one backend is never ejected.
    max_ejection_percent: int = Field(default=50, ge=0, le=100)
    #: Under this share of a model's backends up (healthy and not ejected), its ejected
    #: backends get traffic again (those failing active checks do not). 0 turns it off.
    panic_threshold: int = Field(default=50, ge=0, le=100)
    #: A passing active check ends an ejection at once (Envoy's
    #: ``successful_active_health_check_uneject_host``); false: the cool-down runs out.
    uneject_on_health_check: bool = True


class EngineMetrics(_Strict):
    """Reading each backend's ``GET /metrics`` (vLLM's Prometheus text) on an interval, for
    the scored policies (``router.scraper``, ``docs/routing.md``)."""

    #: None: on for ``load_aware`` and ``cache_aware``, off for the other policies; true:
    #: also for those (the admin view shows the engines' state); false: never (refused
    #: with a scored policy, which would have nothing to read).
    enabled: bool | None = None
    path: str = Field(default="/metrics", pattern=r"^/[!-~]*$")
    interval: Duration = 0.2
    #: Each phase of one scrape (connect, first byte, between chunks).
    timeout: Duration = 0.2
    #: A reading older than this counts as saturated.
    max_age: Duration = 0.5


class Saturation(_Strict):
    """Past either threshold a backend is not picked while another is below both."""

    #: The engine's waiting requests (``vllm:num_requests_waiting``).
    queue: int = Field(default=16, ge=1)
    #: The engine's KV-cache use (``vllm:kv_cache_usage_perc``), 0..1.
    kv_cache: float = Field(default=0.9, gt=0.0, le=1.0)


class ScorerWeights(_Strict):
    """The weight of each scorer (0 turns it off); ``docs/routing.md`` has the formulas."""

    queue: float = Field(default=2.0, ge=0.0)
    kv_cache: float = Field(default=2.0, ge=0.0)
    in_flight: float = Field(default=1.0, ge=0.0)
    #: ``cache_aware`` only.
    prefix: float = Field(default=6.0, ge=0.0)
    #: ``load_aware`` only (its key is then the session's).
    session: float = Field(default=0.0, ge=0.0)


class Scoring(_Strict):
    """How ``load_aware`` and ``cache_aware`` score backends."""

    weights: ScorerWeights = ScorerWeights()
    saturation: Saturation = Saturation()
    #: Also send ``x-routeyard-scores`` (each candidate's scores) with every answer.
    explain: bool = False


Policy = Literal["round_robin", "least_request", "session", "prefix", "load_aware",
                 "cache_aware"]
#: The policies that score backends on the engines' own state.
SCORED = frozenset({"load_aware", "cache_aware"})


class Backend(_Strict):
    url: str
    #: How the router names this backend to clients (``x-routeyard-backend``) and in the
    #: admin view; default its position in the model's list.
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    weight: int = Field(default=1, ge=1, le=1000)
    max_in_flight: int | None = Field(default=None, ge=1)
    discovery: Literal["static", "dns"] = "static"
    #: Name of an environment variable holding the engine's own ``--api-key``.
    api_key_env: str | None = Field(default=None, min_length=1)

    @field_validator("api_key_env")
    @classmethod
    def _check_key_env(cls, name: str | None, info: ValidationInfo) -> str | None:
        secrets = (info.context or {}).get("secrets", True)
        if name is not None and secrets and not os.environ.get(name):
            raise ValueError(f"the environment variable {name} (api_key_env) is not set")
        return name

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL; write e.g. http://10.0.0.7:8000")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: a backend URL takes no query or fragment")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        return url.rstrip("/")


def _check_groups(groups: list[str]) -> list[str]:
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(
            f"unknown endpoint group(s) {', '.join(unknown)}; known groups: {', '.join(GROUPS)}"
        )
    return groups


Groups = Annotated[list[str], Field(min_length=1), AfterValidator(_check_groups)]


class ModelSpec(_Strict):
    backends: list[Backend] = Field(min_length=1)
    endpoints: Groups | None = None
    backend_model: str | None = Field(default=None, min_length=1)
    policy: Policy | None = None
    session: SessionPolicy | None = None
    prefix: PrefixPolicy | None = None
    engine_metrics: EngineMetrics | None = None
    scoring: Scoring | None = None
    max_in_flight: int | None = Field(default=None, ge=1)
    timeouts: Timeouts | None = None
    retries: Retries | None = None
    queue: Queue | None = None
    max_body_size: Size | None = None
    #: Route the LoRA adapters the backends' engines list with this model as their parent.
    discover: bool = False

    @field_validator("backends")
    @classmethod
    def _unique_names(cls, backends: list[Backend]) -> list[Backend]:
        names = [b.name or str(i) for i, b in enumerate(backends)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"backend names must be unique within a model (a backend "
                             f"without a name is named by its position): {', '.join(twice)}")
        return backends


class Defaults(_Strict):
    endpoints: Groups | None = None
    policy: Policy = "round_robin"
    session: SessionPolicy = SessionPolicy()
    prefix: PrefixPolicy = PrefixPolicy()
    engine_metrics: EngineMetrics = EngineMetrics()
    scoring: Scoring = Scoring()
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    queue: Queue = Queue()
    max_body_size: Size = 32 * 1024 * 1024
    health_checks: HealthChecks = HealthChecks()
    outlier_detection: OutlierDetection = OutlierDetection()
    dns_refresh: Duration = 10.0


class RoutesFile(_Strict):
    defaults: Defaults = Defaults()
    models: dict[str, ModelSpec]
    auth: AuthConfig | None = None
    batch: BatchConfig | None = None


class ModelConfig(_Strict):
    """One model with the defaults applied: what the router acts on."""

    name: str
    backends: tuple[Backend, ...]
    endpoints: frozenset[str]
    backend_model: str | None
    policy: Policy
    session: SessionPolicy
    prefix: PrefixPolicy
    engine_metrics: EngineMetrics
    scoring: Scoring
    max_in_flight: int | None
    timeouts: Timeouts
    retries: Retries
    queue: Queue
    max_body_size: int
    discover: bool = False

    @property
    def scrapes(self) -> bool:
        """Whether this model's backends' ``/metrics`` are read."""
        enabled = self.engine_metrics.enabled
        return self.policy in SCORED if enabled is None else enabled


class RoutesConfig(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    models: dict[str, ModelConfig]
    auth: ResolvedAuth | None
    #: Read at start only: the Files/Batch API sets up its database and storage once.
    batch: BatchConfig | None
    health_checks: HealthChecks
    outlier_detection: OutlierDetection
    dns_refresh: float
    sha256: str
    source: str


class ConfigError(Exception):
    """A routes file that cannot be used, with the place to fix it."""

    def __init__(self, source: str, message: str, line: int | None = None, col: int | None = None):
        self.source, self.message, self.line, self.col = source, message, line, col
        where = source if line is None else f"{source}:{line}:{col or 1}"
        super().__init__(f"{where}: {message}")


def load_file(path: str | Path, *, secrets: bool = True) -> RoutesConfig:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the routes file: {exc.strerror}") from exc
    return parse(text, str(path), secrets=secrets)


def parse(text: bytes, source: str = "<routes>", *, secrets: bool = True) -> RoutesConfig:
    """Parse and validate routes.yaml content; raise ``ConfigError`` naming the line.

    ``secrets=False`` validates the file alone: the key files and environment variables it
    names (``auth:``, ``api_key_env``) are not read, and the result has no ``auth``
    (``routeyard check --no-secrets``, where those exist only in the pod)."""
    try:
        tree = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        raise ConfigError(source, f"invalid YAML: {exc.problem or exc}", line, col) from exc
    if not isinstance(tree, CommentedMap):
        raise ConfigError(source, "the routes file must be a mapping with a `models:` key", 1, 1)
    try:
        routes = RoutesFile.model_validate(_plain(tree), context={"secrets": secrets})
    except ValidationError as exc:
        first = exc.errors()[0]
        line, col = _position(tree, first["loc"])
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(source, f"{where}: {msg}{more}", line, col) from exc
    return _resolve(routes, tree, hashlib.sha256(text).hexdigest(), source, secrets)


def _resolve(routes: RoutesFile, tree: CommentedMap, sha256: str, source: str,
             secrets: bool = True) -> RoutesConfig:
    d = routes.defaults
    models = {}
    for name, spec in routes.models.items():
        models[name] = ModelConfig(
            name=name,
            backends=tuple(spec.backends),
            endpoints=frozenset(spec.endpoints or d.endpoints or ()),
            backend_model=spec.backend_model,
            policy=spec.policy or d.policy,
            session=_merge(d.session, spec.session),
            prefix=_merge(d.prefix, spec.prefix),
            engine_metrics=_merge(d.engine_metrics, spec.engine_metrics),
            scoring=_merge(d.scoring, spec.scoring),
            max_in_flight=spec.max_in_flight,
            timeouts=_merge(d.timeouts, spec.timeouts),
            retries=_merge(d.retries, spec.retries),
            queue=_merge(d.queue, spec.queue),
            max_body_size=spec.max_body_size or d.max_body_size,
            discover=spec.discover,
        )
        if spec.discover and not d.health_checks.enabled:
            raise ConfigError(
                source, f"models.{name}.discover: adapters are discovered by the health "
                "checks' reads of /v1/models; defaults.health_checks.enabled is false",
                *_position(tree, ("models", name, "discover")))
        _check_scoring(models[name], spec, tree, source)
        if not models[name].endpoints:
            raise ConfigError(
                source,
                f"models.{name}: no endpoints enabled; list them in `endpoints:` "
                f"or in `defaults.endpoints:` (groups: {', '.join(GROUPS)})",
                *_position(tree, ("models", name)),
            )
    auth = None
    if routes.auth is not None and secrets:
        try:
            auth = resolve_auth(routes.auth, Path(source).parent)
        except ValueError as exc:
            raise ConfigError(source, f"auth: {exc}", *_position(tree, ("auth",))) from None
    batch = routes.batch
    if batch is not None:
        batch = batch.relative_to(Path(source).parent)
    if batch is not None and os.environ.get("ROUTEYARD_BATCH_DATABASE_URL"):
        # Keeps a database password out of routes.yaml (a Secret as an env var).
        url = os.environ["ROUTEYARD_BATCH_DATABASE_URL"]
        batch = batch.model_copy(update={"database_url": url})
    return RoutesConfig(
        models=models,
        auth=auth,
        batch=batch,
        health_checks=d.health_checks,
        outlier_detection=d.outlier_detection,
        dns_refresh=d.dns_refresh,
        sha256=sha256,
        source=source,
    )


def _check_scoring(model: ModelConfig, spec: ModelSpec, tree: CommentedMap,
                   source: str) -> None:
    """A scored policy needs engine metrics; a scorer weight set where the policy's key
    cannot feed it is refused rather than ignored."""
    name = model.name
    if model.policy in SCORED and model.engine_metrics.enabled is False:
        raise ConfigError(source, f"models.{name}: policy {model.policy} routes on the "
                          "engines' /metrics; engine_metrics.enabled: false leaves it "
                          "nothing to read", *_position(tree, ("models", name, "engine_metrics")))
    weights = spec.scoring.weights if spec.scoring is not None else None
    explicit = weights.model_fields_set if weights is not None else set()
    for key, needs in (("prefix", "cache_aware"), ("session", "load_aware")):
        if model.policy in SCORED and model.policy != needs and (
                key in explicit and getattr(model.scoring.weights, key) > 0):
            raise ConfigError(
                source, f"models.{name}.scoring.weights.{key}: the {key} scorer needs policy "
                f"{needs} (policy {model.policy} has no {key} key to score)",
                *_position(tree, ("models", name, "scoring", "weights", key)))


def _merge(default: _M, override: _M | None) -> _M:
    """``default`` with the keys the model set explicitly in ``override`` (nested blocks
    merged the same way, key by key)."""
    if override is None:
        return default
    update = {}
    for key in override.model_fields_set:
        value = getattr(override, key)
        base = getattr(default, key)
        if isinstance(value, BaseModel) and isinstance(base, BaseModel):
            value = _merge(base, value)
        update[key] = value
    return default.model_copy(update=update)


def _plain(node: Any) -> Any:
    """ruamel's commented containers → plain dicts and lists, for pydantic."""
    if isinstance(node, CommentedMap):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [_plain(v) for v in node]
    return node


def _position(tree: Any, loc: tuple[int | str, ...]) -> tuple[int | None, int | None]:
    """Line and column (1-based) of the deepest node on ``loc`` that exists in the YAML."""
    line: int | None = None
    col: int | None = None
    node = tree
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            line, col = node.lc.key(part)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line, col = node.lc.item(part)
            node = node[part]
        else:
            break
    if line is None or col is None:
        return (1, 1)
    return (line + 1, col + 1)
