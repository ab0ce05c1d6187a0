"""Clusters: a model's backend endpoints and the choice of one for each request.

An ``Endpoint`` is one backend URL with its connection pool. Endpoints live in an
``EndpointRegistry`` keyed by URL so that a config reload keeps the pools (and, later,
the health state) of backends that stay, and closes those of backends that leave.
"""

from __future__ import annotations

from collections.abc import Iterable

from router.upstream import Origin, Pool


class Endpoint:
    """One backend: where it is and its pool of kept-alive connections."""

    __slots__ = ("in_flight", "origin", "pool", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self.origin = Origin.from_url(url)
        self.pool = Pool(self.origin)
        self.in_flight = 0


class Cluster:
    """The endpoints of one model; ``pick`` chooses one per request (round robin)."""

    __slots__ = ("_next", "endpoints")

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self._next = 0

    def pick(self) -> Endpoint:
        endpoints = self.endpoints
        if len(endpoints) == 1:
            return endpoints[0]
        self._next = (self._next + 1) % len(endpoints)
        return endpoints[self._next]


class EndpointRegistry:
    """Every endpoint this process knows, shared by successive config snapshots."""

    def __init__(self) -> None:
        self._by_url: dict[str, Endpoint] = {}

    def get(self, url: str) -> Endpoint:
        endpoint = self._by_url.get(url)
        if endpoint is None:
            endpoint = self._by_url[url] = Endpoint(url)
        return endpoint

    def retain(self, urls: set[str]) -> None:
        """Forget endpoints no longer configured; their idle connections close now and
        their in-flight requests finish on the connections they hold."""
        for url in list(self._by_url):
            if url not in urls:
                self._by_url.pop(url).pool.close()

    def close(self) -> None:
        self.retain(set())
