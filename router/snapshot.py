"""The immutable snapshot a request is matched against: config plus bound clusters.

Everything a request needs that can be computed once per config load is computed here:
allowlists as frozensets, timeouts as floats, the /v1/models body, the balancing key
function. A request takes one reference to the current snapshot and keeps it to the end,
so a reload never changes a request halfway. (Cluster membership alone may change under a
snapshot, when a DNS refresh swaps in a new member set, and so may the adapters of a
``discover: true`` model, as its engines load and unload them: ``adapters``.)
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from router.cluster import AdapterCluster, Cluster
from router.config import ModelConfig, Retries, RoutesConfig
from router.discovery import Resolver, apply_limits
from router.endpoint import EndpointRegistry
from router.isotime import iso
from router.tenants.keys import Authenticator, Tenant
from router.upstream import Timeouts

#: Reads the balancing key (session id or prompt prefix) from headers and parsed body.
KeyFunction = Callable[[Any, dict[str, Any]], str | None]

log = logging.getLogger("routeyard.snapshot")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    groups: frozenset[str]
    enabled: list[str]
    backend_model: str | None
    cluster: Cluster
    key_of: KeyFunction | None
    retries: Retries
    timeouts: Timeouts
    max_body_size: int
    #: A discovered adapter's base model (its public name); None for a configured model.
    parent: str | None = None


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Snapshot:
    config: RoutesConfig
    models: dict[str, ModelEntry]
    loaded_at: float
    #: None when routes.yaml has no ``auth:`` block (the router is open).
    auth: Authenticator | None = None
    #: The adapters the ``discover: true`` models' engines list now, by id: each the base
    #: model's entry with the adapter's cluster (``discovered`` keeps it current).
    adapters: dict[str, ModelEntry] = field(default_factory=dict)
    #: /v1/models bodies per key id (None: no key), made on first use and again after the
    #: adapters changed (keys see only their models).
    models_bodies: dict[str | None, bytes] = field(default_factory=dict)
    #: Adapter ids not routed as adapters because a model already has the name (logged once).
    shadowed: set[str] = field(default_factory=set)

    def models_body_for(self, tenant: Tenant | None) -> bytes:
        key = None if tenant is None else tenant.key_id
        body = self.models_bodies.get(key)
        if body is None:
            entries: Iterable[ModelEntry] = [*self.models.values(), *self.adapters.values()]
            if tenant is not None:
                entries = [e for e in entries if tenant.can_use(e.name)]
            body = self.models_bodies[key] = _models_body(entries, self.loaded_at)
        return body

    @property
    def models_body(self) -> bytes:
        """``/v1/models`` without a key: every model and discovered adapter."""
        return self.models_body_for(None)

    def discovered(self) -> None:
        """A ``discover: true`` model's adapters changed: route each adapter id with its base
        model's settings and allowlist, unless a configured model (or an adapter of a model
        listed earlier) has the name, and list them anew."""
        adapters: dict[str, ModelEntry] = {}
        for entry in self.models.values():
            for name, cluster in entry.cluster.adapters.items():
                taken = self.models.get(name) or adapters.get(name)
                if taken is not None:
                    if name not in self.shadowed:
                        self.shadowed.add(name)
                        owner = (f"adapter of model {taken.parent}" if taken.parent
                                 else "configured model")
                        log.warning("adapter %s of model %s is not routed as an adapter: the "
                                    "%s of that name is", name, entry.name, owner)
                    continue
                adapters[name] = replace(entry, name=name, backend_model=None,
                                         cluster=cluster, parent=entry.name)
        self.adapters.clear()
        self.adapters.update(adapters)
        self.models_bodies.clear()

    @property
    def fingerprint(self) -> tuple[str, str | None]:
        """What a reload compares: the routes file and the keys it points at."""
        return self.config.sha256, self.auth.fingerprint if self.auth else None

    def endpoint_keys(self) -> set[str]:
        return {e.key for m in self.models.values() for e in m.cluster.endpoints}

    def summary(self) -> dict[str, object]:
        return {
            "sha256": self.config.sha256,
            "source": self.config.source,
            "loaded_at": iso(self.loaded_at),
            "models": {
                name: {
                    "backends": [b.url for b in self.config.models[name].backends],
                    "endpoints": m.enabled,
                    "backend_model": m.backend_model,
                    "policy": self.config.models[name].policy,
                    "timeouts": {
                        "connect": m.timeouts.connect,
                        "first_byte": m.timeouts.first_byte,
                        "idle": m.timeouts.idle,
                    },
                    "max_body_size": m.max_body_size,
                }
                for name, m in self.models.items()
            },
        }


async def build(config: RoutesConfig, registry: EndpointRegistry, resolver: Resolver) -> Snapshot:
    """Bind a validated config to endpoints (reusing those that stay) and freeze it."""
    loaded_at = time.time()
    models = {}
    indexes = registry.prefix_indexes
    for name, model in config.models.items():
        members = await resolver.members(model, registry)
        index = (indexes.get(name, model.prefix.index_blocks)
                 if model.policy == "cache_aware" else None)
        cluster = Cluster(model, members, config.outlier_detection, index)
        models[name] = _entry(model, cluster)
    indexes.retain(n for n, m in config.models.items() if m.policy == "cache_aware")
    apply_limits(m.cluster for m in models.values())
    auth = Authenticator(config.auth) if config.auth is not None else None
    snap = Snapshot(config=config, models=models, loaded_at=loaded_at, auth=auth)
    held = weakref.ref(snap)  # no cycle: an old snapshot's clusters go with its last request

    def discovered() -> None:
        current = held()
        if current is not None:
            current.discovered()

    for entry in models.values():
        if entry.cluster.config.discover:
            entry.cluster.adapters_changed = discovered
    snap.discovered()
    registry.retain(snap.endpoint_keys())
    return snap


def _models_body(entries: Iterable[ModelEntry], loaded_at: float) -> bytes:
    """OpenAI's model list; an adapter's card has ``parent`` (its base model) and ``root``
    (the engine's, its path in vLLM), as vLLM lists adapters."""
    created = int(loaded_at)
    cards: list[dict[str, Any]] = []
    for entry in entries:
        card: dict[str, Any] = {"id": entry.name, "object": "model", "created": created,
                                "owned_by": "routeyard"}
        cluster = entry.cluster
        if entry.parent is not None and isinstance(cluster, AdapterCluster):
            card.update(root=cluster.root, parent=entry.parent)
        cards.append(card)
    return orjson.dumps({"object": "list", "data": cards})


def _entry(m: ModelConfig, cluster: Cluster) -> ModelEntry:
    return ModelEntry(
        name=m.name,
        groups=m.endpoints,
        enabled=sorted(m.endpoints),
        backend_model=m.backend_model if m.backend_model != m.name else None,
        cluster=cluster,
        key_of=_key_function(m),
        retries=m.retries,
        timeouts=Timeouts(m.timeouts.connect, m.timeouts.first_byte, m.timeouts.idle),
        max_body_size=m.max_body_size,
    )


def _key_function(m: ModelConfig) -> KeyFunction | None:
    """The balancing key: the session id for ``session`` (and ``load_aware`` with a
    ``session`` weight), the prompt's first ``prefix.chars`` characters for ``prefix`` (and
    ``cache_aware`` with a ``prefix`` weight)."""
    weights = m.scoring.weights
    if m.policy == "session" or (m.policy == "load_aware" and weights.session):
        header = m.session.header.lower()

        def session_key(headers: Any, body: dict[str, Any]) -> str | None:
            key = headers.get(header) or body.get("user")
            return key if isinstance(key, str) and key else None

        return session_key
    if m.policy == "prefix" or (m.policy == "cache_aware" and weights.prefix):
        chars = m.prefix.chars

        def prefix_key(headers: Any, body: dict[str, Any]) -> str | None:
            return prompt_prefix(body, chars) or None

        return prefix_key
    return None


def prompt_prefix(body: dict[str, Any], chars: int) -> str:
    """The first ``chars`` characters of the prompt: chat messages (role and text parts),
    a completion prompt (string, list of strings or token ids), or embedding input."""
    parts: list[str] = []
    size = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            text = f"{message.get('role', '')}:{content or ''}\n"
            parts.append(text)
            size += len(text)
            if size >= chars:
                break
    else:
        prompt = body.get("prompt", body.get("input"))
        if prompt is None:
            return ""  # rerank, score: no prompt to place by
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0] if isinstance(prompt[0], str | list) else prompt
        parts.append(prompt if isinstance(prompt, str) else str(prompt)[: chars * 4])
    return "".join(parts)[:chars]
