"""The immutable snapshot a request is matched against: config plus bound clusters.

Everything a request needs that can be computed once per config load is computed here:
allowlists as frozensets, timeouts as floats, the /v1/models body, the Host header.
A request takes one reference to the current snapshot and keeps it to the end, so a
reload never changes a request halfway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson

from router.cluster import Cluster, EndpointRegistry
from router.config import ModelConfig, RoutesConfig


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    groups: frozenset[str]
    enabled: list[str]
    backend_model: str | None
    cluster: Cluster
    connect_timeout: float
    first_byte_timeout: float
    idle_timeout: float
    max_body_size: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: RoutesConfig
    models: dict[str, ModelEntry]
    loaded_at: float
    models_body: bytes

    def summary(self) -> dict[str, object]:
        return {
            "sha256": self.config.sha256,
            "source": self.config.source,
            "loaded_at": self.loaded_at,
            "models": {
                name: {
                    "backends": [e.url for e in m.cluster.endpoints],
                    "endpoints": m.enabled,
                    "backend_model": m.backend_model,
                    "timeouts": {
                        "connect": m.connect_timeout,
                        "first_byte": m.first_byte_timeout,
                        "idle": m.idle_timeout,
                    },
                    "max_body_size": m.max_body_size,
                }
                for name, m in self.models.items()
            },
        }


def build(config: RoutesConfig, registry: EndpointRegistry) -> Snapshot:
    """Bind a validated config to endpoints (reusing those that stay) and freeze it."""
    loaded_at = time.time()
    models = {name: _entry(m, registry) for name, m in config.models.items()}
    registry.retain({e.url for m in models.values() for e in m.cluster.endpoints})
    cards = [
        {"id": name, "object": "model", "created": int(loaded_at), "owned_by": "routeyard"}
        for name in models
    ]
    body = orjson.dumps({"object": "list", "data": cards})
    return Snapshot(config=config, models=models, loaded_at=loaded_at, models_body=body)


def _entry(m: ModelConfig, registry: EndpointRegistry) -> ModelEntry:
    return ModelEntry(
        name=m.name,
        groups=m.endpoints,
        enabled=sorted(m.endpoints),
        backend_model=m.backend_model if m.backend_model != m.name else None,
        cluster=Cluster(registry.get(b.url) for b in m.backends),
        connect_timeout=m.timeouts.connect,
        first_byte_timeout=m.timeouts.first_byte,
        idle_timeout=m.timeouts.idle,
        max_body_size=m.max_body_size,
    )
