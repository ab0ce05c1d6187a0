"""router/cluster.py: admission (counts, limits, the queue, leases) without sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import router.cluster as cluster_module
from router.cluster import Cluster
from router.config import OutlierDetection
from router.endpoint import Endpoint, Member
from router.errors import NoHealthyBackend, QueueTimeout
from tests.unit.fleet_core import (
    FakeClock,
    cluster,
    eject,
    endpoints,
    eventually,
    members,
    model_config,
    registry,
    settle,
)

#: A queue that waits long enough for any test here to wake its waiters explicitly.
PATIENT = {"size": 8, "timeout": "5s"}


async def waiting(c: Cluster, count: int) -> None:
    await eventually(lambda: len(c.waiters) == count, what=f"{count} waiters queued")


class Requests:
    """Requests run as tasks: each takes a lease, logs ``name:endpoint`` and, when told
    to, holds its endpoint until ``release_held()``. The fixture cancels whatever is left,
    so a failing test cannot leak tasks into the next (the loop is session-wide)."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.hold = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, c: Cluster, name: str, exclude: set[Endpoint] | None = None,
              hold: bool = False) -> asyncio.Task[None]:
        async def run() -> None:
            async with c.lease(None, exclude or set()) as endpoint:
                self.log.append(f"{name}:{endpoint.origin.host}")
                if hold:
                    await self.hold.wait()

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.append(task)
        return task

    def release_held(self) -> None:
        self.hold.set()

    async def cancel(self, *tasks: asyncio.Task[None]) -> None:
        """Cancel ``tasks`` (all by default) and wait for them. Held ones are let go
        first: on Python 3.11 a waiter cancelled just after its wakeup swallows the
        cancellation (see the xfail below) and would otherwise hold its lease for ever."""
        tasks = tasks or tuple(self.tasks)
        self.hold.set()
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1)
            assert not pending, "tasks ignored their cancellation"


@pytest.fixture
async def requests() -> AsyncIterator[Requests]:
    running = Requests()
    yield running
    await running.cancel()


# -- counts and limits --------------------------------------------------------------------
def test_try_acquire_and_release_count_endpoint_and_cluster() -> None:
    c = cluster(2, limit=1)
    e0, e1 = c.endpoints
    assert c.try_acquire(None, set()) is e0
    assert (e0.in_flight, c.in_flight) == (1, 1)
    assert c.try_acquire(None, set()) is e1
    assert c.try_acquire(None, set()) is None  # both at max_in_flight
    assert (e0.in_flight, e1.in_flight, c.in_flight) == (1, 1, 2)
    c.release(e0)
    assert (e0.in_flight, c.in_flight) == (0, 1)
    assert c.try_acquire(None, set()) is e0
    c.release(e0)
    c.release(e1)
    assert (e0.in_flight, e1.in_flight, c.in_flight) == (0, 0, 0)


def test_model_max_in_flight_caps_the_cluster() -> None:
    c = cluster(3, limit=None, max_in_flight=2)  # no endpoint limit, the model's own
    assert c.max_in_flight == 2 and all(e.max_in_flight is None for e in c.endpoints)
    first = c.try_acquire(None, set())
    second = c.try_acquire(None, set())
    assert first is not None and second is not None and first is not second
    assert c.try_acquire(None, set()) is None
    assert c.try_acquire_member(c.endpoints[2].key, set()) is None  # placement obeys it too
    c.release(first)
    assert c.try_acquire(None, set()) is not None and c.in_flight == 2


async def test_a_request_over_the_model_limit_queues_until_a_release(
        requests: Requests) -> None:
    c = cluster(3, limit=None, max_in_flight=1, queue=PATIENT)
    first = c.try_acquire(None, set())
    assert first is not None
    task = requests.start(c, "a")
    await waiting(c, 1)  # two endpoints idle, but the model is at its limit
    assert requests.log == []
    c.release(first)
    await asyncio.wait_for(task, 1)
    assert len(requests.log) == 1 and c.in_flight == 0


def test_succeeded_and_failed_feed_the_outlier_detection() -> None:
    c = cluster(1, outlier=OutlierDetection(consecutive_failures=2, ejection=30))
    (ep,) = c.endpoints
    c.failed(ep, "status 502")
    c.succeeded(ep)
    c.failed(ep, "status 502")
    assert ep.up
    c.failed(ep, "status 503")
    assert not ep.up and ep.health.last_error == "status 503"


