"""The routing core for requests that do not come from a client connection: batch lines.

``RouterDispatcher`` implements ``router.batch.Dispatcher`` on top of the same snapshot,
allowlists, per-key model access, load balancing, health and retries as online traffic.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from router.catalog import PROXIED
from router.errors import ModelNotFound, RouterError
from router.model_field import model_from_json, rewrite_json_model
from router.relay import build_head, exchange, new_request_id

if TYPE_CHECKING:
    from router.cluster import Endpoint
    from router.health import HealthMonitor
    from router.reload import ConfigHolder

log = logging.getLogger("routeyard.dispatch")

_GROUP_OF = {path: r.group for r in PROXIED if r.method == "POST" for path in r.paths}
_JSON = {"content-type": "application/json", "user-agent": "routeyard-batch"}


class RouterDispatcher:
    """Runs batch lines through one worker's routing core."""

    def __init__(self, holder: ConfigHolder, health: HealthMonitor) -> None:
        self.holder = holder
        self.health = health

    def check(self, tenant: str | None, url: str, body: dict) -> str | None:
        snapshot = self.holder.current
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

    async def dispatch(self, url: str, body: bytes) -> tuple[int, bytes]:
        snapshot = self.holder.current
        try:
            name, data = model_from_json(body)
            model = snapshot.models.get(name)
            if model is None:
                raise ModelNotFound(name)
            if model.backend_model:
                body = rewrite_json_model(body, model.backend_model)
            key = model.key_of({}, data) if model.key_of else None
            request_id, length = new_request_id(), len(body)

            def head(endpoint: Endpoint, trace: str | None) -> bytes:
                return build_head("POST", url, _JSON, endpoint, length, request_id, "", trace)

            endpoint, response = await exchange(
                model, head, body, key, snapshot.config.outlier_detection, self.health.eject,
            )
            try:
                return response.status, await response.read()
            finally:
                response.close()
                model.cluster.release(endpoint)
        except RouterError as exc:
            return exc.status, exc.body()

    def pressure(self) -> float:
        """1.0 while any model has requests queued; else the fullest backend's share of
        its ``max_in_flight`` (0.0 where no backend has a limit)."""
        level = 0.0
        for model in self.holder.current.models.values():
            if model.cluster.waiters:
                return 1.0
            for endpoint in model.cluster.endpoints:
                if endpoint.max_in_flight:
                    level = max(level, endpoint.in_flight / endpoint.max_in_flight)
        return min(level, 1.0)
