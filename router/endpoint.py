"""An endpoint: one backend address with its transport, its in-flight count and health.

Endpoints live in an ``EndpointRegistry`` keyed by address, so config reloads and DNS
refreshes keep the connections, in-flight counts and health of backends that stay.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from router.engine_load import EngineLoad, ScrapeSettings
from router.health import EngineModels, Health, HealthBoard
from router.prefix_index import PrefixIndexes
from router.upstream import Origin, Pool, Transport


class ClusterView(Protocol):
    """A cluster as its endpoints see it: its queue waits for their slots, it has a say in
    their ejection, and it knows the model name it sends (``router.cluster.Cluster``)."""

    @property
    def sent_name(self) -> str: ...

    @property
    def adapter_of(self) -> str | None: ...

    def served_changed(self, endpoint: Endpoint) -> None: ...

    def load_changed(self, endpoint: Endpoint) -> None: ...

    def wake_one(self, freed: Endpoint | None = None) -> None: ...

    def wake_all(self) -> None: ...

    def may_eject(self, endpoint: Endpoint) -> bool: ...

    def panics_for(self, endpoint: Endpoint) -> bool: ...

    def review(self) -> None: ...


class Endpoint:
    """One backend address: transport, in-flight count, health, engine load."""

    __slots__ = ("api_key_header", "clusters", "engine", "health", "in_flight", "key", "load",
                 "max_in_flight", "origin", "scrape", "transport", "url")

    def __init__(self, key: str, url: str, origin: Origin, transport: Transport,
                 board: HealthBoard) -> None:
        self.key = key
        self.url = url
        self.origin = origin
        self.transport = transport
        self.health = Health(key, board)
        #: The models the engine says it serves (read by the health checker).
        self.engine = EngineModels()
        #: What the engine's ``/metrics`` said last (read by ``router.scraper``).
        self.load = EngineLoad()
        #: How its ``/metrics`` is read; None: not read (no model routed here asks).
        self.scrape: ScrapeSettings | None = None
        self.in_flight = 0
        self.max_in_flight: int | None = None
        #: ``authorization: Bearer <engine key>\r\n`` when the engine runs with --api-key.
        self.api_key_header: str | None = None
        #: The clusters this endpoint is a member of, this snapshot's and those of older
        #: snapshots that requests in flight still hold: a slot freed here wakes them all.
        self.clusters: weakref.WeakSet[ClusterView] = weakref.WeakSet()

    @property
    def up(self) -> bool:
        """Healthy and not ejected: may get traffic (capacity permitting)."""
        return self.health.up

    @property
    def has_capacity(self) -> bool:
        return self.max_in_flight is None or self.in_flight < self.max_in_flight

    def may_eject(self) -> bool:
        """Whether outlier detection may eject this endpoint: only if every cluster it is a
        member of can spare it (``Cluster.may_eject``; see ``router.cluster``)."""
        return all(cluster.may_eject(self) for cluster in list(self.clusters))

    def review_waiver(self) -> None:
        """Waive this endpoint's ejection while a model it serves is in panic mode
        (``Cluster.review``); wake the queues it can serve once that makes it up."""
        clusters = list(self.clusters)
        if self.health.waive(any(cluster.panics_for(self) for cluster in clusters)):
            for cluster in clusters:
                cluster.wake_all()

    def wanted_models(self) -> frozenset[str]:
        """The model names the models routed here send (each its ``backend_model``); not
        the discovered adapters', which are routed here only while the engine lists them."""
        return frozenset(cluster.sent_name for cluster in list(self.clusters)
                         if cluster.adapter_of is None)

    def models_changed(self) -> None:
        """``engine.served`` was read anew: each model routed here reviews this endpoint."""
        for cluster in list(self.clusters):
            cluster.served_changed(self)

    def load_changed(self) -> None:
        """A scrape ended (read or failed): the models routed here look again."""
        for cluster in list(self.clusters):
            cluster.load_changed(self)

    def describe(self) -> dict[str, object]:
        return {
            "url": self.url,
            "address": f"{self.origin.host}:{self.origin.port}",
            **self.health.describe(),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "engine_load": self.load.describe(time.monotonic(), self.in_flight),
        }


@dataclass(frozen=True, slots=True)
class Member:
    """An endpoint as one model sees it: with that model's weight and limit for it."""

    endpoint: Endpoint
    weight: int
    max_in_flight: int | None = None
    api_key: str | None = None
    #: How the router names it to clients and in the admin view: the backend's ``name``,
    #: else its position in the model's list (``.n`` added for the n-th DNS address).
    name: str = ""


class EndpointRegistry:
    """Every endpoint this worker knows, shared by successive snapshots and DNS refreshes."""

    def __init__(self, transports: Callable[[Origin], Transport] = Pool,
                 board: HealthBoard | None = None) -> None:
        self.by_key: dict[str, Endpoint] = {}
        #: The ``cache_aware`` models' prefix indexes: kept across reloads, like endpoints.
        self.prefix_indexes = PrefixIndexes()
        self.transports = transports
        self.board = board or HealthBoard()
        self.board.listeners.append(self._health_changed)

    def _health_changed(self, health: Health, before: str, after: str) -> None:
        """The models of an endpoint that changed review their panic mode; an endpoint
        that may get traffic again wakes the queues that wait for one."""
        endpoint = self.by_key.get(health.key)
        if endpoint is None:
            return
        clusters = list(endpoint.clusters)
        for cluster in clusters:
            cluster.review()
        if health.up:
            for cluster in clusters:
                cluster.wake_all()

    def get(self, url: str, address: str | None = None) -> Endpoint:
        """The endpoint for ``url``, or for one resolved ``address`` of its host name."""
        key = url if address is None else f"{url}@{address}"
        endpoint = self.by_key.get(key)
        if endpoint is None:
            origin = Origin.from_url(url, address)
            endpoint = self.by_key[key] = Endpoint(key, url, origin, self.transports(origin),
                                                   self.board)
        return endpoint

    def retain(self, keys: set[str]) -> None:
        """Forget endpoints no longer used; their idle connections close now and their
        in-flight requests finish on the connections they hold."""
        for key in list(self.by_key):
            if key not in keys:
                self.by_key.pop(key).transport.close()

    def close(self) -> None:
        self.retain(set())
