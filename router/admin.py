"""The admin surface: ``GET /admin/backends``, ``/admin/config`` and ``/admin/status``.

Once ``auth:`` is configured each needs an admin key (``admin_only``; the listener's
``gate`` calls it before any body is read). The JSON views show the state now: a failure
streak that ended, a refused edit since followed by a good load, a DNS lookup that works
again are gone from them. Times are ISO-8601 in UTC. ``/admin/status`` renders the same
views as one HTML page (``router.status_page``), with the batches in progress when
``batch:`` is on.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import orjson
from sanic import DefaultSanic, HTTPResponse, Request

from router.isotime import iso
from router.reload import ConfigHolder
from router.status_page import render

if TYPE_CHECKING:
    from router.batch.service import BatchService
    from router.tenants.config import ResolvedAuth

JSON = "application/json"
HTML = "text/html; charset=utf-8"
#: The route names of the admin surface (the listener's gate asks for an admin key).
ROUTES = ("admin_backends", "admin_config", "admin_status")
#: The status page lists at most this many batches in progress, read within this time.
BATCHES_SHOWN = 50
BATCHES_TIMEOUT = 2.0


def admin_only(holder: ConfigHolder, request: Request) -> None:
    """``/admin/*`` needs an admin key once ``auth:`` is configured."""
    auth = holder.current.auth
    if auth is not None:
        headers = request.headers
        auth.authenticate_admin(headers.get("authorization"), headers.get("x-api-key"))


def backends_view(holder: ConfigHolder) -> dict[str, Any]:
    """Per model: policy, groups, in flight, queued, its backends, the reason of each
    DNS lookup of its backends that fails now, and with ``discover: true`` each adapter
    its engines list and the backends that list it."""
    snapshot = holder.current
    errors = holder.resolver.errors
    view: dict[str, Any] = {}
    for name, model in snapshot.models.items():
        cluster = model.cluster
        urls = [b.url for b in snapshot.config.models[name].backends if b.discovery == "dns"]
        view[name] = {"policy": cluster.config.policy, "groups": model.enabled,
                      "in_flight": cluster.in_flight, "queued": len(cluster.waiters),
                      "backends": cluster.describe(),
                      "discovery_errors": {u: errors[u] for u in urls if u in errors}}
        if cluster.config.discover:
            view[name]["adapters"] = {a: [m.name for m in c.members]
                                      for a, c in cluster.adapters.items()}
    return view


def config_view(holder: ConfigHolder) -> dict[str, Any]:
    """The active config, its keys' ids and limits (never keys or hashes), the reload
    counters, the latest loads and the reason of a refused edit not since superseded."""
    snapshot = holder.current
    return {
        **snapshot.summary(),
        "auth": _auth_view(snapshot.config.auth),
        "reloads": holder.reloads,
        "last_error": holder.last_error,
        "recent_reloads": [{"at": iso(at), "result": result, "sha256": sha, "error": error}
                           for at, result, sha, error in holder.history],
        "pid": os.getpid(),
    }


def _auth_view(auth: ResolvedAuth | None) -> dict[str, Any] | None:
    if auth is None:
        return None
    return {
        "keys": [{"id": k.id, "tenant": k.tenant, "models": list(k.models),
                  "limits": k.limits.model_dump(),
                  "model_limits": {pattern: limits.model_dump()
                                   for pattern, limits in k.model_limits}}
                 for k in auth.keys if not k.admin],
        "admin_keys": [k.id for k in auth.keys if k.admin],
    }


async def batches_view(batch: BatchService) -> list[dict[str, Any]] | str:
    """The batches in progress (created and ended times as ISO-8601), or why they could
    not be read in time."""
    try:
        found = await asyncio.wait_for(batch.active_batches(BATCHES_SHOWN), BATCHES_TIMEOUT)
    except TimeoutError:
        return f"the batch database did not answer within {BATCHES_TIMEOUT:g} s"
    except Exception as exc:  # whatever the database raised, the page shows it instead
        return f"{type(exc).__name__}: {exc}"
    return [{**b, "created_at": iso(b["created_at"])} for b in found]


def register(app: DefaultSanic, holder: ConfigHolder,
             batch: BatchService | None = None) -> frozenset[str]:
    """Add the admin routes to ``app``; returns their route names for the gate."""

    @app.get("/admin/backends")
    async def admin_backends(request: Request) -> HTTPResponse:
        admin_only(holder, request)
        return HTTPResponse(orjson.dumps(backends_view(holder)), content_type=JSON)

    @app.get("/admin/config")
    async def admin_config(request: Request) -> HTTPResponse:
        admin_only(holder, request)
        return HTTPResponse(orjson.dumps(config_view(holder)), content_type=JSON)

    @app.get("/admin/status")
    async def admin_status(request: Request) -> HTTPResponse:
        admin_only(holder, request)
        batches = await batches_view(batch) if batch is not None else None
        page = render(backends_view(holder), config_view(holder), batches, iso(time.time()))
        return HTTPResponse(page, content_type=HTML,
                            headers={"cache-control": "no-store"})

    return frozenset(f"{app.name}.{name}" for name in ROUTES)
