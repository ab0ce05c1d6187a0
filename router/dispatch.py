"""Batch lines through the request path: the same admission and relay as online traffic.

``RouterDispatcher`` implements ``router.batch.dispatch.Dispatcher``. Each line is
admitted on the snapshot current when it runs (so a reload that removes a model or
disables a group applies to running batches at once), relayed with the same balancing,
health and retries. Their records go to the limiter only (batch lines are not yet in
the request metrics or the access log).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from router.catalog import PROXIED
from router.errors import RouterError
from router.model_field import model_from_json
from router.proxy import Proxy, admit, new_request_id
from router.record import GEN_AI_OPERATIONS, Record
from router.relay import Capture, Outbound, forward

if TYPE_CHECKING:
    from router.snapshot import Snapshot
    from router.upstream import Response

log = logging.getLogger("routeyard.dispatch")

_GROUP_OF = {path: r.group for r in PROXIED if r.method == "POST" and r.group is not None
             for path in r.paths}
_JSON = {"content-type": "application/json", "user-agent": "routeyard-batch"}


class BatchTenant:
    """A batch's owner: batch lines carry the tenant id only, so any key of that tenant
    may use the model."""

    __slots__ = ("snapshot", "tenant_id")

    def __init__(self, snapshot: Snapshot, tenant_id: str) -> None:
        self.snapshot = snapshot
        self.tenant_id = tenant_id

    def can_use(self, model: str) -> bool:
        return self.snapshot.tenant_can_use(self.tenant_id, model)


class RouterDispatcher:
    """Runs batch lines through one worker's request path."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def check(self, tenant: str | None, url: str, body: dict[str, Any]) -> str | None:
        snapshot = self.proxy.holder.current
        group = _GROUP_OF.get(url)
        if group is None:
            return f"routeyard does not route {url}."
        name = body.get("model")
        model = snapshot.models.get(name) if isinstance(name, str) else None
        if model is None or not snapshot.tenant_can_use(tenant, model.name):
            return f"The model `{name}` does not exist."
        if group not in model.groups:
            return (f"The endpoint {url} (group `{group}`) is not enabled for model "
                    f"`{model.name}`. Enabled groups: {', '.join(model.enabled)}.")
        return None

    async def dispatch(self, url: str, body: bytes, tenant: str | None) -> tuple[int, bytes]:
        proxy = self.proxy
        snapshot = proxy.holder.current
        group = _GROUP_OF.get(url, "")
        request_id = new_request_id()
        sinks = proxy.batch_sinks
        record = sinks.opened(Record(
            method="POST", path=url, headers=_JSON, group=group,
            operation=GEN_AI_OPERATIONS.get(group, group), request_id=request_id,
            t0=perf_counter(), bytes_in=len(body), origin="batch"))
        try:
            name, data = model_from_json(body)
            principal = BatchTenant(snapshot, tenant) if tenant else None
            admitted = await admit(snapshot, group, url, name, data, body, record,
                                   principal=principal, limited=None, limiter=proxy.limiter,
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
