"""HTTP layer of the Files and Batch API: ``register(app, service, tenant_of)``.

Routes (all under ``/v1``): ``POST/GET /files``, ``GET/DELETE /files/<id>``,
``GET /files/<id>/content``, ``POST/GET /batches``, ``GET /batches/<id>``,
``POST /batches/<id>/cancel``. The upload route is a Sanic ``stream=True`` route and
content downloads are streamed, so neither holds a file in memory.

``tenant_of(request)`` names the caller's tenant (None when auth is off); it may be
async and may raise (e.g. a 401 RouterError), which is answered as is. Files and batches
belong to the tenant; a new batch also records the caller's API key, as the service's
dispatcher names it (``Dispatcher.key_of``), and its lines run with that key's rules.
Router errors leave in OpenAI's envelope from here, whatever the app's own error handler
does.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from sanic import DefaultSanic, HTTPResponse, Request

from router.batch.errors import FileNotFound
from router.batch.objects import ObjectMissing
from router.batch.service import BatchService
from router.batch.upload import receive
from router.errors import BadRequest, RouterError

log = logging.getLogger("routeyard.batch")
JSON = "application/json"
TenantOf = Callable[[Request], "str | Awaitable[str | None] | None"]
Handler = Callable[..., Awaitable[HTTPResponse | None]]


def _no_tenant(request: Request) -> None:
    return None


def _json(obj: Any, status: int = 200) -> HTTPResponse:
    return HTTPResponse(orjson.dumps(obj), status=status, content_type=JSON)


def _error(exc: RouterError) -> HTTPResponse:
    return HTTPResponse(exc.body(), exc.status, exc.headers, content_type=JSON)


def register(app: DefaultSanic, service: BatchService, tenant_of: TenantOf = _no_tenant, *,
             prefix: str = "/v1") -> None:
    """Add the Files and Batch routes to ``app``; call before the server starts."""

    async def tenant(request: Request) -> str | None:
        value = tenant_of(request)
        if inspect.isawaitable(value):
            value = await value
        return value

    def route(path: str, method: str, name: str, *, stream: bool = False
              ) -> Callable[[Handler], Handler]:
        def decorate(handler: Handler) -> Handler:
            @functools.wraps(handler)
            async def guarded(request: Request, **kwargs: Any) -> HTTPResponse | None:
                try:
                    return await handler(request, await tenant(request), **kwargs)
                except RouterError as exc:
                    return _error(exc)

            app.add_route(guarded, prefix + path, methods=[method], name=f"batch_api_{name}",
                          stream=stream)
            return guarded

        return decorate

    @route("/files", "POST", "upload_file", stream=True)
    async def upload_file(request: Request, who: str | None) -> HTTPResponse:
        return _json(await receive(request, service, who))

    @route("/files", "GET", "list_files")
    async def list_files(request: Request, who: str | None) -> HTTPResponse:
        args = request.args
        return _json(await service.list_files(who, args.get("purpose"), args.get("limit"),
                                              args.get("order"), args.get("after")))

    @route("/files/<file_id:str>", "GET", "get_file")
    async def get_file(request: Request, who: str | None, file_id: str) -> HTTPResponse:
        return _json(await service.get_file(who, file_id))

    @route("/files/<file_id:str>", "DELETE", "delete_file")
    async def delete_file(request: Request, who: str | None, file_id: str) -> HTTPResponse:
        return _json(await service.delete_file(who, file_id))

    @route("/files/<file_id:str>/content", "GET", "file_content")
    async def file_content(request: Request, who: str | None, file_id: str) -> None:
        size, chunks = await service.file_content(who, file_id)
        try:
            first = await anext(chunks, b"")
        except ObjectMissing:
            log.error("file %s: its object is missing from storage", file_id)
            raise FileNotFound(file_id) from None
        response = await request.respond(
            headers={"content-length": str(size)}, content_type="application/octet-stream")
        await response.send(first)
        async for chunk in chunks:
            await response.send(chunk)
        await response.eof()

    @route("/batches", "POST", "create_batch")
    async def create_batch(request: Request, who: str | None) -> HTTPResponse:
        try:
            params = orjson.loads(request.body or b"")
        except orjson.JSONDecodeError:
            raise BadRequest("The body must be JSON: {\"input_file_id\", \"endpoint\", "
                             "\"completion_window\"}.") from None
        key = service.key_of(request.headers)
        return _json(await service.create_batch(who, params, key))

    @route("/batches", "GET", "list_batches")
    async def list_batches(request: Request, who: str | None) -> HTTPResponse:
        args = request.args
        return _json(await service.list_batches(who, args.get("after"), args.get("limit")))

    @route("/batches/<batch_id:str>", "GET", "get_batch")
    async def get_batch(request: Request, who: str | None, batch_id: str) -> HTTPResponse:
        return _json(await service.get_batch(who, batch_id))

    @route("/batches/<batch_id:str>/cancel", "POST", "cancel_batch")
    async def cancel_batch(request: Request, who: str | None, batch_id: str) -> HTTPResponse:
        return _json(await service.cancel_batch(who, batch_id))
