"""The phases of a proxied request, in the order they run.

1. **check the head** (``check_head``): the request gets its id (``router.listener``
   refused a head that is not strict HTTP/1.1 before Sanic parsed it, and checked the key
   before the body was read).
2. **admit** (``admit``): the model exists and this key may see it, the route's group is
   in its allowlist, the body fits, the tenant's limits have room; the body gets the
   backend's model name; the balancing key and any placement are worked out.
3. **relay** (``router.relay.forward``): an endpoint is picked and held, the request sent
   and retried before the first byte, the answer relayed.
4. **settle** (``Sinks.settle``): the request's ``Record`` goes to metrics, traces, the
   access log and the limiter, however the request ended.

``Proxy.handler`` binds the phases to one catalog route for the listener; batch lines run
the same ``admit`` and ``forward`` through ``router.dispatch``.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from router.catalog import ModelSource, Route
from router.errors import (
    ClientError,
    EndpointNotEnabled,
    ModelNotFound,
    PayloadTooLarge,
    ResponseNotFound,
    RouterError,
    shown,
    stream_error_event,
)
from router.model_field import (
    Form,
    model_from_json,
    read_form,
    rewrite_form_model,
    rewrite_json_model,
)
from router.record import GEN_AI_OPERATIONS, Record, Sink, Sinks, Tracer
from router.relay import Capture, Outbound, Placement, forward, send_answer
from router.stored_responses import RESPONSES_CREATE, ResponseIds, forward_stored
from router.tenants.limits import estimate_tokens

if TYPE_CHECKING:
    from sanic import Request

    from router.reload import ConfigHolder
    from router.snapshot import ModelEntry, Snapshot
    from router.tenants.keys import Authenticator, Tenant
    from router.tenants.limits import Limiter
    from router.upstream import Response

_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A unique id without a syscall per request: a random per-process prefix and a counter."""
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


# -- 1. check the head ---------------------------------------------------------------------
def check_head(request: Request) -> str:
    """The request's id: the client's ``x-request-id``, or a new one.

    The head itself was checked before Sanic parsed it: ``router.listener`` passes every
    byte through llhttp, which refuses (400) a bare CR or LF, a NUL or other control in a
    value, obs-fold, names that are not tokens, and lengths that are not plain digits, so
    nothing here can smuggle a header line to the engine or split the answer."""
    request_id: str = request.headers.get("x-request-id") or new_request_id()
    request.ctx.request_id = request_id
    return request_id


def authenticate(snapshot: Snapshot, request: Request) -> Tenant | None:
    """The request's tenant when ``auth:`` is configured (401 without a valid key).

    Once per request and config: the listener's gate calls this before the body is read,
    and the handler's call then finds the answer on the request."""
    auth = snapshot.auth
    if auth is None:
        return None
    ctx = request.ctx
    checked: tuple[Authenticator, Tenant] | None = getattr(ctx, "auth", None)
    if checked is not None and checked[0] is auth:
        return checked[1]
    headers = request.headers
    tenant = auth.authenticate(headers.get("authorization"), headers.get("x-api-key"))
    ctx.auth = (auth, tenant)
    return tenant


# -- 2. admit ------------------------------------------------------------------------------
class Principal(Protocol):
    """Who is asking, as far as model access goes (a key's ``Tenant``, or a batch's)."""

    def can_use(self, model: str) -> bool: ...


@dataclass(slots=True)
class Admitted:
    """A request that may go to ``model``'s endpoints, as it will be sent."""

    model: ModelEntry
    body: bytes
    #: The balancing key (session, prompt prefix), for the policies that use one.
    key: str | None
    placement: Placement | None
    #: Headers for the answer (the rate-limit headers of the key).
    headers: list[tuple[str, str]] | None


