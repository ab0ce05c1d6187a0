"""Batch lines through the request path: the same admission and relay as online traffic.

``RouterDispatcher`` implements ``router.batch.dispatch.Dispatcher``. A batch runs as the
API key that created it (``key_of``; its id is stored with the batch): each line is
checked and admitted with that key's ``Tenant``, looked up by id in the snapshot current
when the line runs, so a reload that removes a model, disables a group, narrows the key's
models or removes the key applies to running batches at once. Each line is charged to
the key's rate limits like an online request (a line over them answers 429, which the
batch retries with backoff). Its record (``origin`` ``batch``, the batch's key id) goes to
the metrics and the access log like an online request's, and to the limiter sink, which
replaces the token estimate with the usage the engine reported; batch lines are not
traced. Lines are relayed with the same balancing, health and retries.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from router.catalog import PROXIED
from router.errors import ModelNotFound, RouterError
from router.model_field import model_from_json
from router.proxy import Proxy, admit, new_request_id
from router.record import GEN_AI_OPERATIONS, Record
from router.relay import Capture, Outbound, forward
from router.tenants.errors import InvalidApiKey

if TYPE_CHECKING:
    from router.snapshot import Snapshot
    from router.tenants.keys import Tenant
    from router.upstream import Response

log = logging.getLogger("routeyard.dispatch")

_GROUP_OF = {path: r.group for r in PROXIED if r.method == "POST" and r.group is not None
             for path in r.paths}
_JSON = {"content-type": "application/json", "user-agent": "routeyard-batch"}


def batch_key(snapshot: Snapshot, key_id: str | None) -> Tenant | None:
    """The ``Tenant`` of the key a batch was created with, in ``snapshot`` (None when the
    snapshot has no ``auth:``: the router is open). ``InvalidApiKey`` (401) when the key is
    no longer configured, or the batch has no key on record (created while auth was off,
    or before keys were stored with batches): such a batch runs nothing under auth."""
    auth = snapshot.auth
    if auth is None:
        return None
    if key_id is None:
        raise InvalidApiKey("This batch was created without an API key on record (while "
                            "auth was off, or by an older routeyard); it cannot run under "
                            "auth. Create it again with your key.")
    key = auth.tenants.get(key_id)
    if key is None:
        raise InvalidApiKey(f"The API key `{key_id}` that created this batch is no longer "
                            "configured; its remaining requests are not sent.")
    return key


class RouterDispatcher:
    """Runs batch lines through one worker's request path."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def key_of(self, headers: Mapping[str, str]) -> str | None:
        auth = self.proxy.holder.current.auth
        if auth is None:
            return None
        return auth.authenticate(headers.get("authorization"), headers.get("x-api-key")).key_id

    def check(self, key: str | None, url: str, body: dict[str, Any]) -> str | None:
        snapshot = self.proxy.holder.current
        group = _GROUP_OF.get(url)
        if group is None:
            return f"routeyard does not route {url}."
        try:
            tenant = batch_key(snapshot, key)
        except RouterError as exc:
            return exc.message
        name = body.get("model")
        if not isinstance(name, str):
            return ModelNotFound(repr(name)).message
        model = snapshot.models.get(name)
        if model is None or (tenant is not None and not tenant.can_use(name)):
            return ModelNotFound(name).message  # as online: hidden is the same as absent
        if group not in model.groups:
            return (f"The endpoint {url} (group `{group}`) is not enabled for model "
                    f"`{model.name}`. Enabled groups: {', '.join(model.enabled)}.")
        return None

    async def dispatch(self, url: str, body: bytes, key: str | None) -> tuple[int, bytes]:
        proxy = self.proxy
        snapshot = proxy.holder.current
        group = _GROUP_OF.get(url, "")
        request_id = new_request_id()
        sinks = proxy.batch_sinks
        record = sinks.opened(Record(
            method="POST", path=url, headers=_JSON, group=group,
            operation=GEN_AI_OPERATIONS.get(group, group), request_id=request_id,
            t0=perf_counter(), bytes_in=len(body), origin="batch", key_id=key))
        try:
            tenant = batch_key(snapshot, key)
            name, data = model_from_json(body)
            admitted = await admit(snapshot, group, url, name, data, body, record,
                                   principal=tenant, limited=tenant, limiter=proxy.limiter,
                                   headers=_JSON)
            outbound = Outbound("POST", url, _JSON, admitted.body, request_id)
            outcome = record.outcome

            def deliver(response: Response, capture: Capture | None) -> Awaitable[bytes]:
                return _read(response, outcome)

            answer = await forward(admitted.model, outbound, outcome, deliver,
                                   trace=record.trace, key=admitted.key)
            result = outcome.status, answer
        except RouterError as exc:
            await _settled(sinks.settle(record, exc))
            return exc.status, exc.body()
        except BaseException as exc:
            await _settled(sinks.settle(record, exc))
            raise
        await _settled(sinks.settle(record, None))
        return result

    def pressure(self) -> float:
        """1.0 while any model has requests queued; else the fullest backend's share of
        its ``max_in_flight`` (0.0 where no backend has a limit)."""
        level = 0.0
        for model in self.proxy.holder.current.models.values():
            if model.cluster.waiters:
                return 1.0
            for endpoint in model.cluster.endpoints:
                if endpoint.max_in_flight:
                    level = max(level, endpoint.in_flight / endpoint.max_in_flight)
        return min(level, 1.0)


async def _settled(pending: Awaitable[None] | None) -> None:
    if pending is not None:
        await pending


async def _read(response: Response, outcome: Any) -> bytes:
    body = await response.read()
    outcome.body(body, "application/json")
    return body