# -- leases -------------------------------------------------------------------------------
async def test_lease_releases_on_normal_exit() -> None:
    c = cluster(1, limit=1)
    lease = c.lease(None, set())
    async with lease as ep:
        assert (ep.in_flight, c.in_flight) == (1, 1)
    assert (ep.in_flight, c.in_flight) == (0, 0)
    assert lease.waited == 0.0


async def test_lease_releases_on_exception() -> None:
    c = cluster(1, limit=1)
    (ep,) = c.endpoints
    with pytest.raises(RuntimeError, match="boom"):
        async with c.lease(None, set()):
            assert ep.in_flight == 1
            raise RuntimeError("boom")
    assert (ep.in_flight, c.in_flight) == (0, 0)


async def test_lease_cancelled_while_waiting_leaves_nothing_behind(
        requests: Requests) -> None:
    c = cluster(1, limit=1, queue=PATIENT)
    (ep,) = c.endpoints
    assert c.try_acquire(None, set()) is ep
    task = requests.start(c, "a")
    await waiting(c, 1)
    await requests.cancel(task)
    assert task.cancelled() and not c.waiters and requests.log == []
    assert (ep.in_flight, c.in_flight) == (1, 1)
    c.release(ep)
    assert (ep.in_flight, c.in_flight) == (0, 0)
    async with c.lease(None, set()) as again:
        assert again is ep


async def test_cancelled_waiter_does_not_block_the_next_one(requests: Requests) -> None:
    c = cluster(1, limit=1, queue=PATIENT)
    (ep,) = c.endpoints
    c.try_acquire(None, set())
    a = requests.start(c, "a")
    await waiting(c, 1)
    b = requests.start(c, "b")
    await waiting(c, 2)
    await requests.cancel(a)
    c.release(ep)
    await asyncio.wait_for(b, 1)
    assert requests.log == ["b:e0"] and c.in_flight == 0


async def test_waiters_are_woken_in_fifo_order(requests: Requests) -> None:
    c = cluster(1, limit=1, queue=PATIENT)
    (ep,) = c.endpoints
    c.try_acquire(None, set())
    for count, name in enumerate("abcd", 1):
        requests.start(c, name)
        await waiting(c, count)
    c.release(ep)
    await asyncio.wait_for(asyncio.gather(*requests.tasks), 1)
    assert requests.log == ["a:e0", "b:e0", "c:e0", "d:e0"]
    assert (ep.in_flight, c.in_flight) == (0, 0) and not c.waiters


async def test_one_freed_slot_wakes_one_waiter(requests: Requests) -> None:
    c = cluster(2, limit=1, queue=PATIENT)
    e0, e1 = c.endpoints
    c.try_acquire(None, set())
    c.try_acquire(None, set())
    requests.start(c, "a", hold=True)
    await waiting(c, 1)
    requests.start(c, "b", hold=True)
    await waiting(c, 2)
    c.release(e1)
    await eventually(lambda: requests.log == ["a:e1"])
    await settle()
    assert requests.log == ["a:e1"] and len(c.waiters) == 1
    c.release(e0)
    await eventually(lambda: requests.log == ["a:e1", "b:e0"])
    requests.release_held()
    await asyncio.wait_for(asyncio.gather(*requests.tasks), 1)
    assert c.in_flight == 0


async def test_queue_full_is_refused_at_once(requests: Requests) -> None:
    c = cluster(1, limit=1, queue={"size": 1, "timeout": "5s"})
    c.try_acquire(None, set())
    requests.start(c, "a")
    await waiting(c, 1)
    lease = c.lease(None, set())
    with pytest.raises(QueueTimeout, match="the queue is full") as caught:
        await asyncio.wait_for(lease.__aenter__(), 0.5)
    assert caught.value.status == 429 and caught.value.headers == {"retry-after": "5"}
    assert lease.waited < 0.5 and len(c.waiters) == 1


async def test_queue_size_zero_never_waits() -> None:
    c = cluster(1, limit=1, queue={"size": 0, "timeout": "5s"})
    c.try_acquire(None, set())
    with pytest.raises(QueueTimeout, match="the queue is full"):
        await asyncio.wait_for(c.acquire(None, set()), 0.5)


