"""router/cluster.py: admission (counts, limits, the queue, leases) without sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import router.cluster as cluster_module
from router.cluster import Cluster
from router.config import HealthChecks, OutlierDetection
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
    c = cluster(2, outlier=OutlierDetection(consecutive_failures=2, ejection=30))
    ep = c.endpoints[0]
    c.failed(ep, "status 502")
    c.succeeded(ep)
    c.failed(ep, "status 502")
    assert ep.up
    c.failed(ep, "status 503")
    assert not ep.up and ep.health.last_error == "status 503"


# -- outlier detection: the cap and panic mode ----------------------------------------------
#: Three gateway failures eject, for 30 s; the cap and panic threshold at their defaults.
OUTLIER = OutlierDetection(consecutive_failures=3, ejection=30)
DOWN = HealthChecks(unhealthy_threshold=1)


def fail(c: Cluster, ep: Endpoint, times: int = 3, status: int | None = 502) -> None:
    for _ in range(times):
        c.failed(ep, f"status {status}", status)


def check_fails(ep: Endpoint) -> None:
    ep.health.checked("health check: connection refused", DOWN, OUTLIER)


def test_a_one_backend_model_is_never_ejected() -> None:
    c = cluster(1, outlier=OUTLIER)
    (ep,) = c.endpoints
    fail(c, ep, 50)
    fail(c, ep, 50, status=500)
    assert ep.up and ep.health.state == "healthy" and ep.health.consecutive_5xx == 100
    assert c.try_acquire(None, set()) is ep


def test_max_ejection_percent_caps_what_outlier_detection_takes_out() -> None:
    c = cluster(5, outlier=OUTLIER)  # floor(5 * 50 / 100) = 2 may be out
    e0, e1, e2, e3, e4 = c.endpoints
    for ep in c.endpoints:
        fail(c, ep)
    assert [ep.health.ejected for ep in c.endpoints] == [True, True, False, False, False]
    assert e2.up and e3.up and e4.up and not c.panic
    e0.health.checked(None, DOWN, OUTLIER)  # a passing check: e0 is back
    assert e0.up
    fail(c, e2, 1)  # its streak went on counting: the next failure ejects it
    assert e2.health.ejected and not e3.health.ejected
    everyone = OutlierDetection(consecutive_failures=3, ejection=30, max_ejection_percent=100)
    c.outlier = everyone
    fail(c, e3, 1)
    fail(c, e4, 1)
    assert all(ep.health.ejected for ep in (e1, e2, e3, e4)) and not e0.health.ejected


def test_backends_failing_active_checks_count_against_the_cap() -> None:
    c = cluster(4, outlier=OUTLIER)  # 2 of 4 may be out
    e0, e1, e2 = c.endpoints[:3]
    check_fails(e0)
    fail(c, e1)
    assert e1.health.ejected  # e0 and e1 out: 2 of 4
    fail(c, e2)
    assert e2.up and not e2.health.ejected  # a third would leave one of four


def test_a_shared_endpoint_is_ejected_only_if_every_model_it_serves_can_spare_it() -> None:
    reg = registry()
    shared, e1, e2 = endpoints(reg, 3)
    big = Cluster(model_config("big"), members([shared, e1, e2]), OUTLIER)
    solo = Cluster(model_config("solo"), members([shared]), OUTLIER)
    fail(big, shared)
    assert shared.up and not shared.health.ejected  # "solo" would have none left
    assert not shared.may_eject() and big.may_eject(shared) and not solo.may_eject(shared)
    del solo  # that model is gone (a reload): "big" alone decides
    fail(big, shared, 1)
    assert shared.health.ejected and not shared.up


def test_panic_mode_routes_to_ejected_backends_but_not_to_unhealthy_ones() -> None:
    outlier = OutlierDetection(consecutive_failures=3, ejection=30, max_ejection_percent=100)
    c = cluster(4, outlier=outlier, limit=None)
    e0, e1, e2, e3 = c.endpoints
    check_fails(e3)  # its engine does not answer /health
    fail(c, e0)
    assert not e0.up and not c.panic  # 2 of 4 up: 50 %, not under it
    fail(c, e1)
    assert c.panic  # 1 of 4 up: under 50 %
    assert e0.up and e1.up and e0.health.state == e1.health.state == "ejected"
    assert not e3.up
    picked = {c.try_acquire(None, set()) for _ in range(12)}
    assert picked == {e0, e1, e2}
    e1.health.checked(None, DOWN, outlier)  # e1's check passes: its ejection ends
    assert not c.panic and e1.up and not e0.up  # 2 of 4 up again: e0's ejection stands


def test_every_backend_ejected_still_gets_traffic() -> None:
    outlier = OutlierDetection(consecutive_failures=1, ejection=30, max_ejection_percent=100)
    c = cluster(2, outlier=outlier)
    e0, e1 = c.endpoints
    fail(c, e0, 1)
    fail(c, e1, 1)
    assert c.panic and c.any_up() and c.retry_after() == 30
    assert c.try_acquire(None, set()) in (e0, e1)


async def test_panic_threshold_zero_answers_503_when_every_backend_is_ejected() -> None:
    outlier = OutlierDetection(consecutive_failures=1, ejection=30, max_ejection_percent=100,
                               panic_threshold=0)
    c = cluster(2, outlier=outlier, queue=PATIENT)
    for ep in c.endpoints:
        fail(c, ep, 1)
    assert not c.panic and not c.any_up()
    with pytest.raises(NoHealthyBackend):
        await asyncio.wait_for(c.acquire(None, set()), 0.5)


def test_a_member_set_that_shrinks_into_panic_waives_at_once() -> None:
    reg = registry()
    e0, e1, e2, e3 = endpoints(reg, 4)
    c = Cluster(model_config(), members([e0, e1, e2, e3]), OUTLIER)
    fail(c, e0)
    assert e0.health.ejected and not e0.up
    c.set_members(members([e0, e1]))
    assert not c.panic  # 1 of 2 up
    check_fails(e1)
    assert c.panic and e0.up  # 0 of 2 in rotation: e0 gets traffic, ejected as it is
    c.set_members(members([e1, e2]))  # e0 leaves the model: its waiver with it
    assert not e0.up and not c.panics_for(e0)
    assert c.may_eject(e0)  # no longer this model's to keep


async def test_panic_mode_wakes_the_queue(requests: Requests) -> None:
    outlier = OutlierDetection(consecutive_failures=1, ejection=30, max_ejection_percent=100)
    c = cluster(2, limit=1, queue={"size": 8, "timeout": "2s"}, outlier=outlier)
    e0, e1 = c.endpoints
    fail(c, e1, 1)  # 1 of 2 up: no panic
    assert c.try_acquire(None, set()) is e0
    requests.start(c, "a")
    await waiting(c, 1)
    fail(c, e0, 1)  # e0 (busy) ejected too: panic, e1 may take the waiter
    await eventually(lambda: requests.log == ["a:e1"], timeout=0.1, what="the waiter got e1")


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
    c = Cluster(model_config(), [Member(e0, 3, name="0"), Member(e1, 1, name="1")],
                OutlierDetection())
    c.try_acquire(None, set())
    described = c.describe()
    assert described == [
        {"name": "0", "url": "http://e0:8000", "address": "e0:8000", "state": "healthy",
         "up": True, "consecutive_failures": 0, "consecutive_5xx": 0, "last_error": None,
         "last_check": None, "in_flight": 1, "max_in_flight": 4, "engine_load": None,
         "weight": 3, "model_served": None},
        {"name": "1", "url": "http://e1:8000", "address": "e1:8000", "state": "healthy",
         "up": True, "consecutive_failures": 0, "consecutive_5xx": 0, "last_error": None,
         "last_check": None, "in_flight": 0, "max_in_flight": 4, "engine_load": None,
         "weight": 1, "model_served": None},
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