async def admit(
    snapshot: Snapshot, group: str, path: str, name: str, data: dict[str, Any], body: bytes,
    record: Record, *, principal: Principal | None, limited: Tenant | None,
    limiter: Limiter, headers: Mapping[str, str], form: Form | None = None,
    placement: Callable[[str, dict[str, Any]], Placement] | None = None,
) -> Admitted:
    """Admit a request for model ``name`` on ``group`` (``data``: its parsed body).

    ``principal`` limits the models it may see (an unknown and a hidden model both get
    404); ``limited`` is the key whose rate limits it is charged to; ``form`` is the
    multipart form the body holds (audio routes), else the body is JSON."""
    model = snapshot.models.get(name) or snapshot.adapters.get(name)
    if principal is not None and not principal.can_use(name):
        model = None  # do not reveal models this key may not see
    if model is None:
        record.model = shown(name)  # a client's name may be a megabyte: logs quote it short
        raise ModelNotFound(name)
    record.model = name
    record.label_model = model.name
    record.backend_model = model.backend_model
    if group not in model.groups:
        raise EndpointNotEnabled(name, group, path, model.enabled)
    if len(body) > model.max_body_size:
        raise PayloadTooLarge(
            f"The request body is {len(body)} bytes; model `{name}` accepts at most "
            f"{model.max_body_size} (max_body_size in routes.yaml)."
        )
    if model.backend_model:
        if form is not None:
            body = rewrite_form_model(body, form, model.backend_model)
        else:
            body = rewrite_json_model(body, model.backend_model)
    answer_headers = None
    if limited is not None:
        estimate = estimate_tokens(0 if form is not None else len(body), data)
        admission = record.admission = await limiter.admit(limited, name, estimate)
        answer_headers = list(admission.headers.items())
    key = model.key_of(headers, data) if model.key_of else None
    placed = placement(model.name, data) if placement is not None else None
    return Admitted(model, body, key, placed, answer_headers)


# -- the handlers ------------------------------------------------------------------------------
Handler = Callable[["Request"], Coroutine[Any, Any, None]]


