"""Clusters: a model's endpoints, their health, and the admission of each request.

An ``Endpoint`` is one backend address with its connection pool and health. Endpoints live
in an ``EndpointRegistry`` keyed by address, so config reloads and DNS refreshes keep the
pools, in-flight counts and health of backends that stay.

A ``Cluster`` belongs to one model of one snapshot. ``acquire`` asks the balancer for the
best available endpoint; when every healthy endpoint is at its ``max_in_flight`` (or the
model is at its own), the request waits in a bounded queue for a bounded time, then gets
429. When no endpoint is healthy at all, it gets 503 at once.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from router.balancer import Balancer, make_balancer
from router.config import ModelConfig, OutlierDetection
from router.errors import NoHealthyBackend, QueueTimeout
from router.upstream import Origin, Pool

#: Statuses that count against a backend for outlier detection (501: the API is missing).
FAILURE_STATUSES = frozenset({500, 502, 503, 504})


class Endpoint:
    """One backend address: pool, in-flight count, health (active and passive)."""

    __slots__ = (
        "active_failures",
        "active_successes",
        "api_key_header",
        "clusters",
        "consecutive_failures",
        "ejected",
        "ejected_until",
        "healthy",
        "in_flight",
        "key",
        "last_check",
        "last_error",
        "max_in_flight",
        "origin",
        "pool",
        "url",
    )

    def __init__(self, key: str, url: str, origin: Origin) -> None:
        self.key = key
        self.url = url
        self.origin = origin
        self.pool = Pool(origin)
        self.in_flight = 0
        self.max_in_flight: int | None = None
        #: ``authorization: Bearer <engine key>\r\n`` when the engine runs with --api-key.
        self.api_key_header: str | None = None
        self.healthy = True
        self.ejected = False
        self.ejected_until = 0.0
        self.consecutive_failures = 0
        self.active_failures = 0
        self.active_successes = 0
        self.last_error: str | None = None
        self.last_check: float | None = None
        #: The clusters this endpoint is a member of, this snapshot's and those of older
        #: snapshots that requests in flight still hold: a slot freed here wakes them all.
        self.clusters: weakref.WeakSet[Cluster] = weakref.WeakSet()

    @property
    def up(self) -> bool:
        """Healthy and not ejected: may get traffic (capacity permitting)."""
        return self.healthy and not self.ejected

    @property
    def has_capacity(self) -> bool:
        return self.max_in_flight is None or self.in_flight < self.max_in_flight

    @property
    def state(self) -> str:
        if self.ejected:
            return "ejected"
        return "healthy" if self.healthy else "unhealthy"

    # -- passive outlier detection ---------------------------------------------------------
    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self, error: str, outlier: OutlierDetection) -> bool:
        """Count a failed request; returns True when this failure ejects the endpoint."""
        self.last_error = error
        self.consecutive_failures += 1
        if not self.ejected and self.consecutive_failures >= outlier.consecutive_failures:
            self.ejected = True
            self.ejected_until = time.monotonic() + outlier.ejection
            return True
        return False

    # -- active health checks ----------------------------------------------------------------
    def record_check(self, ok: bool, error: str | None, healthy_n: int, unhealthy_n: int) -> None:
        self.last_check = time.time()
        if ok:
            self.active_failures = 0
            self.active_successes += 1
            if not self.healthy and self.active_successes >= healthy_n:
                self.healthy = True
        else:
            self.last_error = error
            self.active_successes = 0
            self.active_failures += 1
            if self.healthy and self.active_failures >= unhealthy_n:
                self.healthy = False

    def end_ejection(self) -> None:
        """Called after a successful probe at the end of the cool-down."""
        self.ejected = False
        self.consecutive_failures = 0

    def describe(self) -> dict[str, object]:
        return {
            "url": self.url,
            "address": f"{self.origin.host}:{self.origin.port}",
            "state": self.state,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "last_check": self.last_check,
        }


@dataclass(frozen=True, slots=True)
class Member:
    """An endpoint as one model sees it: with that model's weight and limit for it."""

    endpoint: Endpoint
    weight: int
    max_in_flight: int | None = None
    api_key: str | None = None


