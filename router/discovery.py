"""Backend discovery: a static URL is one endpoint; a DNS backend is one per address.

``discovery: dns`` resolves the URL's host name to every address behind it (a Kubernetes
headless Service lists one per ready pod) and re-resolves it every ``dns_refresh``. Pods
that appear get traffic; pods that vanish get no new requests and finish those in flight.
A failed lookup keeps the last good answer, and its reason is kept for the admin view
until a lookup succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import urlsplit

from router.config import ModelConfig
from router.endpoint import Endpoint, EndpointRegistry, Member
from router.engine_load import ScrapeSettings

log = logging.getLogger("routeyard.discovery")


class HasMembers(Protocol):
    """A model's cluster, as far as endpoint limits go."""

    @property
    def members(self) -> tuple[Member, ...]: ...

    @property
    def config(self) -> ModelConfig: ...


class Resolver:
    """Resolves DNS backends, remembering the last good answer per URL, and why the last
    lookup failed (until one succeeds)."""

    def __init__(self) -> None:
        self.last: dict[str, list[str]] = {}
        self.errors: dict[str, str] = {}

    async def addresses(self, url: str) -> list[str]:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve %s (keeping %d known addresses): %s",
                        url, len(self.last.get(url, [])), exc)
            self.errors[url] = f"cannot resolve {parts.hostname}: {exc}"
            return self.last.get(url, [])
        self.errors.pop(url, None)
        found = sorted({str(info[4][0]) for info in infos})
        if found != self.last.get(url):
            log.debug("%s resolves to %s", url, ", ".join(found) or "nothing")
        self.last[url] = found
        return found

    async def members(self, model: ModelConfig, registry: EndpointRegistry) -> list[Member]:
        members = []
        for i, backend in enumerate(model.backends):
            name = backend.name or str(i)
            if backend.discovery == "dns":
                addresses = await self.addresses(backend.url)
                named = [(registry.get(backend.url, a), f"{name}.{j}")
                         for j, a in enumerate(addresses)]
            else:
                named = [(registry.get(backend.url), name)]
            members += [Member(e, backend.weight, backend.max_in_flight, backend.api_key, n)
                        for e, n in named]
        return members


def apply_limits(clusters: Iterable[HasMembers]) -> None:
    """Set each endpoint's ``max_in_flight`` (the smallest any model declares for it: a
    backend listed by two models has one capacity), its engine API key, and how its
    ``/metrics`` is read (for the models that read it: the shortest interval and timeout,
    the first model's path), and whether its ``/v1/models`` is read at every health check
    (a model routed there has ``discover: true``)."""
    limits: dict[Endpoint, int | None] = {}
    keys: dict[Endpoint, str | None] = {}
    scrapes: dict[Endpoint, ScrapeSettings] = {}
    discovers: set[Endpoint] = set()
    for cluster in clusters:
        config = cluster.config
        wanted = config.engine_metrics if config.scrapes else None
        if config.discover:
            discovers.update(m.endpoint for m in cluster.members)
        for member in cluster.members:
            if wanted is not None:
                had = scrapes.get(member.endpoint)
                scrapes[member.endpoint] = ScrapeSettings(
                    had.path if had else wanted.path,
                    min(had.interval, wanted.interval) if had else wanted.interval,
                    min(had.timeout, wanted.timeout) if had else wanted.timeout)
            old, new = limits.get(member.endpoint), member.max_in_flight
            limits[member.endpoint] = new if old is None else old if new is None else min(old, new)
            keys[member.endpoint] = keys.get(member.endpoint) or member.api_key
    for endpoint, limit in limits.items():
        endpoint.max_in_flight = limit
        endpoint.scrape = scrapes.get(endpoint)
        endpoint.engine.discover = endpoint in discovers
        key = keys.get(endpoint)
        endpoint.api_key_header = f"authorization: Bearer {key}\r\n" if key else None