class Proxy:
    """The request path of one worker: its config, limiter, sinks and stored-answer map."""

    limiter: Limiter
    #: The sinks of requests no key is charged for, and of those a key is (the limiter
    #: reads those too).
    sinks: Sinks
    limited_sinks: Sinks
    #: Batch lines' records: metrics, access log and limiter (no traces).
    batch_sinks: Sinks
    tracing = False

    def __init__(self, holder: ConfigHolder, stored: ResponseIds) -> None:
        self.holder = holder
        self.stored = stored

    def start(self, limiter: Limiter, sinks: Sequence[Sink], tracer: Tracer | None) -> None:
        """At server start, in the worker: the limiter, the sinks and the tracer."""
        self.limiter = limiter
        self.sinks = Sinks(sinks, tracer)
        self.limited_sinks = Sinks([*sinks, LimiterSink(limiter)], tracer)
        self.batch_sinks = Sinks([*sinks, LimiterSink(limiter)])
        self.tracing = tracer is not None

    def _record(self, request: Request, group: str, operation: str, request_id: str,
                tenant: Tenant | None, reads_usage: bool = True) -> Record:
        conn = request.conn_info
        # Sanic stamps the end of the request head; the body was read after it.
        t0 = getattr(request.stream, "perft0", 0.0) or perf_counter()
        record = Record(request.method, request.path, request.headers, group, operation,
                        request_id, t0, len(request.body),
                        conn.client_ip if conn is not None else None,
                        request.scheme if self.tracing else "http", "online", reads_usage,
                        tenant.key_id if tenant is not None else None)
        if self.tracing:
            self.sinks.opened(record)
        return record

    def refused(self, request: Request, group: str, exc: RouterError,
                key_id: str | None) -> None:
        """An answer the key check gave before any handler made a record (401, 403: in the
        listener's gate, or on a route of the router's own): it is counted, logged and
        traced like any router-made error. ``group`` is the route's endpoint group (empty
        for the router's own routes)."""
        request_id = getattr(request.ctx, "request_id", None) or check_head(request)
        record = self._record(request, group, GEN_AI_OPERATIONS.get(group, group), request_id,
                              None)
        record.key_id = key_id
        self.sinks.settle(record, exc)  # no admission: nothing to await

    def handler(self, route: Route) -> Handler:
        """The handler of one catalog route: its group and model source are constants."""
        group = route.group
        assert group is not None
        from_form = route.model is ModelSource.FORM
        stream_error = stream_error_event(route)
        operation = GEN_AI_OPERATIONS.get(group, group)
        placement = self.stored.placement if route.path == RESPONSES_CREATE else None

        async def proxy(request: Request) -> None:
            request_id = check_head(request)
            snapshot = self.holder.current
            body = request.body
            tenant = authenticate(snapshot, request)
            record = self._record(request, group, operation, request_id, tenant)
            sinks = self.sinks if tenant is None else self.limited_sinks
            try:
                form = None
                if from_form:
                    form = read_form(body, request.headers.get("content-type", ""))
                    name, data = form.model, dict(form.fields)
                else:
                    name, data = model_from_json(body)
                admitted = await admit(
                    snapshot, group, request.path, name, data, body, record, principal=tenant,
                    limited=tenant, limiter=self.limiter, headers=request.headers,
                    form=form, placement=placement)
                outbound = _outbound(request, admitted.body, record, tenant is not None)
                outcome = record.outcome

                def deliver(response: Response, capture: Capture | None) -> Awaitable[None]:
                    return send_answer(request, response, outcome, request_id, stream_error,
                                       admitted.headers, capture)

                await forward(admitted.model, outbound, outcome, deliver, trace=record.trace,
                              key=admitted.key, placement=admitted.placement)
            except BaseException as exc:
                pending = sinks.settle(record, exc)
                if pending is not None:
                    await pending
                raise
            # the answer went out inside forward: this runs after the client has it
            pending = sinks.settle(record, None)
            if pending is not None:
                await pending

        return proxy

    async def stored_response(self, request: Request, response_id: str) -> None:
        """``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel``: no model in
        the request, so the answer's backend comes from the stored-answer map."""
        request_id = check_head(request)
        snapshot = self.holder.current
        tenant = authenticate(snapshot, request)
        if not response_id.startswith("resp"):
            raise ClientError(f"Invalid 'response_id': '{response_id}'. Expected an ID that "
                              "begins with 'resp'.", param="response_id")
        models = [m for m in (*snapshot.models.values(), *snapshot.adapters.values())
                  if "responses" in m.groups and (tenant is None or tenant.can_use(m.name))]
        # its tokens were counted when the answer was made
        record = self._record(request, "responses", "retrieve_response", request_id, tenant,
                              reads_usage=False)
        try:
            if not models:
                raise ResponseNotFound(response_id)
            holders = self.stored.holders(response_id, models)
            if tenant is not None:  # a lookup counts toward the key's request rate
                record.admission = await self.limiter.admit(tenant, holders[0][0].name, 0)
            outbound = _outbound(request, request.body, record, tenant is not None)
            outcome = record.outcome

            def deliver(response: Response, capture: Capture | None) -> Awaitable[None]:
                return send_answer(request, response, outcome, request_id, None)

            def matched(model: ModelEntry) -> None:
                record.model = record.label_model = model.name
                record.backend_model = model.backend_model

            await forward_stored(response_id, holders, self.stored, outbound, outcome,
                                 deliver, matched, trace=record.trace)
        except BaseException as exc:
            pending = self.limited_sinks.settle(record, exc)
            if pending is not None:
                await pending
            raise
        pending = self.limited_sinks.settle(record, None)
        if pending is not None:
            await pending


def _outbound(request: Request, body: bytes, record: Record, strip_keys: bool) -> Outbound:
    """The client's request as it goes to the engine, with ``body`` (rewritten or not)."""
    return Outbound(request.method, _canonical_target(request), request.headers, body,
                    record.request_id, record.client_ip or "", strip_keys)


def _canonical_target(request: Request) -> str:
    """The request target the engine gets. A route matches with or without a trailing
    slash; the engine gets the catalog's spelling (vLLM would answer a redirect)."""
    target = request.raw_url.decode("latin-1")
    if not request.path.endswith("/"):
        return target
    path, sep, query = target.partition("?")
    return path.rstrip("/") + sep + query


class LimiterSink:
    """The tenant limiter as a sink: the estimate charged at admission is replaced by
    the usage the answer reported (kept when the request failed)."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    def finish(self, record: Record) -> Awaitable[None] | None:
        if record.admission is None:
            return None
        outcome = record.outcome
        used = None if record.failed else outcome.tokens if outcome.reads_usage else 0
        return self.limiter.record(record.admission, used)