class Cluster:
    """The endpoints of one model, its balancer, and its admission queue."""

    def __init__(self, config: ModelConfig, members: Iterable[Member]) -> None:
        self.config = config
        self.max_in_flight = config.max_in_flight
        self.queue_size = config.queue.size
        self.queue_timeout = config.queue.timeout
        self.in_flight = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.members: tuple[Member, ...] = ()
        self.balancer: Balancer = make_balancer(config, ())
        self.set_members(members)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(m.endpoint for m in self.members)

    def set_members(self, members: Iterable[Member]) -> None:
        """Swap in a new member set (DNS refresh); the balancer is rebuilt whole."""
        self.members = tuple(members)
        for member in self.members:
            member.endpoint.clusters.add(self)
        self.balancer = make_balancer(self.config, self.members)
        self._wake()

    def any_up(self, exclude: frozenset[Endpoint] | set[Endpoint] = frozenset()) -> bool:
        return any(m.endpoint.up and m.endpoint not in exclude for m in self.members)

    def try_acquire(self, key: str | None, exclude: set[Endpoint]) -> Endpoint | None:
        """An endpoint with capacity now, counted in flight, or None (then ``acquire``).

        The fast path: no coroutine, no waiting; ``release`` the endpoint when done."""
        if self.max_in_flight is None or self.in_flight < self.max_in_flight:
            endpoint = self.balancer.pick(key, exclude)
            if endpoint is not None:
                endpoint.in_flight += 1
                self.in_flight += 1
                return endpoint
        return None

    def try_acquire_member(self, backend: str) -> Endpoint | None:
        """The endpoint with key ``backend`` if it is a member, up and has capacity now,
        counted in flight (the answer a stored Responses API id points to); else None."""
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            return None
        for member in self.members:
            endpoint = member.endpoint
            if endpoint.key == backend:
                if not (endpoint.up and endpoint.has_capacity):
                    return None
                endpoint.in_flight += 1
                self.in_flight += 1
                return endpoint
        return None

    async def acquire(self, key: str | None, exclude: set[Endpoint]) -> Endpoint:
        """An endpoint for this request, counted in flight; ``release`` it when done.

        Waits in the queue when every endpoint that is up is at capacity; raises
        ``NoHealthyBackend`` when none is up and ``QueueTimeout`` when the wait fails."""
        deadline = None
        while True:
            endpoint = self.try_acquire(key, exclude)
            if endpoint is not None:
                return endpoint
            if not self.any_up(exclude):
                raise NoHealthyBackend(self.config.name, self.retry_after())
            if len(self.waiters) >= self.queue_size:
                raise QueueTimeout(self.config.name, "the queue is full", self.queue_timeout)
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.queue_timeout
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise QueueTimeout(self.config.name, "no backend freed up in time",
                                   self.queue_timeout)
            waiter = loop.create_future()
            self.waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)

    def release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self.in_flight -= 1
        self._wake()
        clusters = endpoint.clusters
        if len(clusters) > 1:  # a reload made a new cluster: its waiters may use this slot
            for cluster in clusters:
                if cluster is not self and cluster.waiters:
                    cluster._wake()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def retry_after(self) -> int:
        """Seconds until a backend may be back: the nearest end of an ejection, or 1."""
        now = time.monotonic()
        ends = [m.endpoint.ejected_until - now for m in self.members if m.endpoint.ejected]
        soonest = min((e for e in ends if e > 0), default=1.0)
        return max(1, math.ceil(soonest))

    def describe(self) -> list[dict[str, object]]:
        return [{**m.endpoint.describe(), "weight": m.weight} for m in self.members]


class EndpointRegistry:
    """Every endpoint this worker knows, shared by successive snapshots and DNS refreshes."""

    def __init__(self) -> None:
        self.by_key: dict[str, Endpoint] = {}

    def get(self, url: str, address: str | None = None) -> Endpoint:
        """The endpoint for ``url``, or for one resolved ``address`` of its host name."""
        key = url if address is None else f"{url}@{address}"
        endpoint = self.by_key.get(key)
        if endpoint is None:
            origin = Origin.from_url(url, address)
            endpoint = self.by_key[key] = Endpoint(key, url, origin)
        return endpoint

    def retain(self, keys: set[str]) -> None:
        """Forget endpoints no longer used; their idle connections close now and their
        in-flight requests finish on the connections they hold."""
        for key in list(self.by_key):
            if key not in keys:
                self.by_key.pop(key).pool.close()

    def close(self) -> None:
        self.retain(set())
