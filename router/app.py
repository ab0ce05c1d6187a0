"""The listener: a Sanic app whose routes come from the catalog.

Per request: take the current snapshot, read the model name, check the model exists and
has the route's group enabled, check the body size, rewrite the model name if the backend
serves it under another, and hand over to the relay. Everything else was done at load.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from sanic import HTTPResponse, Request, Sanic
from sanic.exceptions import SanicException

from router.batch import BatchService, register
from router.catalog import (
    BY_RESPONSE_ID,
    PROXIED,
    ModelSource,
    Route,
    error_style,
)
from router.config import load_file
from router.dispatch import RouterDispatcher
from router.errors import (
    ClientError,
    EndpointNotEnabled,
    InternalError,
    MethodNotAllowed,
    ModelNotFound,
    PayloadTooLarge,
    ResponseNotFound,
    RouteNotFound,
    RouterError,
    stream_error_event,
)
from router.health import HealthMonitor
from router.model_field import (
    model_from_form,
    model_from_json,
    rewrite_form_model,
    rewrite_json_model,
)
from router.relay import forward, forward_stored, new_request_id, unsafe_head
from router.reload import ConfigHolder
from router.response_ids import RESPONSES_CREATE, ResponseIds
from router.settings import Settings
from router.snapshot import Snapshot
from router.telemetry import GEN_AI_OPERATIONS, Exchange, Observer, tracing_wanted
from router.tenants.keys import Tenant
from router.tenants.limits import Admission, Limiter, build_limiter, estimate_tokens

log = logging.getLogger("routeyard")
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
Handler = Callable[[Request], Awaitable[HTTPResponse | None]]


class State:
    """What the handlers share in one worker; set up at server start."""

    holder: ConfigHolder
    health: HealthMonitor
    #: Metrics, tracing and the access log; None when all three are off.
    observer: Observer | None = None
    limiter: Limiter
    draining = False
    #: Which backend holds each stored Responses API answer (this worker's view).
    response_ids: ResponseIds


def create_app(settings: Settings | None = None) -> Sanic:
    settings = settings or Settings()
    app = Sanic("routeyard", configure_logging=False)
    app.config.update(
        REQUEST_MAX_SIZE=settings.max_request_size,
        REQUEST_TIMEOUT=settings.request_timeout,
        RESPONSE_TIMEOUT=10 * 365 * 86400,  # generations end when the engine says so
        KEEP_ALIVE_TIMEOUT=settings.keep_alive_timeout,
        GRACEFUL_SHUTDOWN_TIMEOUT=settings.graceful_shutdown,
        ACCESS_LOG=False,
        FALLBACK_ERROR_FORMAT="json",
        TOUCHUP=True,
    )
    state = State()
    state.response_ids = ResponseIds()
    app.ctx.state = state
    batch = _batch_service(settings.config, app, state)
    tracing = tracing_wanted(os.environ, settings.tracing)
    observing = settings.metrics or settings.access_log or tracing

    @app.before_server_start
    async def load_config(app: Sanic) -> None:
        if observing:
            state.observer = _observer(settings, tracing, app)
        metrics = state.observer.metrics if state.observer is not None else None
        state.holder = ConfigHolder(settings.config)
        if metrics is not None:
            state.holder.on_load = metrics.config_loaded
        await state.holder.load()
        state.health = HealthMonitor(state.holder)
        if metrics is not None:
            holder = state.holder
            metrics.start(app.loop, lambda: (holder.registry.by_key.values(),
                                             holder.current.models.values()))
        state.holder.install_sighup(app.loop)
        if settings.watch:
            app.add_task(state.holder.watch(), name="routeyard.watch")
        state.limiter = build_limiter()
        if batch is not None:
            await batch.start(RouterDispatcher(state.holder, state.health))
        app.add_task(state.health.run(), name="routeyard.health")
        app.add_task(state.holder.refresh_dns(), name="routeyard.dns")

    @app.before_server_stop
    async def drain(app: Sanic) -> None:
        state.draining = True

    @app.after_server_stop
    async def close_pools(app: Sanic) -> None:
        if batch is not None:
            await batch.close(grace=settings.graceful_shutdown)
        await state.limiter.close()
        state.health.close()
        state.holder.close()
        if state.observer is not None:
            state.observer.close()

    @app.main_process_ready
    async def forward_sighup(app: Sanic) -> None:
        # With --workers N the manager process gets SIGHUP; every worker must reload.
        def _forward(signum: int, _frame: object) -> None:
            for process in app.manager.transient_processes:
                if process.pid:
                    os.kill(process.pid, signum)

        signal.signal(signal.SIGHUP, _forward)

    for route in PROXIED:
        handler = _proxy_handler(route, state)
        for path in route.paths:
            app.add_route(handler, path, methods=[route.method], name=_name(path))

    async def stored_response(request: Request, response_id: str) -> None:
        """``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel``: no model in
        the request, so the answer's backend comes from ``state.response_ids``."""
        request_id = _checked_request_id(request)
        snapshot = state.holder.current
        tenant = _authenticate(snapshot, request)
        if not response_id.startswith("resp"):
            raise ClientError(f"Invalid 'response_id': '{response_id}'. Expected an ID that "
                              "begins with 'resp'.", param="response_id")
        models = [m for m in snapshot.models.values() if "responses" in m.groups
                  and (tenant is None or tenant.can_use(m.name))]
        observer = state.observer
        ex = None if observer is None else Exchange(
            observer, request, "responses", "retrieve_response", request_id,
            reads_usage=False)  # its tokens were counted when the answer was made
        ids = state.response_ids
        admission = None
        try:
            if not models:
                raise ResponseNotFound(response_id)
            holders = ids.holders(response_id, models)
            if tenant is not None:  # a lookup counts toward the key's request rate
                admission = await state.limiter.admit(tenant, holders[0][0].name, 0)
            await forward_stored(request, response_id, holders, request_id,
                                 snapshot.config.outlier_detection, state.health.eject,
                                 ids.found(response_id), tenant is not None, ex)
        except BaseException as exc:
            await _settle(state, ex, admission, exc, 0)
            raise
        await _settle(state, ex, admission, None, 0)

    for route in BY_RESPONSE_ID:
        for path in route.sanic_paths:
            app.add_route(stored_response, path, methods=[route.method],
                          name=_name(path.replace("<", "").replace(">", "")))

    @app.get("/v1/models")
    async def list_models(request: Request) -> HTTPResponse:
        snapshot = state.holder.current
        tenant = _authenticate(snapshot, request)
        return HTTPResponse(snapshot.models_body_for(tenant), content_type=JSON)

    def admin_only(request: Request) -> None:
        """``/admin/*`` needs an admin key once ``auth:`` is configured."""
        auth = state.holder.current.auth
        if auth is not None:
            headers = request.headers
            auth.authenticate_admin(headers.get("authorization"), headers.get("x-api-key"))

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        return HTTPResponse(b'{"status":"ok"}', content_type=JSON)

    @app.get("/ready")
    async def ready(request: Request) -> HTTPResponse:
        """503 while draining; else by ``?models=``: ``all`` (default) needs a backend up
        for every model, ``any`` for at least one, ``none`` only a loaded config (the
        Kubernetes readiness probe: one model down must not empty the Service)."""
        if state.draining:
            return HTTPResponse(b'{"status":"draining"}', 503, content_type=JSON)
        scope = request.args.get("models", "all")
        if scope not in ("all", "any", "none"):
            raise ClientError("`models` must be all, any or none.", param="models")
        models = state.holder.current.models.values()
        down = [m.name for m in models if not m.cluster.any_up()]
        if (scope == "all" and down) or (scope == "any" and len(down) == len(models)):
            body = orjson.dumps({"status": "not ready", "models_without_backend": down})
            return HTTPResponse(body, 503, content_type=JSON)
        return HTTPResponse(b'{"status":"ready"}', content_type=JSON)

    @app.get("/admin/backends")
    async def admin_backends(request: Request) -> HTTPResponse:
        admin_only(request)
        models = state.holder.current.models
        body = {
            name: {"policy": m.cluster.config.policy, "in_flight": m.cluster.in_flight,
                   "queued": len(m.cluster.waiters), "backends": m.cluster.describe()}
            for name, m in models.items()
        }
        return HTTPResponse(orjson.dumps(body), content_type=JSON)

    @app.get("/admin/config")
    async def admin_config(request: Request) -> HTTPResponse:
        admin_only(request)
        holder = state.holder
        body = {
            **holder.current.summary(),
            "reloads": holder.reloads,
            "last_error": holder.last_error,
        }
        return HTTPResponse(orjson.dumps(body), content_type=JSON)

    if settings.metrics:
        @app.get("/metrics")
        async def metrics(request: Request) -> HTTPResponse:
            assert state.observer is not None and state.observer.metrics is not None
            body = await state.observer.metrics.render()
            return HTTPResponse(body, content_type=PROMETHEUS)

    app.error_handler.add(Exception, _error_response)
    return app


