"""The listener: a Sanic app whose routes come from the catalog, and its lifecycle.

Each proxied route gets its handler from ``router.proxy`` (the request path's phases);
this module adds the router's own endpoints (health, readiness, ``/v1/models``, metrics;
the admin surface is ``router.admin``'s), builds each worker's pieces at start (snapshot,
sinks, limiter, health checks, batch) and closes them at stop, and turns any error into
the route's error envelope.
Its connections are ``router.listener.Listener``'s (``routeyard serve`` passes it to
Sanic): strict framing, deadlines, a connection limit, and ``gate``, which checks the key
before any body is read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson
from sanic import DefaultSanic, HTTPResponse, Request, Sanic
from sanic.exceptions import SanicException

from router import admin, logs
from router.catalog import BY_RESPONSE_ID, PROXIED, error_style
from router.config import load_file
from router.errors import (
    ClientError,
    InternalError,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
    RouterError,
)
from router.health import HealthChecker
from router.listener import Limits, Listener, configure, connection_limit
from router.proxy import Proxy, authenticate, new_request_id
from router.record import Sink
from router.reload import ConfigHolder
from router.scraper import Scraper
from router.settings import Settings
from router.stored_responses import ResponseIds
from router.tenants.errors import AdminKeyRequired, InvalidApiKey
from router.tenants.limits import build_limiter
from router.tracing import tracing_wanted

if TYPE_CHECKING:
    from router.metrics import Metrics
    from router.snapshot import Snapshot
    from router.tracing import Tracing

log = logging.getLogger("routeyard")
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class Worker:
    """What one worker process builds at server start and closes at stop."""

    metrics: Metrics | None = None
    tracing: Tracing | None = None
    sinks: list[Sink]
    checker: HealthChecker
    scraper: Scraper
    draining = False
    #: The worker's background loops (watch, health checks, DNS), cancelled at stop.
    #: Not ``app.add_task``: Sanic logs a warning for each of its tasks it cancels.
    tasks: tuple[asyncio.Task[None], ...] = ()

    def run(self, loop: asyncio.AbstractEventLoop, *loops: Coroutine[Any, Any, None]) -> None:
        self.tasks = tuple(loop.create_task(c) for c in loops)

    async def stop_tasks(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def create_app(settings: Settings | None = None) -> DefaultSanic:
    settings = settings or Settings()
    # Each worker is a fresh process: its logging is set up here, before anything logs.
    logs.configure(settings.log_level, settings.log_format)
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
    config = load_file(settings.config)  # this process's one parse of its first load
    holder = ConfigHolder(settings.config)
    proxy = Proxy(holder, ResponseIds())
    worker = Worker()
    app.ctx.proxy = proxy
    tracing = tracing_wanted(os.environ, settings.tracing)

    batch = None
    if config.batch is not None:
        from router.batch.api import register
        from router.batch.service import BatchService

        batch = BatchService(config.batch)
        if config.batch.max_file_bytes > settings.max_request_size:
            log.warning("uploads are limited to ROUTEYARD_MAX_REQUEST_SIZE (%d bytes with the "
                        "form), below batch.max_file_bytes (%d); raise the setting for larger "
                        "files", settings.max_request_size, config.batch.max_file_bytes)

        def tenant_of(request: Request) -> str | None:
            tenant = authenticate(holder.current, request)
            return tenant.tenant_id if tenant is not None else None

        register(app, batch, tenant_of)

    @app.before_server_start
    async def start(app: DefaultSanic) -> None:
        _check_protocol(app)
        _observers(worker, settings, tracing, app)
        metrics = worker.metrics
        if metrics is not None:
            holder.listeners.append(lambda result, snap: metrics.config_loaded(
                result, snap.config.sha256))
        if batch is not None:
            service = batch

            def batch_reloaded(result: str | None, snap: Snapshot) -> None:
                if result == "ok":
                    service.reconfigure(snap.config.batch)

            holder.listeners.append(batch_reloaded)
        # One worker of several logs reloads and DNS changes, at INFO and ERROR; the others
        # at DEBUG (each reloads the same file: one line per edit, not one per worker).
        holder.reports = logs.leads(logs.worker_name())
        await holder.load(config)
        if metrics is not None:
            metrics.start(app.loop, holder.sampled)
        limiter = build_limiter()
        proxy.start(limiter, worker.sinks, worker.tracing)
        worker.checker = HealthChecker(holder.registry.board, holder.registry.by_key.values,
                                       holder.health_settings)
        holder.install_sighup(app.loop)
        if batch is not None:
            from router.dispatch import RouterDispatcher

            await batch.start(RouterDispatcher(proxy))
            if metrics is not None:
                from router.batch.models import STATUSES

                metrics.watch_batches(batch, STATUSES)
        worker.scraper = Scraper(holder.registry.by_key.values)
        worker.run(app.loop, worker.checker.run(), worker.scraper.run(), holder.refresh_dns(),
                   *([holder.watch()] if settings.watch else []))

    @app.before_server_stop
    async def drain(app: DefaultSanic) -> None:
        worker.draining = True

    @app.after_server_stop
    async def stop(app: DefaultSanic) -> None:
        await worker.stop_tasks()
        if batch is not None:
            await batch.close(grace=settings.graceful_shutdown)
        await proxy.limiter.close()
        worker.checker.close()
        worker.scraper.close()
        holder.close()
        for sink in (*worker.sinks, worker.tracing):
            close = getattr(sink, "close", None)
            if close is not None:
                close()

    @app.main_process_ready
    async def forward_sighup(app: DefaultSanic) -> None:
        # With --workers N the manager process gets SIGHUP; every worker must reload.
        def _forward(signum: int, _frame: object) -> None:
            for process in app.manager.transient_processes:
                if process.pid:
                    os.kill(process.pid, signum)

        signal.signal(signal.SIGHUP, _forward)

    for route in PROXIED:
        handler = proxy.handler(route)
        for path in route.paths:
            app.add_route(handler, path, methods=[route.method], name=_name(path))

    for route in BY_RESPONSE_ID:
        for path in route.sanic_paths:
            app.add_route(proxy.stored_response, path, methods=[route.method],
                          name=_name(path.replace("<", "").replace(">", "")))

    @app.get("/v1/models")
    async def list_models(request: Request) -> HTTPResponse:
        snapshot = holder.current
        tenant = authenticate(snapshot, request)
        return HTTPResponse(snapshot.models_body_for(tenant), content_type=JSON)

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        return HTTPResponse(b'{"status":"ok"}', content_type=JSON)

    @app.get("/ready")
    async def ready(request: Request) -> HTTPResponse:
        """503 while draining; else by ``?models=``: ``all`` (default) needs a backend up
        for every model, ``any`` for at least one, ``none`` only a loaded config (the
        Kubernetes readiness probe: one model down must not empty the Service)."""
        if worker.draining:
            return HTTPResponse(b'{"status":"draining"}', 503, content_type=JSON)
        scope = request.args.get("models", "all")
        if scope not in ("all", "any", "none"):
            raise ClientError("`models` must be all, any or none.", param="models")
        models = holder.current.models.values()
        down = [m.name for m in models if not m.cluster.any_up()]
        if (scope == "all" and down) or (scope == "any" and len(down) == len(models)):
            body = orjson.dumps({"status": "not ready", "models_without_backend": down})
            return HTTPResponse(body, 503, content_type=JSON)
        return HTTPResponse(b'{"status":"ready"}', content_type=JSON)

    admin_routes = admin.register(app, holder, batch)

    def metrics_allowed(request: Request) -> None:
        """``/metrics`` needs an admin key with ``auth:``, unless ``auth.public_metrics``."""
        auth = holder.current.auth
        if auth is not None and not auth.public_metrics:
            admin.admin_only(holder, request)

    if settings.metrics:
        @app.get("/metrics")
        async def metrics(request: Request) -> HTTPResponse:
            assert worker.metrics is not None
            metrics_allowed(request)
            body = await worker.metrics.render()
            return HTTPResponse(body, content_type=PROMETHEUS)

    # Routes anyone may call, and the admin ones; every other route needs a key.
    open_routes = {f"{app.name}.{name}" for name in ("health", "ready")}
    metrics_route = f"{app.name}.metrics"
    # The endpoint group of each catalog route, for the records of refused keys.
    app.ctx.route_groups = {
        **{f"{app.name}.{_name(path)}": route.group
           for route in PROXIED for path in route.paths},
        **{f"{app.name}.{_name(path.replace('<', '').replace('>', ''))}": "responses"
           for route in BY_RESPONSE_ID for path in route.sanic_paths}}

    def gate(request: Request) -> None:
        """Before a body is read (``router.listener``): with ``auth:``, the route's key.
        The tenant is kept on the request, so the handler does not hash the key again."""
        snapshot = holder.current
        if snapshot.auth is None:
            return
        route = request.route
        name = route.name if route is not None else None
        if name in open_routes:
            return
        if name in admin_routes:
            admin.admin_only(holder, request)
            return
        if name == metrics_route:
            metrics_allowed(request)
            return
        authenticate(snapshot, request)

    configure(app, Limits(header_timeout=settings.request_header_timeout,
                          body_grace=settings.request_body_grace,
                          body_min_rate=settings.request_body_min_rate,
                          max_connections=connection_limit(settings.max_connections)), gate)
    app.error_handler.add(Exception, _error_response)
    return app


def _check_protocol(app: DefaultSanic) -> None:
    """Refuse to serve without ``Listener``: its checks are the only ones of the framing,
    the deadlines and the order of authentication and body."""
    protocols = [info.settings.get("protocol") for info in app.state.server_info]
    if not protocols or not all(isinstance(p, type) and issubclass(p, Listener)
                                for p in protocols):
        raise RuntimeError("routeyard must be served with protocol=router.listener.Listener "
                           f"(as `routeyard serve` does), not {protocols}")


def _observers(worker: Worker, settings: Settings, tracing: bool, app: DefaultSanic) -> None:
    """Metrics, the access log and tracing, each when on; made in each worker at start."""
    sinks: list[Sink] = []
    if settings.metrics:
        from router.metrics import Metrics

        worker.metrics = Metrics()
        sinks.append(worker.metrics)
    if settings.access_log:
        from router.accesslog import AccessLog

        access = AccessLog()
        access.start(app.loop)
        sinks.append(access)
    worker.sinks = sinks
    if tracing:
        from router.tracing import Tracing

        worker.tracing = Tracing(os.environ)


def _name(path: str) -> str:
    return "proxy" + path.replace("/", "_").replace("-", "_")


def _error_response(request: Request, exc: Exception) -> HTTPResponse:
    """Every router-made error, in OpenAI's envelope; never a stack trace."""
    if not isinstance(exc, RouterError):
        exc = _translate(request, exc)
    elif isinstance(exc, InvalidApiKey | AdminKeyRequired):
        _refused(request, exc)
    request_id = getattr(request.ctx, "request_id", None)
    headers = {"x-request-id": request_id or request.headers.get("x-request-id")
               or new_request_id()}
    headers.update(exc.headers)
    return HTTPResponse(exc.body(error_style(request.path), headers["x-request-id"]),
                        exc.status, headers, content_type=JSON)


def _refused(request: Request, exc: InvalidApiKey | AdminKeyRequired) -> None:
    """A refused key: no handler made a record for it (the key is checked before one is
    made, in the listener's gate or at a handler's start), so it gets one here."""
    proxy: Proxy = request.app.ctx.proxy
    route = request.route
    group = request.app.ctx.route_groups.get(route.name, "") if route is not None else ""
    key_id = exc.key_id if isinstance(exc, AdminKeyRequired) else None
    proxy.refused(request, group or "", exc, key_id)


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
