"""Clusters: a model's endpoints, its balancer, and the admission of each request to one.

A ``Cluster`` belongs to one model of one snapshot. ``async with cluster.lease(...) as
endpoint`` is the one way any request (online or a batch line) holds an endpoint: it asks
the balancer for the best available endpoint and counts it in flight; when every healthy
endpoint is at its ``max_in_flight`` (or the model is at its own), the request waits in a
bounded queue for a bounded time, then gets 429; when no endpoint is healthy at all, it
gets 503 at once. Leaving the block frees the slot and wakes the next waiter.

A cluster also keeps outlier detection from taking its model down (Envoy's
``max_ejection_percent`` and panic threshold):

- **the cap** (``may_eject``): with ``n`` members, an ejection goes ahead only if at most
  ``floor(n * max_ejection_percent / 100)`` members are then out of rotation (ejected or
  failing active checks). Below 100 at least one member stays in, so a one-backend model is
  never ejected; the refused endpoint keeps its streak and is ejected by a later failure
  once the model can spare it.
- **panic mode** (``review``): while fewer than ``panic_threshold`` percent of the members
  are in rotation (``up * 100 < panic_threshold * n``), the ejections of its members are
  waived, so every member that passes active checks gets traffic (ejected or not) rather
  than the model answering 503. Members failing active checks stay out: their engine does
  not answer ``/health``. Panic mode is entered and left on health transitions and member
  changes, not computed per pick.

Why at ejection time (and on transitions), not at pick time: an endpoint is shared by
every model that lists its URL (the registry keys endpoints by URL), and the balancers read
one ``endpoint.up`` per candidate on the hot path. A per-model view at pick time would cost
every pick a look at its model's members and need a balancer protocol of its own; instead
an endpoint is ejected only if *every* model it serves can spare it
(``Endpoint.may_eject``), and its ejection is waived while *any* of them is in panic mode
(``Endpoint.review_waiver``). The strictest model wins: a model may keep sending to a
backend another one shares, never lose its last one. The clusters of older snapshots that
requests in flight still hold count too, until those requests end.

A member whose engine does not serve the name this model sends (``sent_name``: its
``backend_model``, else its own name; ``EngineModels``, read by the health checker) is
**unserved**: out of this model's balancer and counted out of rotation, while the same
endpoint keeps serving the models whose names it does serve. It is back once the engine
lists the name.

A model with ``discover: true`` also routes the LoRA adapters its members' engines list
with its ``sent_name`` as their parent (``EngineModels.adapters``, read at every health
check): each adapter gets an ``AdapterCluster`` over the members that list it now, rebuilt
whenever a read changes that (``served_changed``, like the unserved set). An adapter
cluster shares the members' endpoints, so their health, in-flight counts and limits are
the same ones; it has a queue and model-wide ``max_in_flight`` of its own, and no say in
ejections and no panic mode (the base model's cluster decides those for the same
endpoints).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from time import perf_counter
from types import TracebackType

from router.balancer import Balancer, Scored, make_balancer
from router.config import SCORED, ModelConfig, OutlierDetection
from router.endpoint import Endpoint, Member
from router.errors import NoHealthyBackend, QueueTimeout
from router.prefix_index import PrefixIndex

log = logging.getLogger("routeyard.cluster")


class Cluster:
    """The endpoints of one model, its balancer, and its admission queue."""

    def __init__(self, config: ModelConfig, members: Iterable[Member],
                 outlier: OutlierDetection, prefix_index: PrefixIndex | None = None) -> None:
        self.config = config
        #: ``cache_aware``: which member holds which prompt blocks (kept across reloads).
        self.prefix_index = prefix_index
        self.name = config.name
        #: The model name requests of this model carry to the engine.
        self.sent_name = config.backend_model or config.name
        #: The snapshot's outlier detection, for reports of this cluster's requests.
        self.outlier = outlier
        self.max_in_flight = config.max_in_flight
        self.queue_size = config.queue.size
        self.queue_timeout = config.queue.timeout
        self.in_flight = 0
        #: Requests waiting for a slot, first come first served, with the endpoints each
        #: may not use (those it tried already).
        self.waiters: deque[tuple[asyncio.Future[None], set[Endpoint]]] = deque()
        self.members: tuple[Member, ...] = ()
        self.member_set: frozenset[Endpoint] = frozenset()
        #: Members whose engine does not serve ``sent_name``, and the others (routable).
        self.unserved: frozenset[Endpoint] = frozenset()
        self.routable: tuple[Member, ...] = ()
        #: Too few members in rotation: their ejections are waived (module docstring).
        self.panic = False
        self.balancer: Balancer = make_balancer(config, (), prefix_index=prefix_index)
        #: The scored balancer (``load_aware``, ``cache_aware``), whose picks are explained
        #: to the client: ``x-routeyard-backend`` per member, made once.
        self.scored: Scored | None = None
        self.backend_headers: dict[Endpoint, tuple[bytes, bytes]] = {}
        #: The discovering model this cluster is an adapter of (``AdapterCluster``).
        self.adapter_of: str | None = None
        #: ``discover``: the adapters the members' engines list for this model, by id.
        self.adapters: dict[str, AdapterCluster] = {}
        #: Called when ``adapters`` gains or loses a name (the snapshot lists them anew).
        self.adapters_changed: Callable[[], None] | None = None
        self.set_members(members)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(m.endpoint for m in self.members)

    def set_members(self, members: Iterable[Member]) -> None:
        """Swap in a new member set (DNS refresh); the balancer is rebuilt whole, panic
        mode reviewed for the new set (and the waivers of members that left)."""
        before = self.member_set
        self.members = tuple(members)
        self.member_set = frozenset(m.endpoint for m in self.members)
        for member in self.members:
            member.endpoint.clusters.add(self)
        self._route(frozenset(m.endpoint for m in self.members
                              if not m.endpoint.engine.serves(self.sent_name)))
        self.panic = self._panics()
        for endpoint in before | self.member_set:
            endpoint.review_waiver()
        if self.config.discover:
            self._discover()
        self.wake_all()

    def _route(self, unserved: frozenset[Endpoint]) -> None:
        """Build the balancer over the members whose engine serves this model."""
        self.unserved = unserved
        self.routable = tuple(m for m in self.members if m.endpoint not in unserved)
        self.balancer = make_balancer(self.config, self.routable,
                                      prefix_index=self.prefix_index)
        if self.prefix_index is not None:  # a backend that left holds nothing for us
            self.prefix_index.retain(m.endpoint.key for m in self.members)
        self.scored = self.balancer if isinstance(self.balancer, Scored) else None
        if self.config.policy in SCORED:
            self.backend_headers = {m.endpoint: (b"x-routeyard-backend", m.name.encode())
                                    for m in self.members}

    def served_changed(self, endpoint: Endpoint) -> None:
        """``endpoint``'s engine listed its models anew: route to it for this model, or
        not (module docstring)."""
        if endpoint not in self.member_set:
            return
        if self.config.discover:
            self._discover()
        serves = endpoint.engine.serves(self.sent_name)
        if serves == (endpoint not in self.unserved):
            return
        self._route(self.unserved - {endpoint} if serves else self.unserved | {endpoint})
        self.review()
        self.wake_all()

    def _discover(self) -> None:
        """Match the adapter clusters to what the members' engines list now: one per
        adapter id, over the members that list it (module docstring)."""
        held: dict[str, list[Member]] = {}
        for member in self.members:
            for name in member.endpoint.engine.adapters_of(self.sent_name):
                held.setdefault(name, []).append(member)
        adapters = self.adapters
        added = [name for name in held if name not in adapters]
        removed = [name for name in adapters if name not in held]
        for name in removed:
            adapters.pop(name).set_members(())  # its waiters: no backend left (503)
        for name, members in held.items():
            cluster = adapters.get(name)
            if cluster is None:
                adapters[name] = AdapterCluster(self, name, members)
            elif cluster.members != tuple(members):
                cluster.set_members(members)
        if added or removed:
            log.info("model %s: adapters discovered now %s (added: %s; removed: %s)",
                     self.name, ", ".join(adapters) or "none", ", ".join(added) or "none",
                     ", ".join(removed) or "none")
            if self.adapters_changed is not None:
                self.adapters_changed()

    def any_up(self, exclude: frozenset[Endpoint] | set[Endpoint] = frozenset()) -> bool:
        return any(m.endpoint.up and m.endpoint not in exclude for m in self.routable)

    def up_count(self) -> int:
        """Members that get traffic (``Endpoint.up``), for the metrics."""
        return sum(1 for m in self.members if m.endpoint.up)

    def lease(self, key: str | None, exclude: set[Endpoint],
              prefer: str | None = None) -> Lease:
        """Hold one endpoint for a request: ``async with cluster.lease(...) as endpoint``.

        ``key`` is the balancing key (session, prompt prefix); ``exclude`` the endpoints
        this request tried already; ``prefer`` the key of an endpoint to take first when
        it is up and has capacity (placement)."""
        return Lease(self, key, exclude, prefer)

    # -- the pieces of a lease --------------------------------------------------------
    def try_acquire(self, key: str | None, exclude: set[Endpoint]) -> Endpoint | None:
        """An endpoint with capacity now, counted in flight, or None (then ``acquire``)."""
        if self.max_in_flight is None or self.in_flight < self.max_in_flight:
            endpoint = self.balancer.pick(key, exclude)
            if endpoint is not None:
                endpoint.in_flight += 1
                self.in_flight += 1
                return endpoint
        return None

    def try_acquire_member(self, backend: str, exclude: set[Endpoint]) -> Endpoint | None:
        """The member endpoint with key ``backend`` if it is up, has capacity now and is
        not in ``exclude``, counted in flight; else None."""
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            return None
        for member in self.routable:
            endpoint = member.endpoint
            if endpoint.key == backend:
                if not (endpoint.up and endpoint.has_capacity) or endpoint in exclude:
                    return None
                endpoint.in_flight += 1
                self.in_flight += 1
                return endpoint
        return None

    async def acquire(self, key: str | None, exclude: set[Endpoint],
                      lease: Lease | None = None) -> Endpoint:
        """An endpoint, counted in flight, waiting in the queue while every endpoint that
        is up is at capacity; ``NoHealthyBackend`` when none is up, ``QueueTimeout`` when
        the wait fails (``lease.queued`` tells whether it entered the queue)."""
        deadline = None
        while True:
            endpoint = self.try_acquire(key, exclude)
            if endpoint is not None:
                return endpoint
            if not self.any_up(exclude):
                raise NoHealthyBackend(self.name, self.retry_after())
            if len(self.waiters) >= self.queue_size:
                raise QueueTimeout(self.name, "the queue is full", self.queue_timeout)
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.queue_timeout
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise QueueTimeout(self.name, "no backend freed up in time", self.queue_timeout)
            waiter = loop.create_future()
            if lease is not None:
                lease.queued = True
            entry = (waiter, exclude)
            self.waiters.append(entry)
            timer = loop.call_later(remaining, _time_up, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.wake_one()  # woken, then cancelled (the client left): pass it on
                raise
            finally:
                timer.cancel()
                if entry in self.waiters:
                    self.waiters.remove(entry)

    def release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self.in_flight -= 1
        if self.waiters:
            self.wake_one(endpoint)
        clusters = endpoint.clusters
        if len(clusters) > 1:  # a reload made a new cluster: its waiters may use this slot
            for cluster in clusters:
                if cluster is not self:
                    cluster.wake_one(endpoint)

    def load_changed(self, endpoint: Endpoint) -> None:
        """A scrape of ``endpoint`` ended: the queue of a scored model looks again when
        the reading may let a waiter through (the engine has room, or its reading went
        stale, which may leave every reading stale: least_request then). A reading that
        still shows it saturated wakes nobody: completions do."""
        scored = self.scored
        if scored is not None and self.waiters and scored.may_take(endpoint):
            self.wake_all()

    def wake_all(self) -> None:
        """Wake every waiter to look again (the member set or a member's health changed):
        those that find no slot wait again, in the order they woke."""
        waiters = [waiter for waiter, _ in self.waiters]
        self.waiters.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def wake_one(self, freed: Endpoint | None = None) -> None:
        """Wake the first waiter that may use the ``freed`` endpoint (any waiter when
        None: the member set changed), so a wake-up is never spent on a request that
        excludes it."""
        for entry in self.waiters:
            waiter, exclude = entry
            if not waiter.done() and (freed is None or freed not in exclude):
                self.waiters.remove(entry)
                waiter.set_result(None)
                return

    def explanation(self, endpoint: Endpoint,
                    by_balancer: bool = True) -> tuple[tuple[bytes, bytes], ...]:
        """The answer headers that explain a scored pick of ``endpoint``: its name, and,
        with ``scoring.explain``, the scores of the balancer's pick just made
        (``by_balancer``; False: a placement chose it, and there are no scores)."""
        header = self.backend_headers.get(endpoint)
        if header is None:
            return ()
        scored = self.scored
        if by_balancer and scored is not None and scored.explain:
            picked, text = scored.explained
            if picked is endpoint and text:
                return header, (b"x-routeyard-scores", text.encode())
        return (header,)

    # -- reports from the relay -------------------------------------------------------
    def succeeded(self, endpoint: Endpoint) -> None:
        endpoint.health.request_succeeded()

    def failed(self, endpoint: Endpoint, error: str, status: int | None = None) -> None:
        """A request failed at ``endpoint``: no answer (``status`` None) or a 5xx one."""
        endpoint.health.request_failed(error, self.outlier, status, endpoint.may_eject)

    # -- outlier detection's cap and panic mode (module docstring) ----------------------
    def may_eject(self, endpoint: Endpoint) -> bool:
        """Whether this model can spare ``endpoint``: with it out, at most
        ``floor(n * max_ejection_percent / 100)`` of its ``n`` members out of rotation."""
        if endpoint not in self.member_set:
            return True  # a member of this cluster once (a DNS refresh dropped it)
        out = sum(1 for m in self.members
                  if m.endpoint is endpoint or not self._in_rotation(m.endpoint))
        return out * 100 <= self.outlier.max_ejection_percent * len(self.members)

    def _in_rotation(self, endpoint: Endpoint) -> bool:
        return endpoint.health.in_rotation and endpoint not in self.unserved

    def panics_for(self, endpoint: Endpoint) -> bool:
        """Whether this model, in panic mode, routes to ``endpoint`` even if ejected."""
        return self.panic and endpoint in self.member_set

    def _panics(self) -> bool:
        members = self.members
        up = sum(1 for m in members if self._in_rotation(m.endpoint))
        return up * 100 < self.outlier.panic_threshold * len(members)

    def review(self) -> None:
        """Enter or leave panic mode after a member's health changed."""
        panic = self._panics()
        if panic == self.panic:
            return
        self.panic = panic
        up = sum(1 for m in self.members if self._in_rotation(m.endpoint))
        if panic:
            log.warning("model %s: %d of %d backends up, under panic_threshold %d%%: its "
                        "ejected backends get traffic again", self.name, up,
                        len(self.members), self.outlier.panic_threshold)
        else:
            log.info("model %s: %d of %d backends up, panic mode over", self.name, up,
                        len(self.members))
        for endpoint in self.member_set:
            endpoint.review_waiver()

    # -- views ------------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds until a backend may be back: the nearest end of an ejection, or 1."""
        now = time.monotonic()
        ends = [m.endpoint.health.ejected_until - now for m in self.members
                if m.endpoint.health.ejected]
        soonest = min((e for e in ends if e > 0), default=1.0)
        return max(1, math.ceil(soonest))

    def describe(self) -> list[dict[str, object]]:
        """Each member as the admin view shows it; an unserved one reads unhealthy, with
        the reason, for this model only."""
        backends = []
        for m in self.members:
            endpoint = m.endpoint
            view = {"name": m.name, **endpoint.describe(), "weight": m.weight,
                    "model_served": None if endpoint.engine.served is None
                    else endpoint not in self.unserved}
            if endpoint in self.unserved:
                view.update(state="unhealthy", up=False,
                            last_error=endpoint.engine.not_served(self.sent_name))
            backends.append(view)
        return backends


class AdapterCluster(Cluster):
    """A LoRA adapter of a discovering model (module docstring): the base model's settings,
    its name as the name sent, over the base's members whose engine lists it now."""

    def __init__(self, base: Cluster, name: str, members: Iterable[Member]) -> None:
        update: dict[str, object] = {"name": name, "backend_model": None, "discover": False}
        if base.config.policy == "cache_aware":  # no prefix index of its own: load only
            scoring = base.config.scoring
            update["scoring"] = scoring.model_copy(update={
                "weights": scoring.weights.model_copy(update={"prefix": 0.0})})
        config = base.config.model_copy(update=update)
        super().__init__(config, members, base.outlier)
        self.adapter_of = base.name

    @property
    def root(self) -> str:
        """The adapter's ``root`` as the first member's engine lists it (its path in vLLM),
        else its id."""
        for member in self.members:
            listed = member.endpoint.engine.adapters.get(self.name)
            if listed is not None and listed.root:
                return listed.root
        return self.name

    def may_eject(self, endpoint: Endpoint) -> bool:
        return True  # the base model's cluster has the say for the same endpoints

    def _panics(self) -> bool:
        return False


def _time_up(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)  # the loop in ``acquire`` sees the deadline has passed


class Lease:
    """One request's hold on one endpoint of a cluster (``Cluster.lease``)."""

    __slots__ = ("cluster", "endpoint", "exclude", "explain", "key", "prefer", "queued",
                 "waited")

    def __init__(self, cluster: Cluster, key: str | None, exclude: set[Endpoint],
                 prefer: str | None) -> None:
        self.cluster = cluster
        self.key = key
        self.exclude = exclude
        self.prefer = prefer
        #: Whether this lease waited in the model's queue, and for how many seconds.
        self.queued = False
        self.waited = 0.0
        #: Answer headers that explain the pick (scored policies only).
        self.explain: tuple[tuple[bytes, bytes], ...] = ()

    async def __aenter__(self) -> Endpoint:
        cluster = self.cluster
        endpoint = None
        if self.prefer is not None:
            endpoint = cluster.try_acquire_member(self.prefer, self.exclude)
        placed = endpoint is not None
        if endpoint is None:
            endpoint = cluster.try_acquire(self.key, self.exclude)
        if endpoint is None:
            start = perf_counter()
            try:
                endpoint = await cluster.acquire(self.key, self.exclude, self)
            finally:
                if self.queued:
                    self.waited = perf_counter() - start
        self.endpoint = endpoint
        if cluster.backend_headers:
            self.explain = cluster.explanation(endpoint, not placed)
        return endpoint

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.cluster.release(self.endpoint)