def _observer(settings: Settings, tracing: bool, app: Sanic) -> Observer:
    """Made in each worker at start: no thread, file or exporter exists before."""
    from router.accesslog import AccessLog
    from router.metrics import Metrics
    from router.telemetry import Tracing

    access = None
    if settings.access_log:
        access = AccessLog()
        access.start(app.loop)
    return Observer(
        tracing=Tracing(os.environ) if tracing else None,
        metrics=Metrics() if settings.metrics else None,
        access=access,
    )


def _name(path: str) -> str:
    return "proxy" + path.replace("/", "_").replace("-", "_")


def _proxy_handler(route: Route, state: State) -> Handler:
    """A handler bound to one catalog route: its group and model source are constants.

    With metrics, tracing or the access log on (``state.observer``), an ``Exchange``
    records the request, whatever way it ends; with all three off nothing of it runs."""
    group = route.group
    assert group is not None
    from_form = route.model is ModelSource.FORM
    stream_error = stream_error_event(route)
    operation = GEN_AI_OPERATIONS.get(group, group)
    creates_responses = route.path == RESPONSES_CREATE

    async def proxy(request: Request) -> None:
        request_id = _checked_request_id(request)
        snapshot = state.holder.current
        body = request.body
        tenant = _authenticate(snapshot, request)
        observer = state.observer
        if observer is None and tenant is not None:
            observer = _SILENT  # token limits need the usage an Exchange reads
        ex = None if observer is None else Exchange(observer, request, group, operation,
                                                    request_id)
        admission = None
        try:
            if from_form:
                data: dict[str, Any] = dict(request.form or {})
                name = model_from_form(request.form.get("model") if request.form else None)
            else:
                name, data = model_from_json(body)
            model = snapshot.models.get(name)
            if tenant is not None and not tenant.can_use(name):
                model = None  # do not reveal models this key may not see
            if ex is not None:
                ex.matched(name, model)
            if model is None:
                raise ModelNotFound(name)
            if group not in model.groups:
                raise EndpointNotEnabled(name, group, request.path, model.enabled)
            if len(body) > model.max_body_size:
                raise PayloadTooLarge(
                    f"The request body is {len(body)} bytes; model `{name}` accepts at most "
                    f"{model.max_body_size} (max_body_size in routes.yaml)."
                )
            if model.backend_model:
                rewrite = rewrite_form_model if from_form else rewrite_json_model
                body = rewrite(body, model.backend_model)
            extra = None
            if tenant is not None:
                estimate = estimate_tokens(0 if from_form else len(body), data)
                admission = await state.limiter.admit(tenant, name, estimate)
                extra = list(admission.headers.items())
            key = model.key_of(request.headers, data) if model.key_of else None
            outlier = snapshot.config.outlier_detection
            pin = None
            if creates_responses:
                pin = state.response_ids.pin(model.name, data)
            await forward(request, model, body, request_id, stream_error, key, outlier,
                          state.health.eject, ex, extra, strip_keys=tenant is not None,
                          pin=pin)
        except BaseException as exc:
            await _settle(state, ex, admission, exc, None)
            raise
        used = None
        if ex is not None and ex.input_tokens is not None:
            used = ex.input_tokens + (ex.output_tokens or 0)
        # forward has sent the response: this runs after the client has it
        await _settle(state, ex, admission, None, used)

    return proxy