async def test_queue_timeout_gives_429_after_the_timeout() -> None:
    c = cluster(1, limit=1, queue={"size": 4, "timeout": "50ms"})
    assert c.queue_timeout == pytest.approx(0.05)
    c.try_acquire(None, set())
    lease = c.lease(None, set())
    with pytest.raises(QueueTimeout, match="no backend freed up in time") as caught:
        await asyncio.wait_for(lease.__aenter__(), 1)
    assert caught.value.headers == {"retry-after": "1"}
    assert 0.045 <= lease.waited < 0.5
    assert not c.waiters and c.in_flight == 1


async def test_lease_waited_measures_the_queue_time() -> None:
    c = cluster(1, limit=1, queue=PATIENT)
    (ep,) = c.endpoints
    c.try_acquire(None, set())
    loop = asyncio.get_running_loop()
    loop.call_later(0.03, c.release, ep)
    lease = c.lease(None, set())
    async with lease as got:
        assert got is ep
    assert 0.025 <= lease.waited < 0.5


# -- no healthy backend -------------------------------------------------------------------
async def test_no_healthy_backend_at_once_with_retry_after_from_the_nearest_ejection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(cluster_module, "time", clock)
    c = cluster(3, limit=1, queue=PATIENT)
    e0, e1, e2 = c.endpoints
    eject(e0, until=clock.now + 12)
    eject(e1, until=clock.now + 5.2)
    eject(e2, until=clock.now + 30)
    assert c.retry_after() == 6
    lease = c.lease(None, set())
    with pytest.raises(NoHealthyBackend) as caught:
        await asyncio.wait_for(lease.__aenter__(), 0.5)
    assert caught.value.status == 503 and caught.value.headers == {"retry-after": "6"}
    assert not c.waiters and c.in_flight == 0
    clock.advance(6)  # e1's cool-down is over, its probe not answered yet: 1 s
    assert c.retry_after() == 6  # e0 (12 s) is now the nearest: 6 s left
    clock.advance(30)
    assert c.retry_after() == 1


def test_retry_after_is_one_without_ejections() -> None:
    c = cluster(2)
    c.endpoints[0].health.healthy = c.endpoints[0].health.up = False  # unhealthy, not ejected
    assert c.retry_after() == 1


async def test_no_healthy_backend_when_every_up_endpoint_is_excluded() -> None:
    c = cluster(2, limit=1, queue=PATIENT)
    e0, e1 = c.endpoints
    eject(e1)
    with pytest.raises(NoHealthyBackend):
        await asyncio.wait_for(c.acquire(None, {e0}), 0.5)
    assert c.any_up() and not c.any_up({e0})


# -- placement: prefer --------------------------------------------------------------------
async def test_prefer_takes_the_named_member_first() -> None:
    c = cluster(3, limit=2)
    e2 = c.endpoints[2]
    for _ in range(2):
        async with c.lease(None, set(), prefer=e2.key) as got:
            assert got is e2 and e2.in_flight == 1
    assert c.in_flight == 0


async def test_prefer_falls_back_to_the_balancer_when_down_full_or_unknown() -> None:
    c = cluster(3, limit=1)
    e0, e1, e2 = c.endpoints
    eject(e2)
    async with c.lease(None, set(), prefer=e2.key) as got:
        assert got is e0
    e2.health.ejected, e2.health.up = False, True
    e2.in_flight = 1  # full
    async with c.lease(None, set(), prefer=e2.key) as got:
        assert got in (e0, e1) and e2.in_flight == 1
    e2.in_flight = 0
    async with c.lease(None, set(), prefer="http://elsewhere:8000") as got:
        assert got in (e0, e1, e2)
    assert c.in_flight == 0


# -- slots shared across snapshots, DNS refreshes -----------------------------------------
async def test_slot_freed_by_an_older_snapshots_cluster_wakes_the_newer_one(
        requests: Requests) -> None:
    reg = registry()
    (ep,) = endpoints(reg, 1, max_in_flight=1)
    old = Cluster(model_config(queue=PATIENT), members([ep]), OutlierDetection())
    new = Cluster(model_config(queue=PATIENT), members([ep]), OutlierDetection())
    assert set(ep.clusters) == {old, new}
    assert old.try_acquire(None, set()) is ep  # a request of the old snapshot holds it
    task = requests.start(new, "new")
    await waiting(new, 1)
    old.release(ep)
    await asyncio.wait_for(task, 1)
    assert requests.log == ["new:e0"] and ep.in_flight == 0
    assert (old.in_flight, new.in_flight) == (0, 0)