_SILENT = Observer(tracing=None, metrics=None, access=None)


def _checked_request_id(request: Request) -> str:
    """The request's id (the client's ``x-request-id`` or a new one), once its head is
    known to be safe to forward: a bare CR or LF or a NUL in it is refused (Sanic splits
    header lines on CRLF only, so such a value would become a header line of its own)."""
    if unsafe_head(request.head):
        raise ClientError("Header values must not contain CR, LF or NUL characters.")
    request_id = request.ctx.request_id = (
        request.headers.get("x-request-id") or new_request_id())
    return request_id


async def _settle(state: State, ex: Exchange | None, admission: Admission | None,
                  exc: BaseException | None, used: int | None) -> None:
    """A request ended, however it ended: its record to metrics, traces and the access
    log, its token usage to the limiter. Shielded: the client may hang up once it has the
    answer, which cancels the handler, and the (Redis) usage correction must still land."""
    if ex is not None:
        ex.finish(exc)
    if admission is not None:
        await asyncio.shield(state.limiter.record(admission, used))


def _batch_service(config_path: str, app: Sanic, state: State) -> BatchService | None:
    """The Files and Batch API, when routes.yaml has a ``batch:`` block (read at start)."""
    config = load_file(config_path).batch
    if config is None:
        return None
    service = BatchService(config)

    def tenant_of(request: Request) -> str | None:
        tenant = _authenticate(state.holder.current, request)
        return tenant.tenant_id if tenant is not None else None

    register(app, service, tenant_of)
    return service


def _authenticate(snapshot: Snapshot, request: Request) -> Tenant | None:
    """The request's tenant when ``auth:`` is configured (401 without a valid key)."""
    if snapshot.auth is None:
        return None
    headers = request.headers
    return snapshot.auth.authenticate(headers.get("authorization"), headers.get("x-api-key"))


def _error_response(request: Request, exc: Exception) -> HTTPResponse:
    """Every router-made error, in OpenAI's envelope; never a stack trace."""
    if not isinstance(exc, RouterError):
        exc = _translate(request, exc)
    request_id = getattr(request.ctx, "request_id", None)
    headers = {"x-request-id": request_id or request.headers.get("x-request-id")
               or new_request_id()}
    headers.update(exc.headers)
    return HTTPResponse(exc.body(error_style(request.path), headers["x-request-id"]),
                        exc.status, headers, content_type=JSON)


def _translate(request: Request, exc: Exception) -> RouterError:
    status = getattr(exc, "status_code", 500) if isinstance(exc, SanicException) else 500
    if status == 404:
        return RouteNotFound(f"No route for {request.method} {request.path}.")
    if status == 405:
        return MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.")
    if status == 413:
        return PayloadTooLarge("The request body is larger than this router accepts.")
    if 400 <= status < 500:
        error = ClientError(str(exc) or "Bad request.")
        error.status = status
        return error
    log.exception("unexpected error on %s %s", request.method, request.path, exc_info=exc)
    return InternalError("The router failed to handle this request; see its logs.")