async def test_set_members_rebuilds_the_balancer_and_wakes_a_waiter(
        requests: Requests) -> None:
    reg = registry()
    e0, e1 = endpoints(reg, 2, max_in_flight=1)
    c = Cluster(model_config(queue=PATIENT), members([e0]), OutlierDetection())
    before = c.balancer
    c.try_acquire(None, set())
    task = requests.start(c, "a")
    await waiting(c, 1)
    c.set_members(members([e0, e1]))  # DNS found a second address
    await asyncio.wait_for(task, 1)
    assert requests.log == ["a:e1"]
    assert c.balancer is not before and c.endpoints == (e0, e1)
    assert c in e1.clusters
    c.release(e0)
    assert c.try_acquire(None, set()) in (e0, e1)


def test_describe_lists_members_with_weight_and_counts() -> None:
    reg = registry()
    e0, e1 = endpoints(reg, 2, max_in_flight=4)
    c = Cluster(model_config(), [Member(e0, 3), Member(e1, 1)], OutlierDetection())
    c.try_acquire(None, set())
    described = c.describe()
    assert described == [
        {"url": "http://e0:8000", "address": "e0:8000", "state": "healthy",
         "consecutive_failures": 0, "last_error": None, "last_check": None,
         "in_flight": 1, "max_in_flight": 4, "weight": 3},
        {"url": "http://e1:8000", "address": "e1:8000", "state": "healthy",
         "consecutive_failures": 0, "last_error": None, "last_check": None,
         "in_flight": 0, "max_in_flight": 4, "weight": 1},
    ]
    eject(e1)
    assert c.describe()[1]["state"] == "ejected"


# -- known bugs ---------------------------------------------------------------------------
async def test_a_freed_slot_reaches_a_waiter_that_can_use_it(requests: Requests) -> None:
    c = cluster(2, limit=1, queue={"size": 8, "timeout": "2s"})
    e0 = c.endpoints[0]
    c.try_acquire(None, set())
    c.try_acquire(None, set())
    requests.start(c, "retry", exclude={e0})  # this retry tried e0 already
    await waiting(c, 1)
    requests.start(c, "fresh")
    await waiting(c, 2)
    c.release(e0)
    await eventually(lambda: "fresh:e0" in requests.log, timeout=0.1, what="fresh got e0")


async def test_a_waiter_cancelled_just_after_its_wakeup_passes_the_slot_on(
        requests: Requests) -> None:
    c = cluster(1, limit=1, queue={"size": 8, "timeout": "2s"})
    (ep,) = c.endpoints
    c.try_acquire(None, set())
    gone = requests.start(c, "gone", hold=True)
    await waiting(c, 1)
    requests.start(c, "next")
    await waiting(c, 2)
    c.release(ep)  # wakes "gone"...
    gone.cancel()  # ...whose client disconnects before it runs
    await eventually(lambda: "next:e0" in requests.log, timeout=0.1,
                     what="next got the slot")
    assert gone.cancelled() and "gone:e0" not in requests.log


async def test_set_members_wakes_as_many_waiters_as_it_adds_room_for(
        requests: Requests) -> None:
    reg = registry()
    e0, e1 = endpoints(reg, 2, max_in_flight=1)
    e1.max_in_flight = 3
    c = Cluster(model_config(queue={"size": 8, "timeout": "2s"}), members([e0]),
                OutlierDetection())
    c.try_acquire(None, set())
    for count, name in enumerate("abc", 1):
        requests.start(c, name, hold=True)
        await waiting(c, count)
    c.set_members(members([e0, e1]))
    await eventually(lambda: len(requests.log) == 3, timeout=0.1, what="all three served")


async def test_an_endpoint_back_from_ejection_wakes_the_queue(requests: Requests) -> None:
    outlier = OutlierDetection(consecutive_failures=1, ejection=30)
    c = cluster(2, limit=1, queue={"size": 8, "timeout": "2s"}, outlier=outlier)
    e0, e1 = c.endpoints
    c.failed(e1, "status 502")  # e1 ejected
    assert c.try_acquire(None, set()) is e0
    requests.start(c, "a")
    await waiting(c, 1)
    e1.health.probed(None, outlier)  # the cool-down probe passed: e1 is back
    assert e1.up
    await eventually(lambda: requests.log == ["a:e1"], timeout=0.1,
                     what="the waiter got e1")
